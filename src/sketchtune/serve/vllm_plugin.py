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
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from ..hf_integration import QUANT_METHOD, check_embeddings_spec
from ..kernels import ops
from ..layout import check_layout, dequantize_codes, packed_row_bytes, unpack_codes


class SketchTuneVllmConfig(QuantizationConfig):
    """The checkpoint's ``quantization_config``: bits, groups per row and which modules are sketched."""

    def __init__(self, bits: int, gpr: int, modules: list[str], expert_modules: list[str] | None = None,
                 embeddings: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_layout(bits, gpr)
        self.bits, self.gpr, self.modules = bits, gpr, set(modules)
        self.embeddings = check_embeddings_spec(embeddings, bits, gpr)  # the table's own bits / gpr filled in
        if expert_modules:
            raise ValueError("sketchtune: serving sketched mixture-of-experts layers with vLLM is not supported yet "
                             f"({len(expert_modules)} expert modules in this checkpoint)")

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

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SketchTuneVllmConfig:
        return cls(config["bits"], config["gpr"], config.get("modules", []), config.get("expert_modules"),
                   config.get("embeddings"))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, VocabParallelEmbedding):  # the token table, and ParallelLMHead (a subclass)
            return SketchTuneEmbeddingMethod(self) if self.embeddings else None  # None: dense, as sketching left it
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


def register() -> None:
    """Entry point of ``vllm.general_plugins``: make ``quant_method: "sketchtune"`` known to this vLLM process."""
    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(SketchTuneVllmConfig)
