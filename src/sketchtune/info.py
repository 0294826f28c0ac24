"""What a sketched checkpoint holds: layout, sizes, compression and trainable parameters."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .architecture import PROJECTIONS, is_fused_experts, projection_shape
from .checkpoint import checkpoint_tensors, validate, weight_files

BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}


def describe(path: str | os.PathLike) -> dict:
    """Summary of a sketched checkpoint, computed from its config and safetensors headers.

    ``sketched_bytes`` counts codes + codebooks (+ biases) of the sketched layers; ``fp16_bytes`` is what
    those layers' dense weights take in fp16; trainable parameters are Σ rows × gpr × 2^bits (paper App. C).
    """
    path = Path(path).expanduser()
    cfg = validate(path)
    qc = cfg["quantization_config"]
    tensors = checkpoint_tensors(path)
    sketched = fp16 = trainable = dense_params = 0
    layers = set()
    in_features = _in_features(path)
    for name in qc["modules"]:
        rows, gpr, k = tensors[f"{name}.codebook"][1]
        cols = in_features[name]
        for suffix in ("weight", "codebook", "bias"):
            if f"{name}.{suffix}" in tensors:
                dt, shape = tensors[f"{name}.{suffix}"]
                n = 1
                for d in shape:
                    n *= d
                sketched += n * BYTES.get(dt, 4)
        fp16 += rows * cols * 2
        dense_params += rows * cols
        trainable += rows * gpr * k
        layers.add(name.rsplit(".", 2)[0])
    spec = qc.get("embeddings")
    tables = ([spec["input"]] + ([] if spec["tied"] else [spec["output"]])) if spec else []
    table_bytes = 0
    for name in tables:  # sketched embedding table (and an untied head): codes + codebooks
        for suffix in ("weight", "codebook"):
            dt, shape = tensors[f"{name}.{suffix}"]
            table_bytes += math.prod(shape) * BYTES.get(dt, 4)
    disk = sum(f.stat().st_size for f in weight_files(path))
    return {
        "path": str(path),
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "bits": qc["bits"],
        "gpr": qc["gpr"],
        "s": qc.get("s"),
        "importance": qc.get("importance"),
        "refit": qc.get("refit"),
        "calibration": qc.get("calibration"),
        "source_model": qc.get("source_model"),
        "left_dense": qc.get("left_dense") or {},
        "embeddings": spec,
        "embedding_table_bytes": table_bytes,
        "sketched_modules": len(qc["modules"]),
        "decoder_layers": len(layers),
        "sketched_weight_params": dense_params,
        "trainable_params": trainable,
        "sketched_bytes": sketched,
        "sketched_fp16_bytes": fp16,
        "compression_vs_fp16": fp16 / max(sketched, 1),
        "weights_bytes_on_disk": disk,
        "dir_bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
    }


def _in_features(path: Path) -> dict[str, int]:
    """Input width of every projection, from a weightless (meta-device) instance of the architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    config.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    widths = {n: projection_shape(m)[0] for n, m in model.named_modules() if isinstance(m, PROJECTIONS)}
    for n, m in model.named_modules():
        if is_fused_experts(m):  # sketched per expert: <experts>.gate_up_proj.<e> and <experts>.down_proj.<e>
            experts, two_inter, hidden = m.gate_up_proj.shape
            for e in range(experts):
                widths[f"{n}.gate_up_proj.{e}"], widths[f"{n}.down_proj.{e}"] = hidden, two_inter // 2
    return widths
