"""Sketch the token embedding and the LM head too (``sketch_model(embeddings=True)``, ``--sketch-embeddings``).

Why: the vocabulary table is a large share of a small model (SmolLM2-135M: 21% of its parameters), so leaving
it dense caps how small the sketch can be in memory — and the LM head is the largest single matmul per token.

How: after the decoder layers, the head's Hessian H = 2XXᵀ/n is taken from the *sketched* model's final
hidden states over the same calibration windows, so the head corrects what the layers got wrong, as every
layer does for those before it. The layers are not run again: each stands in as a pass-through, the last one
handing over the hidden states the layer loop already computed, and the model's own tail (final norm, any
scaling) runs up to a pre-hook on the head that records its input and stops the forward before the
vocab-sized logits are ever computed.

A tied model (SmolLM2, Llama-3.2-1B, Gemma, GPT-2: the head *is* the embedding table) gets one sketch, fitted
for the head, and serves lookups from it. An untied model's input table is sketched on its own with
H = I — uniform column weights, no error compensation: a lookup's error is its row's own error, and no input
statistics exist to weight it by.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..architecture import find_decoder_layers, projection_weight
from ..hf_integration import install_embeddings
from ..sketched_embedding import SketchedEmbedding
from ..sketched_linear import SketchedLinear
from .algorithm import SketchResult
from .calibration import LayerInputs, _StopForward, move_outside_layers, return_freed_memory

#: (full module name, W (out × in), H or None, bits, gpr) → the sketch of W; the pipeline's own fitting, error
#: included.
Fit = Callable[[str, torch.Tensor, "torch.Tensor | None", int, int], SketchResult]


@torch.no_grad()
def head_hessian(model: nn.Module, batches: Iterable[torch.Tensor], inputs: LayerInputs,
                 final_hidden: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """H = 2XXᵀ/n (fp32) of the LM head's input, given each batch's last-decoder-layer output ``final_hidden``."""
    prefix, layers = find_decoder_layers(model, sketched=True)
    head = model.get_output_embeddings()
    last = len(layers) - 1
    state: dict[str, Any] = {"sum": None, "n": 0, "batch": 0}

    def stand_in(i: int):
        def forward(*a, **kw):
            h = final_hidden[state["batch"]] if i == last else (a[0] if a else kw["hidden_states"])
            return (h,) if inputs.returns_tuple else h
        return forward

    def record(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        if state["sum"] is None:
            state["sum"] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        state["sum"].addmm_(x.T, x)
        state["n"] += x.shape[0]
        raise _StopForward

    home = head.weight.device
    move_outside_layers(model, prefix, device)
    handle = head.register_forward_pre_hook(record)
    try:
        for i, layer in enumerate(layers):
            layer.forward = stand_in(i)
        for b, ids in enumerate(batches):
            state["batch"] = b
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for layer in layers:
            layer.__dict__.pop("forward", None)
        move_outside_layers(model, prefix, home)
        return_freed_memory()
    if state["n"] != sum(h.shape[0] * h.shape[1] for h in final_hidden):
        raise RuntimeError("the LM head did not see every calibration token once")
    return state["sum"].mul_(2.0 / state["n"])


def sketch_embeddings(model: nn.Module, spec: dict[str, Any], fit: Fit, hessian: torch.Tensor | None) -> None:
    """Replace the model's embedding table and LM head (``spec``: :func:`~sketchtune.hf_integration.embeddings_spec`)
    by their sketches, in place; ``hessian`` is the head's (``None``: round to nearest, as ``method="rtn"``)."""
    dense_table, dense_head = model.get_submodule(spec["input"]), model.get_submodule(spec["output"])
    W = projection_weight(dense_head).data
    bits, gpr = spec["bits"], spec["gpr"]
    result = fit(spec["output"], W, hessian, bits, gpr)
    head = SketchedLinear.from_codes(result.codebook, result.codes, bits, dense_head.bias, dtype=W.dtype)
    if not spec["tied"]:
        own = fit(spec["input"], dense_table.weight.data,
                  None if hessian is None else torch.eye(W.shape[1], device=hessian.device), bits, gpr)
        result = own
    table = SketchedEmbedding.from_codes(result.codebook, result.codes, bits, dense_table.padding_idx,
                                         dtype=dense_table.weight.dtype)
    table.keep_scale_of(dense_table)
    install_embeddings(model, spec, table, head)
