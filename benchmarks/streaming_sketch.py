"""Streaming sketch of a model far larger than the memory it is sketched in: peak RSS against the model's size.

Writes a random-weight Llama (bf16 safetensors, one shard per decoder layer, untied LM head, SmolLM2's
49,152-token tokenizer) without ever holding it whole, then runs ``sketchtune sketch MODEL --stream`` on it in a
fresh process at INT4 with a few C4 calibration windows and reads that process's peak resident memory from the
OS: ``VmHWM`` of ``/proc/self/status``, written by the child as it exits (a 0.2 s ``/proc`` sampler adds a
timeline). Not ``ru_maxrss`` from ``wait4``: Linux carries a process's high-water mark across ``execve``, so a
child spawned by a parent holding 1.6 GB reports at least 1.6 GB whatever it used itself; the random model is
therefore also written by a separate process, and ``ru_maxrss`` is kept beside ``VmHWM`` as a cross-check.
Two depths of the same width are run side by side, so the table shows peak memory not growing with depth.
Random weights are fine here: what is measured is memory and time, not quality.

    python benchmarks/streaming_sketch.py --data-dir ../shared/data            # ~1.5 B and a 4-layer twin
    python benchmarks/streaming_sketch.py --layers 30 4 --threads 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from _common import machine_meta, write_json
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
TOKENIZER = ROOT.parent / "tests" / "assets" / "smollm2-135m-instruct-tokenizer"


def write_random_llama(out: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                       vocab: int, seed: int = 0) -> int:
    """A bf16 Llama checkpoint written shard by shard (never whole in memory); returns its tensor bytes."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=1, eos_token_id=2)
    with init_empty_weights():
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, torch.Size]] = {}
    for key, shape in shapes.items():
        part = key.split(".")
        group = f"layer{int(part[2]):05d}" if key.startswith("model.layers.") else "rest"
        groups.setdefault(group, {})[key] = shape
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    names = sorted(groups)
    for n, group in enumerate(names, 1):
        tensors = {}
        for key, shape in groups[group].items():
            if len(shape) == 1:  # norms
                tensors[key] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        name = f"model-{n:05d}-of-{len(names):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    config.save_pretrained(out)
    (out / "tokenizer.json").write_bytes(gzip.decompress((TOKENIZER / "tokenizer.json.gz").read_bytes()))
    shutil.copy(TOKENIZER / "tokenizer_config.json", out / "tokenizer_config.json")
    return total


#: Runs the sketchtune CLI and, on the way out, writes the process's own peak RSS (VmHWM, kB) to a file.
REPORT_PEAK = """
import atexit, os, runpy, sys
def report():
    with open('/proc/self/status') as status:
        hwm = next(line for line in status if line.startswith('VmHWM:'))
    with open(os.environ['SKETCH_BENCH_PEAK_FILE'], 'w') as out:
        out.write(hwm.split()[1])
atexit.register(report)
sys.argv = ['sketchtune', *sys.argv[1:]]
runpy.run_module('sketchtune', run_name='__main__', alter_sys=True)
"""


def write_model_in_child(*args) -> int:
    """:func:`write_random_llama` in a fresh process, so this one stays small (see the module docstring)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(write_random_llama, args)


def run_sketch(model: Path, out: Path, calib: Path, nsamples: int, seqlen: int, threads: int) -> dict:
    """``sketchtune sketch --stream`` in a child process; its wall time and peak RSS as the OS reports them."""
    peak_file = out.with_name(out.name + ".peak")
    peak_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", REPORT_PEAK, "sketch", str(model), "--stream", "--out", str(out), "--overwrite",
           "--bits", "4", "--gpr", "1", "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
           "--threads", str(threads)]
    samples: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    log = out.with_name(out.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    parent_rss = psutil.Process().memory_info().rss
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "SKETCH_BENCH_PEAK_FILE": str(peak_file)})
    stop = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not stop.wait(0.2):
            try:
                samples.append((time.perf_counter() - t0, ps.memory_info().rss))
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would mix runs)
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = log.read_text()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"sketch failed ({proc.returncode}):\n{output[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_bytes": int(peak_file.read_text()) * 1024,
            "ru_maxrss_bytes": usage.ru_maxrss * 1024, "parent_rss_at_spawn_bytes": parent_rss,
            "peak_rss_sampled_bytes": max((r for _, r in samples), default=0),
            "rss_timeline_mib": [(round(t, 1), round(r / 2**20)) for t, r in samples[:: max(1, len(samples) // 200)]],
            "summary": [line for line in output.splitlines() if line and "\r" not in line][-8:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/data", help="where c4/c4_sample_1000.jsonl is")
    ap.add_argument("--layers", type=int, nargs="+", default=[30, 4], help="depths to run (same width)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=49152, help="SmolLM2's tokenizer")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default=str(ROOT / "cache" / "streaming"))
    ap.add_argument("--keep", action="store_true", help="keep the random models and sketches (GBs)")
    ap.add_argument("--out", default=str(ROOT / "results" / "streaming_sketch.json"))
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out (other depths)")
    args = ap.parse_args()
    calib = Path(args.data_dir) / "c4" / "c4_sample_1000.jsonl"
    if not calib.is_file():
        raise SystemExit(f"calibration text not found: {calib} (pass --data-dir)")
    work = Path(args.work_dir)
    rows = []
    if args.append and Path(args.out).is_file():
        rows = [r for r in json.loads(Path(args.out).read_text())["rows"] if r["layers"] not in args.layers]
    for layers in args.layers:
        src, out = work / f"llama-{args.hidden}-{layers}L-bf16", work / f"llama-{args.hidden}-{layers}L-int4"
        t = time.perf_counter()
        shutil.rmtree(src, ignore_errors=True)
        size = write_model_in_child(src, args.hidden, args.intermediate, layers, args.heads, args.kv_heads, args.vocab)
        print(f"wrote {src} ({size / 2**30:.2f} GiB bf16, {size // 2 / 1e9:.2f} B parameters) "
              f"in {time.perf_counter() - t:.0f} s")
        result = run_sketch(src, out, calib, args.nsamples, args.seqlen, args.threads)
        on_disk = sum(f.stat().st_size for f in out.iterdir())
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip() or None
        row = {"layers": layers, "commit": commit, "parameters": size // 2, "bf16_bytes": size,
               "sketch_bytes_on_disk": on_disk,
               **result, "peak_rss_over_bf16": round(result["peak_rss_bytes"] / size, 4)}
        rows.append(row)
        print(f"{layers} layers: peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB = {row['peak_rss_over_bf16']:.3f} x "
              f"bf16 size, {row['seconds']:.0f} s")
        if not args.keep:
            shutil.rmtree(src)
            shutil.rmtree(out)
        payload = {"benchmark": "streaming_sketch", "target": "peak RSS <= 0.25 x bf16 model bytes",
                   "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "keep", "append")},
                   "machine": machine_meta(), "rows": rows}
        write_json(args.out, payload)
    print(f"\n{'layers':>6} {'params':>8} {'bf16 GiB':>9} {'peak RSS GiB':>13} {'ratio':>7} {'sketch s':>9}")
    for r in rows:
        print(f"{r['layers']:>6} {r['parameters'] / 1e9:>7.2f}B {r['bf16_bytes'] / 2**30:>9.2f} "
              f"{r['peak_rss_bytes'] / 2**30:>13.3f} {r['peak_rss_over_bf16']:>7.3f} {r['seconds']:>9.0f}")


if __name__ == "__main__":
    main()
