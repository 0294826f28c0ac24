"""vLLM-CPU serving: a sketched SmolLM2-135M against the dense bf16 model in the same vLLM, side by side.

For each model (dense bf16, sketched INT4) a fresh vLLM engine (``tests/vllm_runner.py``'s environment: vLLM
pins its own transformers, so it runs under ``--vllm-python``) measures, on the same prompts and in one run:

* output tokens/s with 1, 8 and 32 requests submitted at once (greedy, ``--max-tokens`` each, ignoring EOS);
* time to first token (one request, one output token, median of ``--repeats``);
* the RSS of all vLLM processes; beside it, the weight bytes the engine holds, counted from the checkpoint's
  tensors in the serving dtype (the plugin keeps exactly those; the V1 worker process is out of reach).

It also checks that vLLM's greedy tokens equal ``sketchtune``'s for the sketched checkpoint (fp32, token for
token). The dense model is the GGUF dequantized by transformers and saved in bf16; the sketch is made by
``sketchtune sketch`` unless ``--sketched`` names one. Target (issue: vLLM): sketched ≥ 1.0× dense tokens/s at
1 request, ≥ 0.8× at 32, with ≤ 0.4× its weight memory.

    python benchmarks/serve.py --vllm-python .venv-serve/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _common import machine_meta, write_json

ROOT = Path(__file__).resolve().parent
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Photosynthesis is the process",
           "Question: What is 12 times 7? Answer:", "Once upon a time, in a small village,",
           "The three laws of motion are", "To make a cup of tea, first", "The most important idea in economics is"]

#: Run under the vLLM interpreter: one engine, every measurement, one ``RESULT {json}`` line on stdout.
ENGINE = r'''
import json, os, statistics, sys, time
import psutil
def main():
    from vllm import LLM, SamplingParams
    model, dtype, max_tokens, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    prompts = json.loads(sys.argv[5])
    llm = LLM(model=model, dtype=dtype, max_model_len=512, max_num_seqs=32, seed=0)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts[:4], greedy, use_tqdm=False)]
    first = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(prompts[:1], first, use_tqdm=False)  # warm-up
    ttft = []
    for _ in range(repeats):
        t = time.perf_counter(); llm.generate(prompts[:1], first, use_tqdm=False); ttft.append(time.perf_counter() - t)
    fixed = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    rate = {}
    for n in (1, 8, 32):
        batch = [prompts[i % len(prompts)] for i in range(n)]
        t = time.perf_counter(); outs = llm.generate(batch, fixed, use_tqdm=False); dt = time.perf_counter() - t
        rate[n] = sum(len(o.outputs[0].token_ids) for o in outs) / dt
    me = psutil.Process()
    rss = sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])
    print("RESULT " + json.dumps({"tokens": tokens, "ttft_s": statistics.median(ttft), "tokens_per_s": rate,
                      "rss_bytes": rss, "quantization": llm.llm_engine.model_config.quantization}), flush=True)
if __name__ == "__main__":
    main()
'''


def run_engine(python: str, model: Path, dtype: str, args) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(args.threads), "TRITON_INTERPRET": "0"}
    run = subprocess.run([python, "-c", ENGINE, str(model), dtype, str(args.max_tokens), str(args.repeats),
                          json.dumps(PROMPTS)], env=env, capture_output=True, text=True, timeout=3600)
    if run.returncode:
        raise SystemExit(f"vLLM failed on {model}:\n{run.stderr[-3000:]}")
    return json.loads(next(line for line in reversed(run.stdout.splitlines()) if line.startswith("RESULT "))[7:])


def weight_bytes(model: Path, dtype: torch.dtype) -> int:
    """Bytes of the tensors the engine holds: every checkpoint tensor in ``dtype``, packed codes as uint8.

    The plugin keeps exactly the checkpoint's tensors (codes + codebooks, no dense Ŵ), so this is the weight
    memory of either engine (vLLM's V1 workers run in another process, out of reach of a parameter count)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = st.get_slice(key)
                numel = 1
                for n in sl.get_shape():
                    numel *= n
                total += numel * (1 if sl.get_dtype() == "U8" else dtype.itemsize)
    return total


def prepare(args) -> tuple[Path, Path]:
    """(dense bf16 directory, sketched directory), made once under ``--cache``."""
    cache = Path(args.cache)
    gguf = Path(args.data_dir) / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    dense = cache / "smollm2-bf16"
    if not (dense / "config.json").is_file():
        from sketchtune.modeling import load_model

        model, tok = load_model(str(gguf), dtype=torch.bfloat16)
        model.save_pretrained(dense)
        tok.save_pretrained(dense)
    sketched = Path(args.sketched) if args.sketched else cache / f"smollm2-int4-gpr{args.gpr}-serve"
    if not (sketched / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "sketchtune", "sketch", str(gguf), "--out", str(sketched), "--bits", "4",
                        "--gpr", str(args.gpr), "--calib", str(Path(args.data_dir) / "c4" / "c4_sample_1000.jsonl"),
                        "--dtype", "bfloat16", "--threads", str(args.threads)], check=True)
    return dense, sketched


def reference_tokens(sketched: Path) -> list[list[int]]:
    """``sketchtune``'s own greedy tokens for the first four prompts (fp32, 16 tokens)."""
    import sketchtune

    model, tok = sketchtune.load(sketched, dtype=torch.float32)
    model.eval()
    out = []
    for prompt in PROMPTS[:4]:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out.append(model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=os.environ.get("SKETCHTUNE_VLLM_PYTHON", ".venv-serve/bin/python"))
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--sketched", default=None, help="a sketched SmolLM2 directory (default: sketch one)")
    ap.add_argument("--gpr", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=str(ROOT / "cache"))
    ap.add_argument("--out", default=str(ROOT / "results" / "serve_cpu.json"))
    args = ap.parse_args()
    dense, sketched = prepare(args)
    rows = {"dense-bf16": run_engine(args.vllm_python, dense, "bfloat16", args),
            "sketch-int4": run_engine(args.vllm_python, sketched, "bfloat16", args)}
    rows["dense-bf16"]["weight_bytes"] = weight_bytes(dense, torch.bfloat16)
    rows["sketch-int4"]["weight_bytes"] = weight_bytes(sketched, torch.bfloat16)
    exact = run_engine(args.vllm_python, sketched, "float32", args)["tokens"]
    same = [a == b for a, b in zip(exact, reference_tokens(sketched))]
    d, s = rows["dense-bf16"], rows["sketch-int4"]
    ratios = {"tokens_per_s": {n: s["tokens_per_s"][n] / d["tokens_per_s"][n] for n in d["tokens_per_s"]},
              "ttft": s["ttft_s"] / d["ttft_s"], "weight_bytes": s["weight_bytes"] / d["weight_bytes"],
              "rss": s["rss_bytes"] / d["rss_bytes"]}
    write_json(args.out, {"benchmark": "serve_cpu", "settings": {k: v for k, v in vars(args).items() if k != "out"},
                          "machine": machine_meta(), "sketched": str(sketched), "rows": rows, "ratios": ratios,
                          "fp32_tokens_equal_sketchtune": same})
    print(f"{'model':<12} {'tok/s@1':>8} {'@8':>8} {'@32':>8} {'TTFT ms':>8} {'weights MiB':>12} {'RSS MiB':>8}")
    for name, r in rows.items():
        t = r["tokens_per_s"]
        print(f"{name:<12} {t['1']:>8.1f} {t['8']:>8.1f} {t['32']:>8.1f} {r['ttft_s'] * 1e3:>8.1f} "
              f"{r['weight_bytes'] / 2**20:>12.1f} {r['rss_bytes'] / 2**20:>8.0f}")
    print(f"ratios sketch/dense: {json.dumps(ratios)}; fp32 greedy tokens equal sketchtune's: {same}")


if __name__ == "__main__":
    main()
