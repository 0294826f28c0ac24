"""vLLM quantization plugin: sketched checkpoints (``quant_method: "sketchtune"``) served as they are.

vLLM takes out-of-tree quantization methods through ``register_quantization_config``; the package's
``vllm.general_plugins`` entry point (pyproject) calls :func:`register` in every vLLM process, so
``vllm serve SKETCHED_DIR`` and ``LLM(model=SKETCHED_DIR)`` need no flag. A sketched linear keeps the
checkpoint's two tensors — packed codes under ``weight`` (uint8, out × packed bytes) and the codebooks
(out, gpr, 2^bits) — and runs :func:`sketchtune.kernels.ops.linear`: the native LUT GEMV on CPU for decoding,
Ŵ rebuilt for one matmul for prefill, the Triton kernels on CUDA. No dense Ŵ is ever kept.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``; both tensors are per output row, so
its own loaders place each projection's rows at its offset (and split rows between tensor-parallel ranks of a
column-parallel layer). Splitting a row-parallel layer's *input* columns between ranks would cut codebook
groups and packed bytes apart: refused with a clear error (serve with ``tensor_parallel_size=1``).

A checkpoint sketched with ``--sketch-embeddings`` has its token embedding (and LM head, when untied) in the
same format: vLLM's ``VocabParallelEmbedding`` / ``ParallelLMHead`` get :class:`SketchTuneEmbeddingMethod`,
whose lookups decode only the rows asked for and whose logits run the same ``sketchtune::linear``. A tied head
shares the table's codes and codebooks (``tie_weights``), so the table is held once.

Sketched mixture-of-experts blocks (``expert_modules``) get :class:`SketchTuneMoEMethod` on vLLM's routed
experts: every expert's codes and codebooks stacked as ``w13_*`` (gate rows, then up) and ``w2_*``, filled by
its own loader from the checkpoint's per-expert keys (``<block>.gate_up_proj.<e>.weight`` / ``.codebook``,
which vLLM's expert mapping does not know), and ``apply`` runs ``sketchtune::experts`` on vLLM's routing.
vLLM's router and shared experts run as they do for any model. Module names are compared as the checkpoint
stores them (:mod:`sketchtune.naming`: Mixtral's ``block_sparse_moe``, as in vLLM, not transformers'
in-memory ``mlp``); a block still named otherwise by vLLM is refused with a clear error, as are expert
parallelism and tensor-parallel splits of the experts.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from ..hf_integration import QUANT_METHOD, check_embeddings_spec
from ..kernels import ops
from ..layout import check_layout, dequantize_codes, packed_row_bytes, unpack_codes
from ..naming import stored_key


class SketchTuneVllmConfig(QuantizationConfig):
    """The checkpoint's ``quantization_config``: bits, groups per row and which modules are sketched."""

    def __init__(self, bits: int, gpr: int, modules: list[str], expert_modules: list[str] | None = None,
                 embeddings: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_layout(bits, gpr)
        self.bits, self.gpr, self.modules = bits, gpr, set(modules)
        self.embeddings = check_embeddings_spec(embeddings, bits, gpr)  # the table's own bits / gpr filled in
        self.expert_modules = set(expert_modules or [])

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # CUDA: what Triton needs; vLLM does not ask on CPU

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Module names as the checkpoint stores them, which is how vLLM's model code names its modules (e.g.
        Mixtral's ``block_sparse_moe``, ``mlp`` in transformers' memory and so in ``quantization_config``)."""
        model_type = getattr(hf_config, "model_type", None)
        self.modules = {stored_key(m, model_type) for m in self.modules}
        self.expert_modules = {stored_key(m, model_type) for m in self.expert_modules}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SketchTuneVllmConfig:
        return cls(config["bits"], config["gpr"], config.get("modules", []), config.get("expert_modules"),
                   config.get("embeddings"))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, VocabParallelEmbedding):  # the token table, and ParallelLMHead (a subclass)
            return SketchTuneEmbeddingMethod(self) if self.embeddings else None  # None: dense, as sketching left it
        if isinstance(layer, RoutedExperts):
            return SketchTuneMoEMethod(self, layer.moe_config) if self.sketched_experts(prefix) else None
        if not isinstance(layer, LinearBase):
            return None
        return SketchTuneLinearMethod(self) if self.sketched(prefix) else UnquantizedLinearMethod()

    def sketched(self, prefix: str) -> bool:
        """Whether the (possibly fused) vLLM module ``prefix`` is sketched; all of its parts or none must be."""
        head, _, name = prefix.rpartition(".")
        parts = (getattr(self, "packed_modules_mapping", None) or {}).get(name, [name])
        found = [(f"{head}.{p}" if head else p) in self.modules for p in parts]
        if any(found) and not all(found):
            raise ValueError(f"sketchtune: vLLM fuses {', '.join(parts)} into {prefix}, but only some of them are "
                             "sketched in this checkpoint")
        return all(found)

    def sketched_experts(self, prefix: str) -> bool:
        """Whether vLLM's MoE block ``prefix`` is sketched. A block the checkpoint names differently (vLLM's
        Mixtral keeps ``block_sparse_moe`` where transformers 5 says ``mlp``) cannot be matched to its tensors."""
        if prefix in self.expert_modules:
            return True
        suffix = prefix.rsplit(".layers.", 1)[-1].partition(".")[2]  # "mlp.experts" of "model.layers.0.mlp.experts"
        ours = sorted(self.expert_modules)
        if ours and not any(m.endswith("." + suffix) for m in ours):
            raise ValueError(f"sketchtune: vLLM names this model's mixture-of-experts blocks like {prefix!r}, but the "
                             f"checkpoint sketched {ours[0]!r}, …: serving this architecture's sketched experts with "
                             "vLLM is not supported (its module names differ from transformers')")
        return False


class SketchTuneLinearMethod(LinearMethodBase):
    """Packed codes + codebooks per linear; ``apply`` runs the ``sketchtune::linear`` op."""

    def __init__(self, config: SketchTuneVllmConfig) -> None:
        self.config = config

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        bits, gpr = self.config.bits, self.config.gpr
        if input_size_per_partition != input_size:
            raise ValueError("sketchtune: a row-parallel layer split across tensor-parallel ranks would cut codebook "
                             "groups apart; serve sketched checkpoints with tensor_parallel_size=1")
        check_layout(bits, gpr, input_size)
        rows = sum(output_partition_sizes)
        loader = extra.get("weight_loader")
        codes = ModelWeightParameter(
            data=torch.empty(rows, packed_row_bytes(input_size, bits), dtype=torch.uint8),
            input_dim=1, output_dim=0, weight_loader=loader)
        codebook = ModelWeightParameter(
            data=torch.empty(rows, gpr, 2**bits, dtype=params_dtype), input_dim=1, output_dim=0, weight_loader=loader)
        layer.register_parameter("weight", codes)
        layer.register_parameter("codebook", codebook)
        layer.sketch_in_features = input_size

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Plain parameters from here on (vLLM's loader-carrying subclasses are not needed once loaded).
        layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
        layer.codebook = torch.nn.Parameter(layer.codebook.data, requires_grad=False)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # The op's body directly (no custom-op dispatch per layer) unless vLLM is compiling the model.
        run = ops.linear if torch.compiler.is_compiling() else ops.linear_forward
        return run(x, layer.weight, layer.codebook, bias, self.config.bits, layer.sketch_in_features)


class SketchTuneEmbeddingMethod(QuantizeMethodBase):
    """A sketched vocabulary table (rows = tokens) used as the embedding, the LM head, or both when tied.

    Rows are split between tensor-parallel ranks by vLLM's own vocabulary loader (codes and codebooks are both
    per row, so a shard is a contiguous block of rows); its padding rows get zero codebooks (zero logits, never
    sampled)."""

    def __init__(self, config: SketchTuneVllmConfig) -> None:
        self.config = config
        self.bits, self.gpr = config.embeddings["bits"], config.embeddings["gpr"]

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        bits, gpr = self.bits, self.gpr
        check_layout(bits, gpr, input_size)
        rows = sum(output_partition_sizes)
        for name, data in (("weight", torch.empty(rows, packed_row_bytes(input_size, bits), dtype=torch.uint8)),
                           ("codebook", torch.empty(rows, gpr, 2**bits, dtype=params_dtype))):
            param = torch.nn.Parameter(data, requires_grad=False)
            set_weight_attrs(param, {"input_dim": 1, "output_dim": 0, **extra})
            layer.register_parameter(name, param)
        layer.sketch_in_features = input_size

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        run = ops.linear if torch.compiler.is_compiling() else ops.linear_forward
        return run(x, layer.weight, layer.codebook, bias, self.bits, layer.sketch_in_features)

    def embedding(self, layer: torch.nn.Module, input_: torch.Tensor) -> torch.Tensor:
        rows = input_.reshape(-1)
        codes = unpack_codes(layer.weight.index_select(0, rows), self.bits, layer.sketch_in_features)
        table = dequantize_codes(layer.codebook.index_select(0, rows), codes)
        return table.view(*input_.shape, layer.sketch_in_features)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module) -> torch.nn.Module:
        layer.weight, layer.codebook = embed_tokens.weight, embed_tokens.codebook
        layer.sketch_in_features = embed_tokens.sketch_in_features
        return layer


class SketchTuneMoEMethod(FusedMoEMethodBase):
    """Every expert of a routed MoE block as packed codes + codebooks; ``apply`` runs ``sketchtune::experts``."""

    #: The checkpoint's per-expert keys, relative to the block (what vLLM's MoE runner hands its experts);
    #: ``w2`` is ``down_proj`` after vLLM's Mixtral weight mapper (``.down_proj.`` → ``.w2.``).
    KEY = re.compile(r"(?:^|\.)(gate_up_proj|down_proj|w2)\.(\d+)\.(weight|codebook)$")

    def __init__(self, config: SketchTuneVllmConfig, moe: Any) -> None:
        super().__init__(moe)
        self.config = config

    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype, **extra: Any) -> None:
        moe, bits, gpr = self.moe, self.config.bits, self.config.gpr
        inter = intermediate_size_per_partition
        if moe.moe_parallel_config.use_ep or num_experts != moe.num_experts or inter != moe.intermediate_size:
            raise ValueError("sketchtune: sketched experts split across expert- or tensor-parallel ranks are not "
                             "supported; serve with tensor_parallel_size=1 and without expert parallelism")
        if not moe.is_act_and_mul or moe.activation.value != "silu" or moe.has_bias:
            raise ValueError(f"sketchtune: sketched experts are served for SiLU-gated experts without bias; "
                             f"{layer.layer_name} has activation {moe.activation.value!r}, bias={moe.has_bias}")
        if getattr(layer, "apply_router_weight_on_input", False):
            raise ValueError(f"sketchtune: {layer.layer_name} applies router weights on the input: not supported")
        check_layout(bits, gpr, hidden_size)
        check_layout(bits, gpr, inter)
        k = 2**bits
        shapes = {"w13_weight": ((num_experts, 2 * inter, packed_row_bytes(hidden_size, bits)), torch.uint8),
                  "w13_codebook": ((num_experts, 2 * inter, gpr, k), params_dtype),
                  "w2_weight": ((num_experts, hidden_size, packed_row_bytes(inter, bits)), torch.uint8),
                  "w2_codebook": ((num_experts, hidden_size, gpr, k), params_dtype)}
        for name, (shape, dtype) in shapes.items():
            layer.register_parameter(name, torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))
        layer.sketch_filled = set()
        layer.load_weights = lambda weights: self.load_weights(layer, weights)  # the runner calls the layer's

    def load_weights(self, layer: torch.nn.Module, weights):
        """Copy ``gate_up_proj.<e>.weight`` (codes) / ``.codebook`` into expert e's slice of ``w13_*``, and
        ``down_proj.<e>.…`` into ``w2_*``; yields the parameter names loaded (vLLM checks none is left empty)."""
        for name, tensor in weights:
            match = self.KEY.search(name)
            if match is None:
                raise ValueError(f"sketchtune: unexpected tensor {name!r} in sketched experts {layer.layer_name}")
            proj, expert, kind = match.group(1), int(match.group(2)), match.group(3)
            target = ("w13_" if proj == "gate_up_proj" else "w2_") + kind
            param = getattr(layer, target)
            if expert >= param.shape[0] or tuple(tensor.shape) != tuple(param.shape[1:]):
                raise ValueError(f"sketchtune: {layer.layer_name}.{name} has shape {tuple(tensor.shape)}, expected "
                                 f"{tuple(param.shape[1:])} for expert {expert} of {param.shape[0]}")
            param.data[expert].copy_(tensor)
            layer.sketch_filled.add((target, expert))
            yield target

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        experts = layer.w13_weight.shape[0]
        missing = [f"{t}[{e}]" for t in ("w13_weight", "w13_codebook", "w2_weight", "w2_codebook")
                   for e in range(experts) if (t, e) not in layer.sketch_filled]
        if missing:
            raise ValueError(f"sketchtune: the checkpoint lacks {', '.join(missing[:4])} of {layer.layer_name}")

    def get_fused_moe_quant_config(self, layer: torch.nn.Module) -> None:
        return None  # no vLLM fused-MoE kernel runs these weights

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts: Any = None, shared_experts_input: torch.Tensor | None = None) -> torch.Tensor:
        run = ops.experts if torch.compiler.is_compiling() else ops.experts_forward
        return run(x, topk_weights, topk_ids, layer.w13_weight, layer.w13_codebook, layer.w2_weight,
                   layer.w2_codebook, self.config.bits)


def register() -> None:
    """Entry point of ``vllm.general_plugins``: make ``quant_method: "sketchtune"`` known to this vLLM process."""
    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(SketchTuneVllmConfig)
