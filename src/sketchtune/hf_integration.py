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
from .naming import save_renamings
from .sketched_embedding import SketchedEmbedding
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
    ``healing`` records a codebook distillation run after sketching (teacher, steps, tokens, KL before/after);
    ``embeddings`` (``{"input": name, "output": name, "tied": bool, "bits": int, "gpr": int}``, or ``None``) says
    the token embedding and the LM head are sketched too, with their own bits / gpr (the model's when absent) —
    one table for both when the model ties them.
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
        embeddings: dict[str, Any] | None = None,
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
        self.embeddings = check_embeddings_spec(embeddings, bits, gpr)
        self.format_version = FORMAT_VERSION if format_version is None else format_version
        self.version = version

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_embeddings_spec(spec: dict[str, Any] | None, bits: int, gpr: int) -> dict[str, Any] | None:
    """A config's ``embeddings`` entry, checked and complete: module names for the input table and the head,
    ``tied``, and the table's ``bits`` / ``gpr`` (``bits`` / ``gpr`` of the decoder layers when absent)."""
    if spec is None:
        return None
    ok = (isinstance(spec, dict) and isinstance(spec.get("input"), str) and isinstance(spec.get("output"), str)
          and isinstance(spec.get("tied"), bool))
    if not ok:
        raise SketchError(f"corrupt checkpoint: quantization_config.embeddings must be {{'input': name, 'output': "
                          f"name, 'tied': bool, 'bits': int, 'gpr': int}}, got {spec!r}")
    full = {"input": spec["input"], "output": spec["output"], "tied": spec["tied"],
            "bits": spec.get("bits", bits), "gpr": spec.get("gpr", gpr)}
    try:
        check_layout(full["bits"], full["gpr"])
    except SketchError as e:
        raise SketchError(f"corrupt checkpoint: quantization_config.embeddings: {e}") from None
    return full


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    found = next((n for n, m in model.named_modules() if m is module), None)
    if found is None:
        raise SketchError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")
    return found


def embeddings_spec(model: torch.nn.Module, bits: int, gpr: int) -> dict[str, Any]:
    """Where a model's token embedding and LM head are, whether it ties them (the same weight tensor), and the
    layout to sketch them in."""
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(table, torch.nn.Embedding) or head is None or not hasattr(head, "weight"):
        raise SketchError(f"{type(model).__name__}: sketching the embeddings needs an nn.Embedding input table and "
                          "a linear LM head")
    tied = head.weight is table.weight or (
        head.weight.shape == table.weight.shape and head.weight.data_ptr() == table.weight.data_ptr())
    check_layout(bits, gpr, table.embedding_dim)
    return {"input": module_name(model, table), "output": module_name(model, head), "tied": bool(tied),
            "bits": bits, "gpr": gpr}


def empty_embeddings(model: torch.nn.Module, spec: dict[str, Any]):
    """Empty ``(SketchedEmbedding, SketchedLinear head)`` shaped like the model's dense ones."""
    bits, gpr = spec["bits"], spec["gpr"]
    try:
        dense, head = model.get_submodule(spec["input"]), model.get_submodule(spec["output"])
    except AttributeError:
        raise SketchError(f"corrupt checkpoint: sketched embeddings {spec} do not exist in this model") from None
    table = SketchedEmbedding(dense.num_embeddings, dense.embedding_dim, bits, gpr, dense.padding_idx,
                              dtype=dense.weight.dtype, device=dense.weight.device)
    table.keep_scale_of(dense)
    in_features, out_features = projection_shape(head)
    sketched_head = SketchedLinear(in_features, out_features, bits, gpr, bias=getattr(head, "bias", None) is not None,
                                   dtype=head.weight.dtype, device=head.weight.device)
    return table, sketched_head


def install_embeddings(model: torch.nn.Module, spec: dict[str, Any], table, head) -> None:
    """Put the sketched table and head in place; a tied model's head then holds the table's own parameters."""
    install_sketched(model, {spec["input"]: table, spec["output"]: head})
    if spec["tied"]:
        tie_sketched_head(model, spec)


def tie_sketched_head(model: torch.nn.Module, spec: dict[str, Any]) -> None:
    """Tie the sketched head to the sketched table the way transformers ties ``lm_head.weight``.

    The head's packed codes *and* codebooks become the table's parameters, and both pairs are declared tied
    (``_tied_weights_keys``, ``all_tied_weights_keys``), so ``save_pretrained`` writes the table once and
    ``from_pretrained`` ties them again on load.
    """
    table, head = model.get_submodule(spec["input"]), model.get_submodule(spec["output"])
    head.weight, head.codebook = table.weight, table.codebook
    keys = {f"{spec['output']}.{p}": f"{spec['input']}.{p}" for p in ("weight", "codebook")}
    model._tied_weights_keys = {**(getattr(model, "_tied_weights_keys", None) or {}), **keys}
    if getattr(model, "all_tied_weights_keys", None) is not None:
        model.all_tied_weights_keys.update(keys)


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
    split packed codes. Only its key renamings are kept (undone on save, as for a dense model: :mod:`.naming`)."""
    model._weight_conversions = save_renamings(model)


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
    if config.embeddings is not None:
        install_embeddings(model, config.embeddings, *empty_embeddings(model, config.embeddings))


class SketchTuneHfQuantizer(HfQuantizer):
    """Loads pre-sketched checkpoints (sketching itself needs calibration data: see ``sketchtune sketch``)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, **kwargs):
        replace_with_sketched(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _keep_our_keys(model)
        spec = self.quantization_config.embeddings
        if spec is not None and spec["tied"]:
            tie_sketched_head(model, spec)  # transformers tied them from all_tied_weights_keys; make sure
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
