"""Native CPU kernels with several tokens at once (vLLM decoding concurrent requests, short prompts), bf16.

Random codes and codebooks (speed does not depend on the values). For each shape, token count, bit width and GPR:
the median time of the dense bf16 ``F.linear`` (Ŵ held in bf16, torch's oneDNN GEMM) and of the sketch layer's
inference path as the model and the vLLM plug-in call it (``sketchtune.kernels.ops.linear_forward``: the LUT GEMV
up to 4 tokens (3 with AMX), then the AMX kernel up to 64 where the CPU has AMX, else the batched AVX512-BF16
kernel up to 32, bf16 tiles beyond), timed round-robin in one loop so
both share the machine's conditions. Ratio < 1: the sketch is faster. Bytes resident beside each.

    python benchmarks/cpu_batched.py --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine_meta, write_json
from cpu_gemv import interleaved_ms

from sketchtune import layout
from sketchtune.kernels import cpu_kernels, ops

SHAPES = [(1536, 576), (576, 1536), (2048, 2048), (4096, 4096)]  # (out, in)
TOKENS = [1, 4, 8, 16, 32, 64, 128]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--gpr", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_batched.json"))
    args = ap.parse_args()
    if cpu_kernels.extension() is None:
        raise SystemExit("native CPU kernels could not be built here")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for out, inp in SHAPES:
            gen = torch.Generator().manual_seed(0)
            dense = (torch.randn(out, inp, generator=gen) * 0.02).bfloat16()
            for bits in args.bits:
                for gpr in args.gpr:
                    packed = layout.pack_codes(torch.randint(0, 1 << bits, (out, inp), generator=gen), bits)
                    codebook = torch.randn(out, gpr, 1 << bits, generator=gen) * 0.02
                    for tokens in args.tokens:
                        x = torch.randn(tokens, inp, generator=gen).bfloat16()
                        fns = {"dense_bf16": lambda: F.linear(x, dense),
                               "sketch": lambda: ops.linear_forward(x, packed, codebook, None, bits, inp)}
                        with torch.no_grad():
                            ms = interleaved_ms(fns, args.repeat)
                        kernel = cpu_kernels.kernel_for(tokens, x.dtype, inp)
                        row = {"out": out, "in": inp, "bits": bits, "gpr": gpr, "tokens": tokens, "threads": threads,
                               "kernel": kernel, "dense_bf16_ms": ms["dense_bf16"], "sketch_ms": ms["sketch"],
                               "time_vs_dense_bf16": ms["sketch"] / ms["dense_bf16"],
                               "dense_bf16_bytes": dense.numel() * 2,
                               "sketch_bytes": packed.numel() + codebook.numel() * 4}
                        rows.append(row)
                        print(f"{threads}T {out:>5}x{inp:<5} INT{bits} GPR{gpr} {tokens:>4} tok  dense bf16 "
                              f"{ms['dense_bf16']:7.3f} ms  sketch {ms['sketch']:7.3f} ms ({kernel})  "
                              f"time {row['time_vs_dense_bf16']:.2f}x", flush=True)
    write_json(args.out, {"benchmark": "cpu_batched", "machine": machine_meta(), "repeat": args.repeat,
                          "rows": rows})


if __name__ == "__main__":
    main()
