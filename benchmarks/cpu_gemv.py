"""Native CPU decode GEMV (``sketchtune::lut_gemv`` on CPU) against dense and bitsandbytes NF4: one token.

Random codes and codebooks (speed does not depend on the values). For each shape, thread count, bit width and
GPR: the median time of dense ``F.linear`` in fp32 and in bf16 (Ŵ materialised once, as the dense-Ŵ cache
holds it), of bitsandbytes' NF4 ``Linear4bit`` (fp32 compute asked for; its CPU kernel converts x to bf16 and
computes in bf16), and of the native kernels straight from the packed codes: the fp32 GEMV with its AVX-512 and
AVX2 bodies, and (``bf16_gemv``) the bf16 GEMV on bf16 x where the CPU has AVX512-BF16 — the arithmetic NF4's
kernel does — plus the bytes each keeps resident.
Every method of a shape is timed round-robin in the same loop, so they share the machine's conditions; ratios
> 1 mean the kernel is faster. Against NF4 the rows also hold the ratio paired by round (``*_vs_nf4_paired``:
median, 95% interval of that median, share of rounds won): on the DRAM-bound shapes this VM's bandwidth drifts
by ±20% within a run; the per-round ratio cancels drift slower than a round, not the run-to-run spread
(repeat whole runs for that). ``--plot`` draws decode time against layer size (PNG beside the JSON).

    python benchmarks/cpu_gemv.py --threads 1 2
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine_meta, nf4_linear, write_json

from sketchtune import layout
from sketchtune.kernels import cpu_kernels

SHAPES = [(1536, 576), (576, 1536), (2048, 2048), (4096, 4096), (11008, 4096)]  # (out, in)


def interleaved_times(fns: dict, repeat: int) -> dict[str, list[float]]:
    """Seconds of every call of each function, timed round-robin (one call of each per round, so round i of
    every function ran under the same machine conditions)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def interleaved_ms(fns: dict, repeat: int) -> dict[str, float]:
    """Median ms per call of each function, timed round-robin."""
    return median_ms(interleaved_times(fns, repeat))


def paired_ratio(base: list[float], ours: list[float]) -> dict:
    """Per-round speed-up base/ours (paired by round, so a slow stretch of the VM hits both): its median, a
    distribution-free 95% interval for that median (order statistics, normal approximation to the binomial) and
    the share of rounds in which ours was faster. The medians of the two columns can disagree with this when
    the machine's speed drifts during the run; the paired ratio is the comparison that drift cannot fake."""
    r = sorted(b / o for b, o in zip(base, ours))
    n = len(r)
    half = 1.96 * n**0.5 / 2
    lo, hi = max(0, int(n / 2 - half)), min(n - 1, int(-(-(n / 2 + half) // 1)))
    return {"median": statistics.median(r), "ci95": [r[lo], r[hi]], "rounds": n,
            "faster_share": sum(x > 1 for x in r) / n}


def vs_nf4(row: dict, name: str) -> str:
    """The printed NF4 comparison of kernel ``name``: ratio of medians, then the paired median and its interval."""
    paired = row[f"{name}_vs_nf4_paired"]
    return (f", {row[name + '_vs_nf4']:.2f}x nf4, paired {paired['median']:.2f}x "
            f"[{paired['ci95'][0]:.2f}, {paired['ci95'][1]:.2f}])")


def nf4_layer(w: torch.Tensor):
    """bitsandbytes NF4 ``Linear4bit`` of ``w`` in eval mode, or None without bitsandbytes."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    return nf4_linear(lin).eval()


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["threads"] for r in rows}), figsize=(12, 4.5), squeeze=False)
    for ax, threads in zip(axes[0], sorted({r["threads"] for r in rows})):
        sel = sorted((r for r in rows if r["threads"] == threads and r["gpr"] == 1), key=lambda r: r["out"] * r["in"])
        for key, label, bits in (("dense_fp32_ms", "dense fp32", 4), ("dense_bf16_ms", "dense bf16", 4),
                                 ("nf4_ms", "bitsandbytes NF4", 4), ("avx512_ms", "sketch INT4", 4),
                                 ("avx512_ms", "sketch INT3", 3), ("avx512_ms", "sketch INT2", 2),
                                 ("bf16_gemv_ms", "sketch INT4, bf16 x", 4)):
            pts = [(r["out"] * r["in"] / 1e6, r[key]) for r in sel if r["bits"] == bits and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("weights per layer (millions)"), ax.set_ylabel("ms per token (median)")
        ax.set_title(f"one-token decode, {threads} thread{'s' if threads > 1 else ''} (GPR 1)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpr", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], metavar="OUTxIN",
                    help="layer shapes (default: SmolLM2's two MLP shapes and three Llama-sized ones)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2], choices=[2, 3, 4])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_gemv.json"))
    ap.add_argument("--plot", action="store_true", help="also write the PNG (needs matplotlib)")
    args = ap.parse_args()
    ext = cpu_kernels.extension()
    if ext is None:
        raise SystemExit("native CPU kernels could not be built here")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for out, inp in (tuple(int(v) for v in s.split("x")) for s in args.shapes):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, inp, generator=gen)
            dense = torch.randn(out, inp, generator=gen) * 0.02
            dense_bf16, x_bf16 = dense.bfloat16(), x.bfloat16()
            nf4 = nf4_layer(dense)
            for bits in args.bits:
                for gpr in args.gpr:
                    packed = layout.pack_codes(torch.randint(0, 1 << bits, (out, inp), generator=gen), bits)
                    codebook = torch.randn(out, gpr, 1 << bits, generator=gen) * 0.02
                    fns = {"dense_fp32": lambda: F.linear(x, dense), "dense_bf16": lambda: F.linear(x_bf16, dense_bf16)}
                    if nf4 is not None:
                        fns["nf4"] = lambda: nf4(x)
                    for name, isa in (("avx512", 2), ("avx2", 1)):
                        if ext.cpu_isa() >= isa:
                            fns[name] = lambda isa=isa: ext.lut_gemv(x, packed, codebook, bits, inp, isa)
                    if ext.bf16_gemv_fits(inp, gpr):
                        fns["bf16_gemv"] = lambda: ext.linear_bf16_gemv(x_bf16, packed, codebook, bits, inp)
                    with torch.no_grad():
                        times = interleaved_times(fns, args.repeat)
                    ms = median_ms(times)
                    row = {"out": out, "in": inp, "bits": bits, "gpr": gpr, "threads": threads,
                           **{f"{k}_ms": v for k, v in ms.items()},
                           "dense_fp32_bytes": dense.numel() * 4, "dense_bf16_bytes": dense.numel() * 2,
                           "nf4_bytes": dense.numel() // 2 + dense.numel() // 64 * 4 if nf4 is not None else None,
                           "sketch_bytes": packed.numel() + codebook.numel() * 4}
                    for name in ("avx512", "avx2", "bf16_gemv"):
                        if f"{name}_ms" in row:
                            for base in ("dense_fp32", "dense_bf16", "nf4"):
                                if f"{base}_ms" in row:
                                    row[f"{name}_vs_{base}"] = row[f"{base}_ms"] / row[f"{name}_ms"]
                            if "nf4" in times:
                                row[f"{name}_vs_nf4_paired"] = paired_ratio(times["nf4"], times[name])
                    rows.append(row)
                    print(f"{threads}T {out:>6}x{inp:<6} INT{bits} GPR{gpr}  fp32 {ms['dense_fp32']:7.3f}  "
                          f"bf16 {ms['dense_bf16']:7.3f}  " + (f"nf4 {ms['nf4']:7.3f}  " if "nf4" in ms else "")
                          + "  ".join(f"{n} {ms[n]:7.3f} ({row[n + '_vs_dense_fp32']:.2f}x fp32"
                                      + (vs_nf4(row, n) if "nf4" in ms else ")")
                                      for n in ("avx512", "avx2", "bf16_gemv") if n in ms), flush=True)
    write_json(args.out, {"benchmark": "cpu_gemv", "machine": machine_meta(), "repeat": args.repeat, "rows": rows})
    if args.plot:
        plot(rows, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
