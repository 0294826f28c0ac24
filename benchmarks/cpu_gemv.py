"""Native CPU decode GEMV (``sketchtune::lut_gemv`` on CPU) against dense ``F.linear``: one token, side by side.

Random codes and codebooks (speed does not depend on the values). For each shape and bit width: median time
of dense fp32 ``F.linear`` (Ŵ materialised once, as the dense-Ŵ cache holds it), and of the native kernel
straight from the packed codes with its AVX-512 and AVX2 bodies, plus the bytes each keeps resident (dense
fp32 Ŵ vs packed codes + fp32 codebooks). Ratios > 1 mean the kernel is faster. Run side by side in one
process; absolute times on a shared machine are noisy, ratios less so.

    python benchmarks/cpu_gemv.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine_meta, write_json

from sketchtune import layout
from sketchtune.kernels import cpu_kernels

SHAPES = [(2048, 2048), (4096, 4096), (11008, 4096), (1536, 576), (576, 1536)]  # (out, in)


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_gemv.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ext = cpu_kernels.extension()
    if ext is None:
        raise SystemExit("native CPU kernels could not be built here")
    rows = []
    for out, inp in SHAPES:
        for bits in (4, 3, 2):
            gen = torch.Generator().manual_seed(0)
            packed = layout.pack_codes(torch.randint(0, 1 << bits, (out, inp), generator=gen), bits)
            codebook = torch.randn(out, 1, 1 << bits, generator=gen)
            w = layout.dequantize(packed, codebook, bits, inp)
            x = torch.randn(1, inp, generator=gen)
            row = {"out": out, "in": inp, "bits": bits, "gpr": 1, "threads": args.threads,
                   "dense_fp32_ms": median_ms(lambda: F.linear(x, w), args.repeat),
                   "dense_bytes": w.numel() * 4, "sketch_bytes": packed.numel() + codebook.numel() * 4}
            for name, isa in (("avx512", 2), ("avx2", 1)):
                if ext.cpu_isa() >= isa:
                    row[f"{name}_ms"] = median_ms(lambda: ext.lut_gemv(x, packed, codebook, bits, inp, isa),
                                                  args.repeat)
                    row[f"{name}_speedup"] = row["dense_fp32_ms"] / row[f"{name}_ms"]
            rows.append(row)
            print(f"{out:>6}x{inp:<6} INT{bits}  dense {row['dense_fp32_ms']:7.3f} ms  "
                  + "  ".join(f"{n} {row[n + '_ms']:7.3f} ms ({row[n + '_speedup']:.2f}x)"
                              for n in ("avx512", "avx2") if n + "_ms" in row)
                  + f"  bytes {row['sketch_bytes'] / row['dense_bytes']:.3f}x")
    write_json(args.out, {"benchmark": "cpu_gemv", "machine": machine_meta(), "rows": rows})


if __name__ == "__main__":
    main()
