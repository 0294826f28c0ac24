"""What the model sees during calibration: token windows, each decoder layer's exact inputs, and Hessians.

* :func:`calibration_tokens` — random token windows from a local corpus (GPTQ's C4 protocol, made
  reproducible);
* :func:`capture_layer_inputs` — the hidden states entering the first decoder layer and, for *every* layer,
  the other arguments the model itself passes it. Layers differ: Gemma-2/3, Qwen2/3 with sliding windows,
  Cohere2, gpt-oss and any model with ``config.layer_types`` give sliding-window layers another attention
  mask, and Gemma-3 its global layers other rotary embeddings, so reusing layer 0's arguments would
  calibrate later layers on states the model never produces;
* :class:`HessianCollector` / :func:`collect_hessians` — H = 2XXᵀ/n per linear, shared by linears that read
  the same tensor.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..architecture import find_decoder_layers, linear_modules
from ..errors import SketchError
from ..text import read_text


def calibration_tokens(
    tokenizer, source: str | os.PathLike, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """(nsamples, seqlen) token ids: windows at seeded random offsets of the tokenized corpus.

    The corpus is tokenized once as a single stream, so documents shorter than ``seqlen`` are usable and
    the windows cross document boundaries as they do in pre-training.
    """
    if nsamples < 1 or seqlen < 2:
        raise SketchError(f"need nsamples ≥ 1 and seqlen ≥ 2, got {nsamples} × {seqlen}")
    ids = tokenizer(read_text(source), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return_freed_memory()  # the tokenizer's per-token bookkeeping (~0.5 KB a token) is garbage now
    if ids.numel() < seqlen:
        raise SketchError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so a streamed sketch's peak memory is not the
    tokenizer's transient plus the model's; a no-op where glibc's ``malloc_trim`` is not available."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3


def map_large_allocations(threshold: int = 16 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more by its own mapping, returned to the OS on free.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB), after which every
    tensor below 32 MB — Hessians, weights, hidden states of a 2048-wide model — is carved from the heap, and
    the heap's free gaps stay resident between :func:`return_freed_memory` calls: measured sketching a 2048 ×
    5632 Llama layer, ~100–250 MB of peak RSS. A fixed 16 MB threshold keeps the small, constantly reused
    blocks of the k-means and GPTQ loops on the heap (they must stay under it: see ``row_chunks``) and maps
    the rest. Process-wide; a streamed sketch calls it because its peak memory is the product there.
    A no-op where glibc is not the allocator.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


def _malloc_trim():
    libc = _libc()
    return getattr(libc, "malloc_trim", None) if libc is not None else None


@cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Per batch: the hidden states entering layer 0, and per layer the other arguments the model passes it.

    ``args[i][b]`` / ``kwargs[i][b]`` are what layer ``i`` receives with batch ``b`` besides its hidden states;
    tensors the model shares between layers (a mask, rotary tables) are held once, by reference.
    """

    hidden: list[torch.Tensor]
    args: list[list[tuple]]
    kwargs: list[list[dict[str, Any]]]
    returns_tuple: bool = False  # whether a decoder layer returns (hidden, ...) rather than the tensor

    def call(self, layer: nn.Module, index: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run decoder layer ``index`` on every batch of ``hidden`` with the model's own arguments for it."""
        return [layer_output(layer(h, *a, **k)) for h, a, k in zip(hidden, self.args[index], self.kwargs[index])]


def layer_output(out) -> torch.Tensor:
    """The hidden states of a decoder layer's return value (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def move_outside_layers(model: nn.Module, layers_prefix: str, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside the decoder layers (embeddings, norms, rotary)."""
    for name, module in model.named_modules():
        if name == layers_prefix or name.startswith(layers_prefix + "."):
            continue
        for key, p in module._parameters.items():
            if p is not None and not p.is_meta:  # meta: not read from disk (a streamed model's LM head)
                p.data = p.data.to(device)
        for key, b in module._buffers.items():
            if b is not None and not b.is_meta:
                module._buffers[key] = b.to(device)


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str) -> LayerInputs:
    """Run the model's own forward over ``batches`` with every decoder layer stood in for by a recorder.

    Each recorder keeps the arguments the model passes its layer and hands the hidden states on unchanged, so
    the model computes every layer's masks and position embeddings exactly as it would, without running any
    layer's weights (and with the decoder layers left where they are). The last recorder stops the forward
    before the LM head. Layer 0 runs once for real, to learn whether layers return a tensor or a tuple.
    """
    prefix, layers = find_decoder_layers(model)
    n = len(layers)
    hidden: list[torch.Tensor] = []
    args: list[list[tuple]] = [[] for _ in range(n)]
    kwargs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    returns_tuple: list[bool] = []

    def recorder(i: int, layer: nn.Module):
        real_forward = layer.forward

        def record(*a, **kw):
            h = a[0] if a else kw.pop("hidden_states")
            if isinstance(h, (tuple, list)):
                h = h[0]
            kw = {k: v for k, v in kw.items() if k != "hidden_states"}
            if i == 0:
                hidden.append(h)
                if not returns_tuple:
                    layer.to(device)
                    returns_tuple.append(isinstance(real_forward(h, *a[1:], **kw), (tuple, list)))
                    layer.to(home)
            args[i].append(tuple(a[1:]))
            kwargs[i].append(kw)
            if i == n - 1:
                raise _StopForward
            return (h,) if returns_tuple[0] else h

        return record

    home = next(layers[0].parameters()).device
    move_outside_layers(model, prefix, device)
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i, layer)
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        move_outside_layers(model, prefix, home)
        return_freed_memory()  # the forward's attention scratch
    if any(len(a) != len(hidden) for a in args):
        raise SketchError("the model's forward did not call every decoder layer once per batch; "
                          "unsupported architecture for layer-by-layer calibration")
    return LayerInputs(hidden=hidden, args=args, kwargs=kwargs, returns_tuple=bool(returns_tuple and returns_tuple[0]))


class HessianCollector:
    """Forward hooks accumulating Σ xxᵀ per group of linears that read the same input tensor."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.leader: dict[str, str] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            if name not in self.leader:
                self.leader[name] = next((lead for t, lead in self._seen if t is x), name)
            if self.leader[name] != name:
                return
            self._seen.append((x, name))
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
                self.counts[name] = 0
            self.sums[name].addmm_(flat.T, flat)
            self.counts[name] += flat.shape[0]

        return hook

    def end_batch(self) -> None:
        self._seen.clear()  # drop the references that kept input tensors (and their identities) alive

    def hessian(self, name: str) -> torch.Tensor:
        """H = 2XXᵀ/n of linear ``name`` (after :meth:`close`); linears reading the same input share the tensor."""
        if self._handles:
            raise RuntimeError("HessianCollector.close() must be called before reading Hessians")
        return self.sums[self.leader[name]]

    def close(self) -> None:
        """Stop collecting and turn every Σxxᵀ into H = 2XXᵀ/n in place (no second copy of a c × c matrix)."""
        for h in self._handles:
            h.remove()
        if self._handles:
            for lead, total in self.sums.items():
                total.mul_(2.0 / self.counts[lead])
        self._handles = []

    def release(self, name: str) -> None:
        """``name`` is done with its H: drop it once no other linear reading the same input still needs it."""
        lead = self.leader.pop(name, None)
        if lead is not None and lead not in self.leader.values():
            del self.sums[lead]

    def hessians(self) -> dict[str, torch.Tensor]:
        """Every linear's H; linears that read the same input get the very same tensor object."""
        return {name: self.hessian(name) for name in self.leader}


def collect_hessians(
    module: nn.Module, batches: Iterable, forward: Callable[[Any], Any] | None = None
) -> dict[str, torch.Tensor]:
    """H = 2XXᵀ/n (fp32) for every ``nn.Linear`` inside ``module``, keyed by name relative to ``module``.

    Each batch is run as ``forward(batch)`` (default ``module(batch)``), so the hooked module may sit inside a
    larger model that ``forward`` calls. Linears fed the same tensor (q/k/v, gate/up) share one Hessian: the
    returned dict maps them to the identical tensor.
    """
    collector = HessianCollector(linear_modules(module))
    run = forward or module
    try:
        with torch.no_grad():
            for batch in batches:
                run(batch)
                collector.end_batch()
    finally:
        collector.close()
    return collector.hessians()




class ExpertHessianCollector:
    """Per-expert Hessians of fused mixture-of-experts modules, from the tokens the router really sends each one.

    A pre-hook on each experts module sees ``(hidden_states, top_k_index, top_k_weights)`` — the router's actual
    choice, not a guess. For expert e, ``gate_up_proj[e]`` gets Σ xxᵀ over its routed tokens, and ``down_proj[e]``
    Σ (w·h)(w·h)ᵀ over its intermediate activations h = act(gate)·up scaled by the routing weight w (the block's
    output is w·down(h), so that is the output error's Hessian). An expert routed fewer than ``min_tokens``
    tokens falls back to the pre-routing Hessian of all tokens entering the block for ``gate_up_proj`` and, in a
    second pass (:meth:`begin_fallback_pass`), to its intermediate activations over all tokens for
    ``down_proj``; :attr:`fallbacks` lists them.
    """

    def __init__(self, experts: dict[str, nn.Module], min_tokens: int):
        self.experts, self.min_tokens = experts, min_tokens
        self.stats: dict[str, dict[str, Any]] = {}
        self.fallbacks: dict[str, dict[int, int]] = {}  # module -> {expert: routed tokens}
        self._fallback_pass = False
        self._handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name, m in experts.items()]

    def _hook(self, name: str):
        def hook(module, args, kwargs):
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
            hidden, index, weights = values[:3]
            experts, dim = module.gate_up_proj.shape[0], module.gate_up_proj.shape[2]
            x = hidden.detach().reshape(-1, dim).float()
            st = self.stats.get(name)
            if st is None:
                inter = module.down_proj.shape[2]
                st = self.stats[name] = {
                    "gu": torch.zeros(experts, dim, dim, device=x.device), "n": [0] * experts,
                    "dn": torch.zeros(experts, inter, inter, device=x.device),
                    "shared": torch.zeros(dim, dim, device=x.device), "shared_n": 0, "dn_all": {}, "dn_all_n": 0,
                }
            if self._fallback_pass:
                for e in self.fallbacks.get(name, {}):
                    h = self._intermediate(module, e, x)
                    st["dn_all"][e] = st["dn_all"].get(e, 0) + h.T @ h
                st["dn_all_n"] += x.shape[0]
                return
            st["shared"].addmm_(x.T, x)
            st["shared_n"] += x.shape[0]
            for e in range(experts):
                tok, pos = torch.where(index.reshape(x.shape[0], -1) == e)
                if len(tok) == 0:
                    continue
                xe = x[tok]
                st["gu"][e].addmm_(xe.T, xe)
                st["n"][e] += len(tok)
                h = self._intermediate(module, e, xe) * weights.reshape(x.shape[0], -1)[tok, pos].float()[:, None]
                st["dn"][e].addmm_(h.T, h)

        return hook

    @staticmethod
    def _intermediate(module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = nn.functional.linear(x, module.gate_up_proj[expert].float()).chunk(2, dim=-1)
        return (module.act_fn(gate) * up).float()

    def begin_fallback_pass(self) -> bool:
        """Mark experts with too few routed tokens; True if a second pass over the batches is needed."""
        for name, st in self.stats.items():
            few = {e: n for e, n in enumerate(st["n"]) if n < self.min_tokens}
            if few:
                self.fallbacks[name] = few
        self._fallback_pass = bool(self.fallbacks)
        return self._fallback_pass

    def hessians(self, name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(gate_up Hessians, down Hessians) of every expert of one module, each H = 2XXᵀ/n."""
        st, few = self.stats[name], self.fallbacks.get(name, {})
        gu, dn = [], []
        for e, n in enumerate(st["n"]):
            if e in few:
                gu.append(st["shared"] * (2.0 / max(1, st["shared_n"])))
                dn.append(st["dn_all"][e] * (2.0 / max(1, st["dn_all_n"])))
            else:
                gu.append(st["gu"][e] * (2.0 / n))
                dn.append(st["dn"][e] * (2.0 / n))
        return gu, dn

    def close(self) -> None:
        for h in self._handles:
            h.remove()
