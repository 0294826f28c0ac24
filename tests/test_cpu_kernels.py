"""The native CPU GEMV (``kernels/cpu/lut_gemv.cpp``) against the pure-PyTorch reference.

Random codes and codebooks are right here: what is checked is arithmetic over every layout the format allows
— bits 2/3/4, group counts that split rows into chunks evenly or not (groups straddling the 16- and 8-column
chunks, the gather path), row tails, fp32 and bf16 activations, 1…16 tokens, 1 and 2 threads, the AVX-512 and
the AVX2 bodies — and, on the bundled real model, that token-by-token decoding gives the reference's logits.
"""

from __future__ import annotations

import pytest
import torch

from sketchtune import layout
from sketchtune.kernels import cpu_kernels, ops

ext = cpu_kernels.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="native CPU kernels could not be built here")
ISAS = [i for i in (1, 2) if ext is not None and ext.cpu_isa() >= i]
SHAPES = [(1, 64), (2, 64), (4, 576), (3, 300), (8, 40), (5, 45), (1, 37), (7, 2107), (4, 2048)]


def layer(bits: int, gpr: int, inp: int, out: int = 23, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=gen)
    return layout.pack_codes(codes, bits), torch.randn(out, gpr, 1 << bits, generator=gen)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_matches_reference_everywhere(bits, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for gpr, inp in SHAPES:
            packed, codebook = layer(bits, gpr, inp, seed=gpr * inp)
            w = layout.dequantize(packed, codebook, bits, inp).double()
            for dtype in (torch.float32, torch.bfloat16):
                for tokens in (1, 2, 3, 4, 16):
                    x = torch.randn(tokens, inp).to(dtype)
                    ref = x.double() @ w.t()
                    for isa in ISAS:
                        y = ext.lut_gemv(x, packed, codebook, bits, inp, isa)
                        assert y.dtype == torch.float32 and y.shape == ref.shape
                        err = (y.double() - ref).abs().max() / ref.abs().max()
                        assert err < 1e-5, (bits, gpr, inp, dtype, tokens, isa, float(err))
    finally:
        torch.set_num_threads(before)


def test_forced_isa_and_refusals(monkeypatch):
    packed, codebook = layer(4, 1, 64)
    x = torch.randn(2, 64)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx2")
    a = cpu_kernels.lut_gemv(x, packed, codebook, 4, 64)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "auto")
    b = cpu_kernels.lut_gemv(x, packed, codebook, 4, 64)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "sse")
    with pytest.raises(ValueError, match="SKETCHTUNE_CPU_ISA"):
        cpu_kernels.isa()
    with pytest.raises(RuntimeError, match="at most 16 tokens"):
        ext.lut_gemv(torch.randn(17, 64), packed, codebook, 4, 64, 0)
    with pytest.raises(RuntimeError, match="packed row length"):
        ext.lut_gemv(torch.randn(1, 50), packed, codebook, 4, 50, 0)
    assert not cpu_kernels.handles(torch.randn(17, 64)) and not cpu_kernels.handles(torch.randn(2, 64).half())
    monkeypatch.setenv(cpu_kernels.ENABLE_ENV, "0")
    assert not cpu_kernels.handles(x)


def test_op_runs_the_native_kernel_on_cpu(monkeypatch):
    """Without Triton's interpreter, ``sketchtune::lut_gemv`` on CPU is the native kernel; opcheck passes."""
    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)
    calls = []
    real = cpu_kernels.lut_gemv
    monkeypatch.setattr(cpu_kernels, "lut_gemv", lambda *a: calls.append(1) or real(*a))
    packed, codebook = layer(3, 3, 300)
    x = torch.randn(4, 300)
    y = ops.lut_gemv(x, packed, codebook, 3, 300)
    assert calls
    torch.testing.assert_close(y, x @ layout.dequantize(packed, codebook, 3, 300).t(), rtol=1e-5, atol=1e-4)
    torch.library.opcheck(torch.ops.sketchtune.lut_gemv.default, (x, packed, codebook, 3, 300))


def test_native_decoding_gives_the_reference_logits(sketched_dir, monkeypatch):
    """Token-by-token decoding of the bundled sketched model: native GEMV logits = reference logits."""
    import sketchtune

    model, tok = sketchtune.load(sketched_dir, dtype=torch.float32)
    ids = tok("Once upon a time there was a little", return_tensors="pt").input_ids

    def decode(backend: str) -> torch.Tensor:
        monkeypatch.setenv("SKETCHTUNE_KERNELS", backend)
        past, logits = None, []
        with torch.no_grad():
            for t in range(ids.shape[1]):
                step = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
                past = step.past_key_values
                logits.append(step.logits[:, -1])
        return torch.cat(logits)

    native, reference = decode("native"), decode("reference")
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-4)
    # and no dense weight was cached for any layer
    assert all(m.dense_cache.weight is None for m in model.modules() if isinstance(m, sketchtune.SketchedLinear))


@pytest.mark.parametrize("tokens", [9, 16, 33, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decoding_runs_the_gemv_in_blocks(monkeypatch, tokens, dtype):
    """9–64 tokens (vLLM decoding many requests at once) go through the native GEMV 16 tokens at a time, with the
    reference's numbers; 65 rebuild Ŵ for one matmul."""
    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)
    calls = []
    real = cpu_kernels.lut_gemv
    monkeypatch.setattr(cpu_kernels, "lut_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    packed, codebook = layer(4, 4, 576, out=40)
    codebook = codebook.to(dtype)
    x = torch.randn(tokens, 576).to(dtype)
    y = ops.linear(x, packed, codebook, None, 4, 576)
    assert calls and max(calls) <= cpu_kernels.MAX_TOKENS and sum(calls) == tokens
    ref = x.float() @ layout.dequantize(packed, codebook, 4, 576).float().t()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=5e-2 if dtype == torch.bfloat16 else 1e-4)
    calls.clear()
    ops.linear(torch.randn(65, 576).to(dtype), packed, codebook, None, 4, 576)
    assert not calls
