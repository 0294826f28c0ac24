"""Efficiency on CPU: decode latency, TTFT, training step time and memory; sketching speed (issue #4).

What runs, all in this one invocation so the variants share the machine's conditions:

* **layers** — one token through a single layer at SmolLM2/Llama shapes: ``nn.Linear`` vs ``SketchedLinear``
  under the CPU strategies considered for decoding (the C++ GEMV from the packed codes that is the default,
  the opt-in dense-Ŵ cache, the reference unpack on every call, cached codes + gather, ``torch.compile`` of
  dequantize + GEMV);
* **model** — a randomly initialised ``LlamaForCausalLM`` (default 4 decoder layers, hidden 1024, MLP 2816,
  16 heads, vocab 4096 so the LM head does not drown the decoder layers), fp32, as (a) dense, (b) LoRA r=16
  on all seven projections, unmerged (peft), (d) SketchTune INT4 GPR 1 and GPR 4 with random codes and
  codebooks (``SketchedLinear.from_codes``; speed does not depend on the values). Timings are medians over
  rounds that interleave the variants, single-threaded by default (``--threads``). Peak training memory is
  the polled peak RSS, above the post-import baseline, of a fresh child process that builds one variant and
  runs two AdamW steps (so variants do not pollute each other's peak). GPR 1 training is also measured
  through the reference autograd (gather: saves Ŵ and int64 indices per layer) for comparison with the CPU
  default, ``sketchtune::linear`` on the tiled C++ kernels (nothing per weight saved for the backward).
  (c) QLoRA is LoRA r=16 (peft) over bitsandbytes NF4 ``Linear4bit`` projections, which bitsandbytes ≥ 0.45
  runs on CPU;
* **sketch speed** — ``sketch_weight`` (INT4; GPR 1/4; refit on/off) on 4096×4096 and 11008×4096 random
  weights with a random SPD Hessian, timed on two row subsets and extrapolated linearly in rows (every
  stage of Algorithm 1 and of the refit is linear in rows at fixed columns; the Cholesky is the intercept),
  then to a 7B model: 32 layers × (4 × 4096² + 3 × 11008×4096), with one full 4096² run as a check.
  Calibration forward passes are not included, and Llama's down_proj (in = 11008) is costed as 11008×4096.

    python benchmarks/efficiency.py                      # ~8 min on a shared 2-core machine
    python benchmarks/efficiency.py --skip-sketch-speed --layers 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import torch
import torch.nn.functional as F
from _common import cpu_model, to_nf4, write_json
from torch import nn

from sketchtune.kernels import BACKEND_ENV
from sketchtune.kernels.ops import CODEBOOK_GRAD_ENV
from sketchtune.layout import unpack_codes
from sketchtune.sketched_linear import SketchedLinear, dequantize

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["dense", "lora", "qlora", "sketchtune-int4-gpr1", "sketchtune-int4-gpr4"]
REF_PATH_VARIANT, REF_PATH = "sketchtune-int4-gpr1", "sketchtune-int4-gpr1 via the reference autograd"
#: The same sketch with SKETCHTUNE_CODEBOOK_GRAD=bf16: the codebook gradient's dYᵀX from bf16-rounded dY and x.
BF16_GRAD = "sketchtune-int4-gpr1, dYᵀX in bf16"
#: The floor of a codebook-training step: the dense model computing ∂L/∂W (dYᵀX) for every decoder-layer
#: projection, as any method training something per weight must, with no optimizer step. A sketch step does
#: that GEMM (then bins it into codebooks) where LoRA does not, so LoRA × (floor / LoRA) is the least it can cost.
GRAD_FLOOR = "dense, decoder ∂L/∂W only (floor)"
LAYER_SHAPES = [(576, 1536), (1536, 576), (2048, 2048)]  # (in, out)
MiB = 2**20


# --- timing helpers ---------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def per_call_ms(fn: Callable[[], object], calls: int) -> float:
    """Median ms of ``calls`` back-to-back calls."""
    return statistics.median(timed(fn) for _ in range(calls)) * 1e3


def interleave(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each measurement over rounds that run every variant once, so drifting load hits all alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(fn())
    return {k: statistics.median(v) for k, v in samples.items()}


@contextlib.contextmanager
def env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def under_env(name: str, value: str, step: Callable[[], float]) -> Callable[[], float]:
    """``step`` run with the environment variable ``name`` set to ``value`` (restored after each call), so that
    one interleaved loop can time the same model under two kernel choices."""
    def run() -> float:
        with env(name, value):
            return step()

    return run


# --- single-layer decode: the CPU strategy choice ---------------------------------------------------------


def random_sketched(lin: nn.Linear, bits: int, gpr: int, gen: torch.Generator) -> SketchedLinear:
    """A SketchedLinear of ``lin``'s shape with random codes and sorted codebooks at the weight's scale."""
    out, inp = lin.weight.shape
    std = lin.weight.detach().std()
    codebook = torch.randn(out, gpr, 2**bits, generator=gen).sort(dim=-1).values * std
    codes = torch.randint(0, 2**bits, (out, inp), generator=gen)
    return SketchedLinear.from_codes(codebook, codes, bits, bias=None if lin.bias is None else lin.bias.detach())


def bench_layers(args) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for inp, out in LAYER_SHAPES:
        for gpr in (1, 4):
            dense = nn.Linear(inp, out, bias=False)
            sk = random_sketched(dense, 4, gpr, gen).eval()
            x = torch.randn(1, 1, inp)
            index = unpack_codes(sk.weight, 4, inp) + (torch.arange(inp) // (inp // gpr)) * 16
            flat_cb = sk.codebook.detach().reshape(out, -1)

            sk_cached = copy.deepcopy(sk)  # its own cache: the native calls on ``sk`` would drop it

            def reference():
                with env(BACKEND_ENV, "reference"):
                    return sk(x)

            def cached():
                with env(BACKEND_ENV, "cache"):
                    return sk_cached(x)

            strategies: dict[str, Callable[[], object]] = {
                "dense nn.Linear": lambda: dense(x),
                "native C++ GEMV (default)": lambda: sk(x),
                "cached dense W (opt-in)": cached,
                "reference (unpack every call)": reference,
            }
            extra = {}
            if not args.skip_strategies:
                strategies["cached codes + gather"] = lambda: F.linear(x, flat_cb.gather(1, index))
                compiled = torch.compile(lambda v: F.linear(v, dequantize(sk.weight, sk.codebook, 4, inp)))
                with torch.no_grad():
                    extra["compile_s"] = round(timed(lambda: compiled(x)), 2)
                strategies["torch.compile(dequantize + GEMV)"] = lambda: compiled(x)
            with torch.no_grad():
                for fn in strategies.values():  # warm up (and build the cache)
                    fn()
                ms = interleave({k: (lambda f=f: per_call_ms(f, args.layer_calls)) for k, f in strategies.items()},
                                args.rounds)
            row = {"in": inp, "out": out, "gpr": gpr, "ms_per_token": {k: round(v, 4) for k, v in ms.items()},
                   "native_speedup_vs_dense": round(ms["dense nn.Linear"] / ms["native C++ GEMV (default)"], 3),
                   "cached_speedup_vs_dense": round(ms["dense nn.Linear"] / ms["cached dense W (opt-in)"], 3),
                   **extra}
            rows.append(row)
            print(f"  layer {inp}->{out} gpr{gpr}: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)
    return rows


# --- model variants ---------------------------------------------------------------------------------------


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.mlp, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )


def build(variant: str, args) -> nn.Module:
    """One variant with its trainable parameters set as fine-tuning would: all / LoRA / codebooks."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(args)).float()
    if variant == "dense":
        return model
    if variant in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if variant == "qlora":
            to_nf4(model)
        cfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                         target_modules=PROJECTIONS)
        return get_peft_model(model, cfg)
    gpr = int(variant.rsplit("gpr", 1)[1])
    gen = torch.Generator().manual_seed(1)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for name, lin in list(layer.named_modules()):
            if isinstance(lin, nn.Linear):
                parent, _, child = name.rpartition(".")
                setattr(layer.get_submodule(parent), child, random_sketched(lin, 4, gpr, gen))
    for m in model.modules():
        if isinstance(m, SketchedLinear):
            m.codebook.requires_grad_(True)
    return model


def count(model: nn.Module) -> dict:
    params = list(model.parameters())
    cache = sum(m.dense_cache.weight.numel() * m.dense_cache.weight.element_size()
                for m in model.modules() if isinstance(m, SketchedLinear) and m.dense_cache.weight is not None)
    return {
        "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "decode_cache_bytes": cache,
    }


def decode_step_s(model: nn.Module, batch: int, args) -> float:
    """Seconds per decode step (one new token for each of ``batch`` sequences) after a short prefill."""
    ids = torch.randint(0, args.vocab, (batch, args.decode_prompt))
    # transformers 5.x renamed forward's ``past_key_values`` and the output's field to ``cache`` (the old names
    # warn until 5.40); a peft wrapper's forward takes **kwargs, so ask the model it wraps
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_kw = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past, nxt = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            out = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{cache_kw: past})
            past, nxt = getattr(out, cache_kw), out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t0) / args.decode_steps


def ttft_s(model: nn.Module, prompt: int, args) -> float:
    ids = torch.randint(0, args.vocab, (1, prompt))
    with torch.no_grad():
        return timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))


def make_train_step(model: nn.Module, args, optimize: bool = True) -> Callable[[], float]:
    """Seconds of one step on a fixed batch; ``optimize=False`` times forward + backward only (no AdamW)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5) if optimize else None
    ids = torch.randint(0, args.vocab, (1, args.train_seq), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        model.train()
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
        return time.perf_counter() - t0

    return step


class PeakRSS:
    """Polls this process's resident memory from a thread; ``peak`` is the largest value seen (bytes).

    Polling, not ``ru_maxrss``: the latter would report the import-time peak of transformers for small models.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def memory_probe(variant: str, args) -> dict:
    """In a fresh process: RSS of the built model, and the peak RSS over two training steps, above imports."""
    import peft  # noqa: F401  (imported before the baseline so every variant pays the same)
    import transformers  # noqa: F401

    base = psutil.Process().memory_info().rss
    model = build(variant, args)  # sketched variants are converted from a dense model: freed again here
    built = psutil.Process().memory_info().rss
    step = make_train_step(model, args)
    with PeakRSS() as peak:
        step(), step()
    return {"rss_model_mb": (built - base) / MiB, "train_peak_above_imports_mb": (peak.peak - base) / MiB}


def probe_in_child(variant: str, args, extra_env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--_probe", variant, "--layers", str(args.layers), "--hidden", str(args.hidden),
           "--mlp", str(args.mlp), "--heads", str(args.heads), "--vocab", str(args.vocab),
           "--train-seq", str(args.train_seq), "--lora-rank", str(args.lora_rank), "--threads", str(args.threads)]
    # A fixed mmap threshold: glibc's adaptive one would keep freed tensors (the dense weights a sketched
    # variant is converted from) resident, and RSS would count them.
    child_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", **(extra_env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=child_env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_model(args) -> dict:
    models = {v: build(v, args) for v in VARIANTS}
    for m in models.values():
        m.eval()
    results: dict[str, dict] = {v: count(m) for v, m in models.items()}
    sketched = [v for v in VARIANTS if v.startswith("sketchtune")]
    cached_models = {v: copy.deepcopy(models[v]) for v in sketched}  # own caches, never dropped by the others

    def cached(fn: Callable[[], float]) -> Callable[[], float]:
        """``fn`` with the opt-in dense-Ŵ cache instead of the C++ kernels."""
        def run() -> float:
            with env(BACKEND_ENV, "cache"):
                return fn()
        return run

    for batch in (1, 8):
        print(f"  decode batch {batch} ...", flush=True)
        fns = {v: (lambda m=m: decode_step_s(m, batch, args)) for v, m in models.items()}
        fns.update({f"{v} cache": cached(lambda m=cached_models[v]: decode_step_s(m, batch, args)) for v in sketched})
        r = interleave(fns, args.rounds)
        for v in VARIANTS:
            results[v][f"decode_b{batch}_ms_per_step"] = r[v] * 1e3
            results[v][f"decode_b{batch}_tokens_per_s"] = batch / r[v]
        for v in sketched:
            results[v][f"decode_b{batch}_ms_per_step_cache"] = r[f"{v} cache"] * 1e3
    for v, m in models.items():  # the caches built while decoding (none on the C++ kernels)
        results[v]["decode_cache_bytes"] = count(m)["decode_cache_bytes"]
    for v, m in cached_models.items():
        results[v]["decode_cache_bytes_opt_in"] = count(m)["decode_cache_bytes"]
    sk = models["sketchtune-int4-gpr1"]
    with env(BACKEND_ENV, "reference"):  # the pure-PyTorch reference, unpacking every call (few steps: slow)
        quick = argparse.Namespace(**{**vars(args), "decode_steps": 2})
        for batch in (1, 8):
            results["sketchtune-int4-gpr1"][f"decode_b{batch}_ms_per_step_uncached"] = \
                decode_step_s(sk, batch, quick) * 1e3
    for prompt in args.prompts:
        print(f"  TTFT prompt {prompt} ...", flush=True)
        fns = {v: (lambda m=m: ttft_s(m, prompt, args)) for v, m in models.items()}
        fns.update({f"{v} cache": cached(lambda m=cached_models[v]: ttft_s(m, prompt, args)) for v in sketched})
        r = interleave(fns, args.rounds)
        for v in VARIANTS:
            results[v][f"ttft_{prompt}_ms"] = r[v] * 1e3
        for v in sketched:
            results[v][f"ttft_{prompt}_ms_cache"] = r[f"{v} cache"] * 1e3
    del cached_models
    print("  training steps ...", flush=True)
    # bitsandbytes 0.50 repacks Linear4bit weights for its CPU inference kernel on the first eval-mode forward
    # and never unpacks them; backward through that kernel then skips the base layers (a step that is too
    # cheap). Train a QLoRA model that has never run in eval mode.
    models["qlora"] = build("qlora", args)
    steps = {v: make_train_step(m, args) for v, m in models.items()}
    # Not the CPU default since the tiled C++ kernels, measured for comparison: the reference autograd
    # (gather), which saves Ŵ and an int64 index per weight for the backward where sketchtune::linear
    # saves only x, the codes and the codebook and walks Ŵ in row tiles.
    steps[REF_PATH] = under_env(BACKEND_ENV, "reference", make_train_step(models[REF_PATH_VARIANT], args))
    steps[BF16_GRAD] = under_env(CODEBOOK_GRAD_ENV, "bf16", make_train_step(models[REF_PATH_VARIANT], args))
    floor_model = build("dense", args)
    floor_model.requires_grad_(False)
    for layer in floor_model.model.layers:
        for lin in layer.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.requires_grad_(True)
    steps[GRAD_FLOOR] = make_train_step(floor_model, args, optimize=False)
    for s in steps.values():
        s()  # warm-up: optimizer state allocation, first-call overheads
    r = interleave(steps, args.rounds)
    for v in VARIANTS:
        results[v]["train_step_s"] = r[v]
    results[REF_PATH_VARIANT]["train_step_s_reference"] = r[REF_PATH]
    results[REF_PATH_VARIANT]["train_step_s_bf16_codebook_grad"] = r[BF16_GRAD]
    results["dense"]["train_step_s_grad_floor"] = r[GRAD_FLOOR]
    del models, steps
    print("  peak training memory (one child process per variant) ...", flush=True)
    for v in VARIANTS:
        results[v].update(probe_in_child(v, args))
    ref = probe_in_child(REF_PATH_VARIANT, args, {BACKEND_ENV: "reference"})
    results[REF_PATH_VARIANT]["train_peak_above_imports_mb_reference"] = ref["train_peak_above_imports_mb"]
    return results


RATIO_KEYS = ["decode_b1_ms_per_step", "decode_b8_ms_per_step", "train_step_s", "train_peak_above_imports_mb"]


def ratios(results: dict, prompts: list[int]) -> dict:
    keys = RATIO_KEYS + [f"ttft_{p}_ms" for p in prompts]
    out = {v: {f"{k}_vs_{base}": results[v][k] / results[base][k] for base in ("dense", "lora") for k in keys}
           for v in results}
    opt_in = ["decode_b1_ms_per_step", "decode_b8_ms_per_step"] + [f"ttft_{p}_ms" for p in prompts]
    for v, r in results.items():  # with the opt-in dense-Ŵ cache instead of the C++ kernels
        out[v].update({f"{k}_cache_vs_dense": r[f"{k}_cache"] / results["dense"][k]
                       for k in opt_in if f"{k}_cache" in r})
    return out


# --- sketching speed --------------------------------------------------------------------------------------


def random_spd(cols: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(cols, rank, generator=gen)
    return a @ a.t() / rank + 0.01 * torch.eye(cols)


def min_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs: other jobs on the machine only ever add time."""
    return min(timed(fn) for _ in range(repeats))


def bench_sketch(args) -> dict:
    from sketchtune.sketch.algorithm import sketch_weight

    gen = torch.Generator().manual_seed(0)
    hessian = random_spd(4096, 512, gen)
    out: dict = {"rows_timed": args.sketch_rows, "configs": []}
    per_shape: dict[tuple, float] = {}
    for rows_full, cols in [(4096, 4096), (11008, 4096)]:
        weight = torch.randn(max(args.sketch_rows), cols, generator=gen) * 0.02
        for gpr in (1, 4):
            for refit in (False, True):
                t = {r: min_time(lambda r=r: sketch_weight(weight[:r], hessian, 4, gpr, refit=refit),
                                 args.sketch_repeats) for r in args.sketch_rows}
                (r0, t0), (r1, t1) = sorted(t.items())[0], sorted(t.items())[-1]
                slope = (t1 - t0) / (r1 - r0)
                full = t0 + slope * (rows_full - r0)
                per_shape[(rows_full, cols, gpr, refit)] = full
                out["configs"].append({"shape": [rows_full, cols], "bits": 4, "gpr": gpr, "refit": refit,
                                       "timed_s": {str(r): round(s, 2) for r, s in t.items()},
                                       "extrapolated_full_s": round(full, 1)})
                print(f"  sketch {rows_full}x{cols} gpr{gpr} refit={refit}: "
                      f"{', '.join(f'{r} rows {s:.1f}s' for r, s in t.items())} -> {full:.0f}s full", flush=True)
    if not args.skip_sketch_validation:  # one full-size run against its extrapolation
        weight = torch.randn(4096, 4096, generator=gen) * 0.02
        full = timed(lambda: sketch_weight(weight, hessian, 4, 1, refit=False))
        out["validation_4096x4096_gpr1_refit_off"] = {
            "measured_s": round(full, 1), "extrapolated_s": round(per_shape[(4096, 4096, 1, False)], 1)}
        print(f"  validation 4096x4096 gpr1 refit=False: measured {full:.0f}s, "
              f"extrapolated {per_shape[(4096, 4096, 1, False)]:.0f}s", flush=True)
    out["model_7b_hours"] = {
        f"gpr{gpr}_refit_{'on' if refit else 'off'}":
            round(32 * (4 * per_shape[(4096, 4096, gpr, refit)] + 3 * per_shape[(11008, 4096, gpr, refit)]) / 3600, 2)
        for gpr in (1, 4) for refit in (False, True)
    }
    return out


# --- report -----------------------------------------------------------------------------------------------


def print_table(results: dict, rat: dict, prompts: list[int]) -> None:
    cols = [("decode b1 ms/tok", "decode_b1_ms_per_step", 1), ("decode b8 ms/step", "decode_b8_ms_per_step", 1)]
    cols += [(f"TTFT {p} ms", f"ttft_{p}_ms", 0) for p in prompts]
    cols += [("train step s", "train_step_s", 2), ("train peak MiB", "train_peak_above_imports_mb", 0)]
    head = f"{'variant':<24}" + "".join(f"{c[0]:>19}" for c in cols)
    print(head)
    for v, r in results.items():
        print(f"{v:<24}" + "".join(f"{r[k]:>19.{d}f}" for _, k, d in cols))
    for v, r in results.items():
        if "decode_b1_ms_per_step_cache" in r:
            q = rat[v]
            print(f"{v} with the opt-in dense-W cache (+{r['decode_cache_bytes_opt_in'] / MiB:.0f} MiB next to "
                  f"{r['weight_bytes'] / MiB:.0f} MiB of weights): decode b1 {r['decode_b1_ms_per_step_cache']:.1f} "
                  f"ms/tok ({q['decode_b1_ms_per_step_cache_vs_dense']:.2f}x dense), b8 "
                  f"{r['decode_b8_ms_per_step_cache']:.1f} ms/step "
                  f"({q['decode_b8_ms_per_step_cache_vs_dense']:.2f}x), "
                  + ", ".join(f"TTFT {p} {r[f'ttft_{p}_ms_cache']:.0f} ms" for p in prompts))
    r = results[REF_PATH_VARIANT]
    print(f"{REF_PATH_VARIANT} training through the reference autograd (saves Ŵ; not the CPU default): "
          f"{r['train_step_s_reference']:.2f} s/step, peak {r['train_peak_above_imports_mb_reference']:.0f} MiB")
    lora, floor = results["lora"]["train_step_s"], results["dense"]["train_step_s_grad_floor"]
    print(f"{GRAD_FLOOR}: {floor:.2f} s/step = {floor / lora:.2f}x LoRA's step (sketch GPR 1: "
          f"{results[REF_PATH_VARIANT]['train_step_s'] / lora:.2f}x; with {CODEBOOK_GRAD_ENV}=bf16: "
          f"{r['train_step_s_bf16_codebook_grad'] / lora:.2f}x)")
    for base in ("dense", "lora"):
        print(f"\nratio vs {base}")
        for v in results:
            print(f"{v:<24}" + "".join(f"{rat[v][f'{k}_vs_{base}']:>19.2f}" for _, k, _ in cols))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "efficiency_cpu.json")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--decode-prompt", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--train-seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--layer-calls", type=int, default=30)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (0: torch's default). 1 by default: on a shared CPU, OpenMP barriers make "
                        "multi-threaded timings erratic (cholesky_inverse 4096²: 1.2 s at 1 thread, 25 s at 2)")
    p.add_argument("--sketch-rows", type=int, nargs=2, default=[128, 512], help="row counts timed, then extrapolated")
    p.add_argument("--sketch-repeats", type=int, default=1, help="time each point this often, keep the fastest")
    p.add_argument("--skip-sketch-speed", action="store_true")
    p.add_argument("--skip-sketch-validation", action="store_true", help="skip the full 4096x4096 check (~40 s)")
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-strategies", action="store_true", help="layer section: only dense/cached/reference")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._probe:
        print(json.dumps(memory_probe(args._probe, args)))
        return

    report: dict = {"meta": {
        "machine": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg(),
        "model": {k: getattr(args, k) for k in ("layers", "hidden", "mlp", "heads", "vocab")} | {"dtype": "float32"},
        "lora_rank": args.lora_rank, "rounds": args.rounds, "decode_prompt": args.decode_prompt,
        "decode_steps": args.decode_steps, "train_seq": args.train_seq, "optimizer": "AdamW",
        "note": "medians over interleaved rounds; other jobs may share the CPU (see loadavg)",
    }}
    t_start = time.time()
    if not args.skip_layers:
        print("single layers, 1 token (ms):", flush=True)
        report["layers_decode_1_token"] = bench_layers(args)
    print(f"model: {args.layers} Llama decoder layers, hidden {args.hidden}, MLP {args.mlp}, {args.heads} heads",
          flush=True)
    results = bench_model(args)
    report["model"] = results
    report["ratios"] = ratios(results, args.prompts)
    if not args.skip_sketch_speed:
        print("sketching speed:", flush=True)
        report["sketch_speed"] = bench_sketch(args)
    report["meta"]["loadavg_end"] = os.getloadavg()
    report["meta"]["wall_s"] = round(time.time() - t_start, 1)
    write_json(args.out, report)
    print()
    print_table(results, report["ratios"], args.prompts)
    if "sketch_speed" in report:
        print("\n7B sketching (extrapolated, hours):", report["sketch_speed"]["model_7b_hours"])
    print(f"\nwrote {args.out} ({report['meta']['wall_s']} s)")


if __name__ == "__main__":
    main()
