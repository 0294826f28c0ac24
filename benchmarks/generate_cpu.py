"""End-to-end CPU generation on SmolLM2-135M: the sketched model against dense fp32, dense bf16 and bnb NF4.

What ``sketchtune generate`` does (``model.generate``, greedy), timed for ``--new-tokens`` tokens after a short
warm-up, each variant in a fresh child process so that its memory is its own: resident memory (RSS from the OS)
after loading, the peak RSS during the timed generation, and the bytes of the weights held. Variants run
round-robin for ``--rounds`` rounds; the medians are reported with ratios against dense fp32 and bf16. Sketched
models run on the default CPU path (the C++ kernels, no dense-Ŵ cache); ``sketch+cache`` is the same checkpoint
with the opt-in dense-Ŵ cache; ``sketch-bf16`` the same checkpoint loaded in bf16 (its one-token layers on the bf16
GEMV where the CPU has AVX512-BF16; not in the default list); ``sketch-emb`` is ``--sketched-embeddings``, the
sketch with its token embedding / LM head sketched too (``--sketch-embeddings``; pass the pair made from one
decoder sketch, as ``benchmarks/serve.py``'s cache holds). ``llama.cpp`` runs the GGUF file itself (Q4_1) through
``llama-cpp-python`` at the same thread count: the reference for what a CPU runtime reaches.

    python benchmarks/generate_cpu.py --data-dir ../shared/data --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from _common import PeakRSS, machine_meta, to_nf4, write_json

GGUF = "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The history of the printing press begins"
MiB = 2**20


def llama_cpp_child(args) -> dict:
    """llama.cpp (``llama-cpp-python``) on the GGUF file itself (Q4_1): what a CPU runtime reaches."""
    from llama_cpp import Llama

    base = psutil.Process().memory_info().rss
    # n_batch=1: llama-cpp-python 0.3.36 built here (AVX-512) segfaults evaluating a multi-token prompt in one
    # batch; one token at a time changes only the 7-token prompt's evaluation, not the decoding timed here.
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024,
                n_batch=1, seed=0, verbose=False)
    loaded = psutil.Process().memory_info().rss
    no_eos = {llm.token_eos(): -1e9}  # exactly --new-tokens tokens, as min_new_tokens does for the others
    llm(PROMPT, max_tokens=8, temperature=0.0, logit_bias=no_eos)
    warm = psutil.Process().memory_info().rss
    with PeakRSS(0.01) as peak:
        t0 = time.perf_counter()
        out = llm(PROMPT, max_tokens=args.new_tokens, temperature=0.0, logit_bias=no_eos)
        seconds = time.perf_counter() - t0
    new = out["usage"]["completion_tokens"]
    return {"variant": "llama.cpp", "tokens": new, "seconds": seconds, "tokens_per_s": new / seconds,
            "rss_loaded_mb": (loaded - base) / MiB, "rss_after_warmup_mb": (warm - base) / MiB,
            "peak_rss_generating_mb": (peak.peak - base) / MiB, "weight_bytes": os.path.getsize(args.model),
            "dense_cache_bytes": 0, "text": out["choices"][0]["text"][:200]}


def child(args) -> dict:
    """Load one variant, generate, and report speed and memory (runs in its own process)."""
    torch.set_num_threads(args.threads)
    if args._child == "llama.cpp":
        return llama_cpp_child(args)
    import sketchtune
    from sketchtune.modeling import load_model

    base = psutil.Process().memory_info().rss
    variant = args._child
    if variant.startswith("sketch"):
        if variant == "sketch+cache":
            os.environ["SKETCHTUNE_KERNELS"] = "cache"
        path = args.sketched_embeddings if variant == "sketch-emb" else args.sketched
        model, tok = sketchtune.load(path, dtype=torch.bfloat16 if variant == "sketch-bf16" else torch.float32)
    else:
        model, tok = load_model(args.model, dtype=torch.bfloat16 if variant == "dense-bf16" else torch.float32)
        if variant == "nf4":
            model = to_nf4(model)
    model.eval().requires_grad_(False)
    loaded = psutil.Process().memory_info().rss
    ids = tok(PROMPT, return_tensors="pt").input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = dict(do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=8, min_new_tokens=8, **gen)  # warm-up (and the cache, if any)
        warm = psutil.Process().memory_info().rss
        with PeakRSS(0.01) as peak:
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **gen)
            seconds = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    cache = sum(m.dense_cache.weight.numel() * m.dense_cache.weight.element_size() for m in model.modules()
                if isinstance(m, sketchtune.SketchedLinear) and m.dense_cache.weight is not None)
    return {"variant": variant, "tokens": new, "seconds": seconds, "tokens_per_s": new / seconds,
            "rss_loaded_mb": (loaded - base) / MiB, "rss_after_warmup_mb": (warm - base) / MiB,
            "peak_rss_generating_mb": (peak.peak - base) / MiB, "weight_bytes": weights, "dense_cache_bytes": cache,
            "text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)[:200]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--model", default=None, help=f"dense model (default: DATA_DIR/{GGUF})")
    p.add_argument("--sketched", default="benchmarks/cache/smollm2-int4-gpr1",
                   help="sketched checkpoint of --model (sketched INT4 GPR1 on 32 x 512 C4 if missing)")
    p.add_argument("--sketched-embeddings", default="benchmarks/cache/smollm2-int4-gpr1-emb",
                   help="the same sketch with --sketch-embeddings (made like --sketched if missing)")
    p.add_argument("--variants", default="dense-fp32,dense-bf16,nf4,sketch,sketch-emb,sketch+cache,llama.cpp",
                   help="llama.cpp needs llama-cpp-python (skipped with a note without it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_cpu.json"))
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or str(Path(args.data_dir) / GGUF)
    if args._child:
        print(json.dumps(child(args)))
        return
    variants = args.variants.split(",")
    for path, extra in ((args.sketched, []), (args.sketched_embeddings, ["--sketch-embeddings"])):
        if (extra and "sketch-emb" not in variants) or (Path(path) / "config.json").is_file():
            continue
        subprocess.run([sys.executable, "-m", "sketchtune", "sketch", args.model, "--bits", "4", "--gpr", "1",
                        "--calib", str(Path(args.data_dir) / "c4" / "c4_sample_1000.jsonl"), "--nsamples", "32",
                        "--seqlen", "512", "--out", path, "--eval-windows", "1", *extra], check=True)
    if "llama.cpp" in variants and importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python is not installed: no llama.cpp row (pip install llama-cpp-python)")
        variants.remove("llama.cpp")
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, "--_child", v, "--model", args.model, "--sketched", args.sketched,
                   "--sketched-embeddings", args.sketched_embeddings,
                   "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if res.returncode:
                raise SystemExit(f"{v} failed:\n{res.stderr[-3000:]}")
            runs[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"round {r} {v}: {runs[v][-1]['tokens_per_s']:.1f} tok/s", flush=True)
    rows = []
    for v, rs in runs.items():
        row = {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "rss_loaded_mb",
               "rss_after_warmup_mb", "peak_rss_generating_mb")}
        rows.append({"variant": v, **row, "weight_bytes": rs[0]["weight_bytes"],
                     "dense_cache_bytes": rs[0]["dense_cache_bytes"], "tokens": rs[0]["tokens"],
                     "text": rs[0]["text"], "runs": rs})
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("dense-fp32", "dense-bf16"):
            if base in by:
                r[f"speed_vs_{base}"] = r["tokens_per_s"] / by[base]["tokens_per_s"]
                r[f"weights_vs_{base}"] = r["weight_bytes"] / by[base]["weight_bytes"]
    write_json(args.out, {"benchmark": "generate_cpu", "machine": {**machine_meta(), "threads": args.threads},
                          "model": os.path.basename(args.model), "sketched": args.sketched,
                          "sketched_embeddings": args.sketched_embeddings,
                          "new_tokens": args.new_tokens, "rounds": args.rounds, "prompt": PROMPT, "rows": rows})
    print(f"\n{'variant':<14}{'tok/s':>8}{'vs fp32':>9}{'vs bf16':>9}{'weights MiB':>13}{'RSS loaded':>12}"
          f"{'peak gen':>10}")
    for r in rows:
        print(f"{r['variant']:<14}{r['tokens_per_s']:>8.1f}{r.get('speed_vs_dense-fp32', float('nan')):>9.2f}"
              f"{r.get('speed_vs_dense-bf16', float('nan')):>9.2f}{r['weight_bytes'] / MiB:>13.1f}"
              f"{r['rss_loaded_mb']:>12.0f}{r['peak_rss_generating_mb']:>10.0f}")


if __name__ == "__main__":
    main()
