"""Sketch a whole causal LM, one decoder layer at a time.

Only the decoder layer being sketched sits on the compute device, so models larger than the device can be
sketched. Layer i+1 is calibrated on the outputs of the *already sketched* layer i, so every layer learns to
correct the error upstream of it. Hessians H = 2XXᵀ/n are accumulated in fp32 with forward hooks; linears
fed by the very same tensor (q/k/v, gate/up) share one Hessian, detected by tensor identity during the
forward rather than from a per-architecture name table.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architecture import (
    find_decoder_layers,
    fused_expert_modules,
    linear_modules,
    projection_shape,
    projection_weight,
    unsketchable_matrices,
)
from ..errors import SketchError
from ..experts import SketchedExperts, expert_shapes
from ..experts import empty_like as empty_experts_like
from ..hf_integration import (
    SketchTuneConfig,
    attach_config,
    embeddings_spec,
    install_sketched,
)
from ..layout import check_layout
from ..sketched_linear import SketchedLinear
from .algorithm import (
    Importance,
    SketchResult,
    relative_output_error,
    round_to_nearest,
    sketch_weight,
    uniform_codebook,
)
from .calibration import (
    ExpertHessianCollector,
    HessianCollector,
    LayerInputs,
    calibration_tokens,
    capture_layer_inputs,
    return_freed_memory,
)
from .embeddings import head_hessian, sketch_embeddings
from .progress import SketchProgress
from .streaming import StreamedModel

Method = Literal["sketch", "gptq", "rtn"]

#: Default k-means importance: LeanQuant's diag(U)^(-s) with s = 3. README "Choosing s": of the nine
#: (definition, s) pairs swept on SmolLM2-135M INT4 it gave the lowest WikiText-2 perplexity.
DEFAULT_S = 3.0
DEFAULT_IMPORTANCE: Importance = "cholesky"
#: The fewest bits a sketched embedding table gets by default. On SmolLM2-135M under INT3 GPR 4 layers a 3-bit
#: table raised WikiText-2 perplexity by 14% over the dense table, a 4-bit one by 2.3% (``sketch_quality.json``).
TABLE_MIN_BITS = 4


@dataclass
class SketchReport:
    """What sketching did: per-module relative layer-output error ‖(W−Ŵ)X‖²/‖WX‖², time and peak memory."""

    method: str
    bits: int
    gpr: int
    seconds: float = 0.0
    module_errors: dict[str, float] = field(default_factory=dict)
    left_dense: dict[str, str] = field(default_factory=dict)  # matrix -> why it was not sketched
    expert_fallbacks: dict[str, int] = field(default_factory=dict)  # expert -> routed tokens, when too few
    peak_device_bytes: int | None = None

    @property
    def mean_error(self) -> float:
        return sum(self.module_errors.values()) / max(1, len(self.module_errors))


def sketch_model(
    model: nn.Module,
    tokenizer=None,
    calib: str = "c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    bits: int = 4,
    gpr: int = 1,
    s: float = DEFAULT_S,
    importance: Importance = DEFAULT_IMPORTANCE,
    refit: bool = False,
    percdamp: float = 0.01,
    blocksize: int = 128,
    method: Method = "sketch",
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int = 8,
    progress: bool = True,
    progress_dir: str | os.PathLike | None = None,
    resume: bool = False,
    min_expert_tokens: int = 32,
    stream: StreamedModel | None = None,
    embeddings: bool = False,
    embedding_bits: int | None = None,
    embedding_gpr: int | None = None,
) -> SketchReport:
    """Replace every linear inside the decoder layers of ``model`` by a :class:`SketchedLinear`, in place.

    ``seqlen`` is capped at the model's context (``max_position_embeddings``). With ``progress_dir`` every
    finished layer is written there (:mod:`.progress`), and ``resume=True`` continues a killed run after its
    last finished layer with a result identical to an uninterrupted run. Fused mixture-of-experts tensors become
    :class:`SketchedExperts`, each expert with Hessians from the tokens routed to it; an expert routed fewer than
    ``min_expert_tokens`` tokens falls back to all tokens' statistics (:class:`ExpertHessianCollector`) and is
    listed in ``report.expert_fallbacks``. Routers stay dense. With ``stream`` (``model`` is then
    ``stream.model``, built on the meta device) each decoder layer is read from disk just before it is sketched
    and dropped once written to ``progress_dir`` (:mod:`.streaming`), so memory does not grow with depth.

    ``method="sketch"`` is SketchTune; ``"gptq"`` the same loop with a uniform grid; ``"rtn"`` plain rounding
    to a uniform grid (needs no calibration). ``embeddings=True`` sketches the token embedding and the LM head
    too, after the layers (:mod:`.embeddings`: one table for both in a tied model), with ``embedding_bits``
    (default: ``bits``, at least :data:`TABLE_MIN_BITS`) and ``embedding_gpr`` (default: ``gpr``); by default
    they stay dense.
    """
    if method not in ("sketch", "gptq", "rtn"):
        raise SketchError(f"method must be 'sketch', 'gptq' or 'rtn', got {method!r}")
    prefix, layers = find_decoder_layers(model)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and seqlen > context:
        seqlen = context  # calibrate on windows the model can attend over, never beyond its context
    for i, layer in enumerate(layers):
        for lname, lin in linear_modules(layer).items():
            try:
                check_layout(bits, gpr, projection_shape(lin)[0])
            except SketchError as e:
                raise SketchError(f"{prefix}.{i}.{lname}: {e}") from None
        for ename, module in fused_expert_modules(layer).items():
            _, hidden_dim, inter = expert_shapes(module)
            try:
                check_layout(bits, gpr, hidden_dim)
                check_layout(bits, gpr, inter)
            except SketchError as e:
                raise SketchError(f"{prefix}.{i}.{ename}: {e}") from None
    spec = None
    if embeddings:
        if stream is not None:
            raise SketchError("--sketch-embeddings cannot be combined with streaming yet (sketch without --stream)")
        try:
            spec = embeddings_spec(model, embedding_bits or max(bits, TABLE_MIN_BITS), embedding_gpr or gpr)
        except SketchError as e:
            raise SketchError(f"embeddings: {e}") from None
    tracker = None
    if progress_dir is not None:
        settings = {"bits": bits, "gpr": gpr, "method": method, "calib": str(calib), "nsamples": nsamples,
                    "seqlen": seqlen, "seed": seed, "s": s, "importance": importance, "refit": refit,
                    "percdamp": percdamp, "blocksize": blocksize, "batch_size": batch_size, "layers": len(layers),
                    "source_model": getattr(model, "name_or_path", None) or None,
                    **({"embeddings": [spec["bits"], spec["gpr"]]} if spec else {})}
        tracker = (SketchProgress.resume if resume else SketchProgress)(progress_dir, settings)
    elif resume or stream is not None:
        raise SketchError("resume and stream need a progress_dir to keep the finished layers in")
    home = torch.device("cpu") if stream is not None else next(model.parameters()).device  # streamed: on meta now
    dev = torch.device(device) if device else home
    report = SketchReport(method=method, bits=bits, gpr=gpr)
    names: list[str] = []
    expert_names: list[str] = []
    left_dense: dict[str, str] = {}
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def fit(full: str, W: torch.Tensor, H: torch.Tensor | None, errors: dict[str, float], bits: int = bits,
            gpr: int = gpr) -> SketchResult:
        """Sketch one matrix (GPTQ-style with H, else round to nearest); its relative output error goes to errors."""
        if H is None:
            return round_to_nearest(W, bits, gpr)
        try:
            result = sketch_weight(
                W, H, bits, gpr, s=s, importance=importance, percdamp=percdamp, blocksize=blocksize,
                refit=refit and method == "sketch",
                **({"codebook_fn": uniform_codebook} if method == "gptq" else {}),
            )
        except SketchError as e:
            raise SketchError(f"{full}: {e}") from None
        errors[full] = relative_output_error(W, result, H)
        return result

    inputs: LayerInputs | None = None
    if method != "rtn":
        if tokenizer is None:
            raise SketchError("a tokenizer is needed to build calibration batches")
        tokens = calibration_tokens(tokenizer, calib, nsamples, seqlen, seed)
        if stream is not None:
            stream.load_outside()
            stream.load_layer(0, layers[0])  # the capture runs layer 0 once, to learn what a layer returns
        inputs = capture_layer_inputs(model, tokens.split(batch_size), dev)
        if stream is not None:
            stream.release_outside()  # the layers' inputs are captured: the embeddings are not read again
    hidden = inputs.hidden if inputs is not None else None

    bar = tqdm(range(len(layers)), desc=f"{method} {bits}-bit gpr{gpr}", disable=not progress, unit="layer")
    for i in bar:
        layer = layers[i]
        if stream is not None:
            stream.load_layer(i, layer)
        if tracker is not None and i in tracker.done:  # finished before the interruption: reuse, don't redo
            done = tracker.done[i]
            for ename in done.get("experts", []):
                install_sketched(layer, {ename: empty_experts_like(layer.get_submodule(ename), bits, gpr)})
                expert_names.append(f"{prefix}.{i}.{ename}")
            install_sketched(layer, tracker.load_layer(i, layer, bits))
            names.extend(f"{prefix}.{i}.{n}" for n in done["modules"])
            report.module_errors.update(done["errors"])
            left_dense.update(done["left_dense"])
            if inputs is not None:
                with torch.no_grad():
                    hidden = inputs.call(layer.to(dev), i, hidden)
            _put_away(layers, i, layer, home, stream)
            continue
        layer = layer.to(dev)
        linears = linear_modules(layer)
        experts = fused_expert_modules(layer)
        layer_errors: dict[str, float] = {}
        collector = expert_collector = None
        if inputs is not None:
            collector = HessianCollector(linears)
            expert_collector = ExpertHessianCollector(experts, min_expert_tokens) if experts else None
            with torch.no_grad():
                for h, a, k in zip(hidden, inputs.args[i], inputs.kwargs[i]):
                    layer(h, *a, **k)
                    collector.end_batch()
                collector.close()
                if expert_collector is not None and expert_collector.begin_fallback_pass():
                    for h, a, k in zip(hidden, inputs.args[i], inputs.kwargs[i]):
                        layer(h, *a, **k)
            if stream is not None:
                return_freed_memory()  # the forward's activations: give the heap back before sketching
            if expert_collector is not None:
                expert_collector.close()
                for ename, few in expert_collector.fallbacks.items():
                    report.expert_fallbacks.update({f"{prefix}.{i}.{ename}.{e}": n for e, n in few.items()})

        def sketch_one(full: str, W: torch.Tensor, H: torch.Tensor | None, bias) -> SketchedLinear:
            result = fit(full, W, H, layer_errors)
            names.append(full)
            return SketchedLinear.from_codes(result.codebook, result.codes, bits, bias, dtype=W.dtype)

        for lname in list(linears):
            lin = linears.pop(lname)  # once replaced, nothing holds the dense weight: big layers need the room
            H = collector.hessian(lname) if collector is not None else None
            sketched = sketch_one(f"{prefix}.{i}.{lname}", projection_weight(lin).data, H, lin.bias)
            install_sketched(layer, {lname: sketched})
            del lin, H
            if collector is not None:
                collector.release(lname)
            if stream is not None:
                return_freed_memory()
        for ename, module in experts.items():
            n_exp, hidden_dim, inter = expert_shapes(module)
            gu_h, dn_h = expert_collector.hessians(ename) if expert_collector is not None else ([None] * n_exp,) * 2
            new = SketchedExperts(n_exp, hidden_dim, inter, bits, gpr, module.act_fn, dtype=module.gate_up_proj.dtype,
                                  device=module.gate_up_proj.device)
            for e in range(n_exp):  # in module order (all gate_up, then all down), as loading lists them
                new.gate_up_proj[e] = sketch_one(f"{prefix}.{i}.{ename}.gate_up_proj.{e}",
                                                 module.gate_up_proj.data[e], gu_h[e], None)
            for e in range(n_exp):
                new.down_proj[e] = sketch_one(f"{prefix}.{i}.{ename}.down_proj.{e}",
                                              module.down_proj.data[e], dn_h[e], None)
            install_sketched(layer, {ename: new})
            expert_names.append(f"{prefix}.{i}.{ename}")
        layer_left = unsketchable_matrices(layer, f"{prefix}.{i}.")  # after installing: what is still dense
        left_dense.update(layer_left)
        del collector, expert_collector
        if inputs is not None:
            with torch.no_grad():
                hidden = inputs.call(layer, i, hidden)
        report.module_errors.update(layer_errors)
        if tracker is not None:
            tracker.save_layer(i, layer, layer_errors, layer_left, list(experts))
        _put_away(layers, i, layer, home, stream)
        if report.module_errors:
            bar.set_postfix(err=f"{report.mean_error:.2e}")

    if spec is not None:
        H = None if inputs is None else head_hessian(model, tokens.split(batch_size), inputs, hidden, dev)
        errors: dict[str, float] = {}
        sketch_embeddings(model, spec, lambda full, W, H_, b, g: fit(full, W, H_, errors, b, g), H)
        report.module_errors.update(errors)
    report.left_dense = left_dense
    report.seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        report.peak_device_bytes = torch.cuda.max_memory_allocated(dev)
    attach_config(model, SketchTuneConfig(
        bits=bits, gpr=gpr, modules=names,
        s=s if method == "sketch" else None,
        importance=importance if method == "sketch" else None,
        refit=refit if method == "sketch" else None,
        source_model=getattr(model, "name_or_path", None) or None, left_dense=left_dense,
        expert_modules=expert_names, embeddings=spec,
        calibration=None if method == "rtn" else {
            "source": str(calib), "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "method": method,
        },
    ))
    return report


def _put_away(layers: nn.ModuleList, index: int, layer: nn.Module, home: torch.device, stream) -> None:
    """A finished layer goes back where the model lives — or, streaming, back to the meta device."""
    if stream is not None:
        stream.release_layer(index, layer)
    else:
        layers[index] = layer.to(home)
