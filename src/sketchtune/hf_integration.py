"""Hook sketched checkpoints into ``transformers.AutoModelForCausalLM.from_pretrained``.

Importing :mod:`sketchtune` registers ``quant_method: "sketchtune"``: its config names the sketched modules
and their bits/GPR, and its quantizer swaps those ``nn.Linear`` for :class:`SketchedLinear` on the meta
device before transformers streams the safetensors into them. The quantizer declares itself trainable so
``Trainer`` accepts the model for codebook fine-tuning.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import __version__
from .modeling import set_submodule
from .sketch.algorithm import check_bits_gpr
from .sketched_linear import SketchedLinear

QUANT_METHOD = "sketchtune"


class SketchTuneConfig(QuantizationConfigMixin):
    """``quantization_config`` of a sketched model.

    ``modules`` lists the full names of the sketched linears; ``bits``/``gpr`` apply to all of them unless
    ``module_overrides`` gives a module its own ``{"bits": .., "gpr": ..}``. ``s``, ``importance``,
    ``refit``, ``calibration`` and ``source_model`` record how the sketch was learned, for reproducibility.
    """

    def __init__(
        self,
        bits: int = 4,
        gpr: int = 1,
        modules: list[str] | None = None,
        module_overrides: dict[str, dict[str, int]] | None = None,
        s: float | None = None,
        importance: str | None = None,
        refit: bool | None = None,
        calibration: dict[str, Any] | None = None,
        source_model: str | None = None,
        version: str = __version__,
        **kwargs: Any,
    ) -> None:
        check_bits_gpr(bits, gpr)  # a hand-edited config fails here, before any layer is built
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.gpr = gpr
        self.modules = list(modules or [])
        self.module_overrides = dict(module_overrides or {})
        self.s = s
        self.importance = importance
        self.refit = refit
        self.calibration = calibration
        self.source_model = source_model
        self.version = version

    def layout(self, name: str) -> tuple[int, int]:
        """(bits, gpr) of one module."""
        o = self.module_overrides.get(name, {})
        return o.get("bits", self.bits), o.get("gpr", self.gpr)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def replace_with_sketched(model: torch.nn.Module, config: SketchTuneConfig) -> None:
    """Swap every module named in ``config.modules`` for an empty ``SketchedLinear`` of the same shape."""
    from .errors import SketchError

    for name in config.modules:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise SketchError(f"corrupt checkpoint: sketched module {name!r} does not exist in this model") from None
        bits, gpr = config.layout(name)
        new = SketchedLinear(
            linear.in_features, linear.out_features, bits, gpr, bias=linear.bias is not None,
            dtype=linear.weight.dtype, device=linear.weight.device,
        )
        set_submodule(model, name, new)


class SketchTuneHfQuantizer(HfQuantizer):
    """Loads pre-sketched checkpoints (sketching itself needs calibration data: see ``sketchtune sketch``)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_with_sketched(model, self.quantization_config)
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
