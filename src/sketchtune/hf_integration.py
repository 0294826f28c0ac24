"""Hook sketched models into transformers: the ``quantization_config``, the quantizer, and installing layers.

Importing :mod:`sketchtune` registers ``quant_method: "sketchtune"``: its config names the sketched modules
and their layout, and its quantizer swaps those ``nn.Linear`` for empty :class:`SketchedLinear` on the meta
device before transformers streams the safetensors into them. The sketch pipeline installs the layers it
builds through the same :func:`install_sketched` and :func:`attach_config`, so a freshly sketched model and a
loaded one are put together one way. The quantizer declares itself trainable so ``Trainer`` accepts the model
for codebook fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .architecture import projection_shape, set_submodule
from .errors import SketchError
from .experts import empty_like as empty_experts_like
from .layout import FORMAT_VERSION, check_format_version, check_layout
from .sketched_linear import SketchedLinear
from .version import __version__

QUANT_METHOD = "sketchtune"


class SketchTuneConfig(QuantizationConfigMixin):
    """``quantization_config`` of a sketched model — the one place a checkpoint's layout is recorded.

    ``modules`` lists the full names of the sketched linears, all with ``bits`` / ``gpr`` (per expert matrix for
    mixture-of-experts blocks, whose fused experts modules ``expert_modules`` names); ``format_version``
    is the :mod:`sketchtune.layout` version the codes are packed in. ``s``, ``importance``, ``refit``,
    ``calibration`` and ``source_model`` record how the sketch was learned, for reproducibility;
    ``left_dense`` names every weight matrix inside the decoder layers that stayed dense, and why;
    ``healing`` records a codebook distillation run after sketching (teacher, steps, tokens, KL before/after).
    """

    def __init__(
        self,
        bits: int = 4,
        gpr: int = 1,
        modules: list[str] | None = None,
        s: float | None = None,
        importance: str | None = None,
        refit: bool | None = None,
        calibration: dict[str, Any] | None = None,
        source_model: str | None = None,
        left_dense: dict[str, str] | None = None,
        expert_modules: list[str] | None = None,
        healing: dict[str, Any] | None = None,
        format_version: int | None = FORMAT_VERSION,
        version: str = __version__,
        **kwargs: Any,
    ) -> None:
        check_layout(bits, gpr)  # a hand-edited config fails here, before any layer is built
        check_format_version(format_version)
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.gpr = gpr
        self.modules = list(modules or [])
        self.s = s
        self.importance = importance
        self.refit = refit
        self.calibration = calibration
        self.source_model = source_model
        self.left_dense = dict(left_dense or {})
        self.expert_modules = list(expert_modules or [])
        self.healing = healing
        self.format_version = FORMAT_VERSION if format_version is None else format_version
        self.version = version

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def install_sketched(model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """Put each sketched module (``SketchedLinear``, ``SketchedExperts``) at its dotted name in ``model``."""
    for name, layer in layers.items():
        set_submodule(model, name, layer)


def attach_config(model: torch.nn.Module, config: SketchTuneConfig) -> None:
    """Mark ``model`` as sketched with ``config``: what ``save_pretrained`` writes and ``Trainer`` checks."""
    model.config.quantization_config = config
    model.is_quantized = True
    _keep_our_keys(model)
    if getattr(model, "hf_quantizer", None) is not None:  # e.g. the GGUF loader's: the weights are ours now
        model.hf_quantizer = None


def _keep_our_keys(model: torch.nn.Module) -> None:
    """Save sketched modules under their own keys: transformers would otherwise "revert" fused MoE experts into a
    hub layout (per-expert w1/w2/w3) on every ``save_pretrained`` — including Trainer checkpoints — which cannot
    split packed codes. An empty conversion list makes that revert a no-op."""
    model._weight_conversions = []


def replace_with_sketched(model: torch.nn.Module, config: SketchTuneConfig) -> None:
    """Swap every module named in ``config.modules`` for an empty ``SketchedLinear`` of the same shape."""
    for name in config.expert_modules:  # first: their per-expert SketchedLinear children are named in modules
        try:
            fused = model.get_submodule(name)
        except AttributeError:
            raise SketchError(f"corrupt checkpoint: sketched experts {name!r} do not exist in this model") from None
        install_sketched(model, {name: empty_experts_like(fused, config.bits, config.gpr)})
    layers = {}
    for name in config.modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise SketchError(f"corrupt checkpoint: sketched module {name!r} does not exist in this model") from None
        if isinstance(linear, SketchedLinear):
            continue
        in_features, out_features = projection_shape(linear)
        layers[name] = SketchedLinear(
            in_features, out_features, config.bits, config.gpr, bias=linear.bias is not None,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
    install_sketched(model, layers)


class SketchTuneHfQuantizer(HfQuantizer):
    """Loads pre-sketched checkpoints (sketching itself needs calibration data: see ``sketchtune sketch``)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_with_sketched(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _keep_our_keys(model)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register() -> None:
    """Idempotent registration with transformers' quantizer registry."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SketchTuneConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SketchTuneHfQuantizer)
