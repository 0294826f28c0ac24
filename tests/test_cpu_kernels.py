"""The native CPU kernels (``kernels/cpu/lut_gemv.cpp``, ``tiles.cpp``) against the pure-PyTorch reference.

Random codes and codebooks are right here: what is checked is arithmetic over every layout the format allows
— bits 2/3/4, group counts that split rows into chunks evenly or not (groups straddling the 16- and 8-column
chunks, the gather path), row tails, fp32 and bf16 activations, 1…16 tokens, 1 and 2 threads, the AVX-512 and
the AVX2 bodies — and, on the bundled real model, that token-by-token decoding gives the reference's logits.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from sketchtune import layout
from sketchtune.kernels import cpu_kernels, ops

ext = cpu_kernels.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="native CPU kernels could not be built here")
ISAS = [i for i in (1, 2) if ext is not None and ext.cpu_isa() >= i]
# (gpr, in): 16/32/64-column and wide (128/256-column) chunks, whole or with tails, straddling groups, row tails
SHAPES = [(1, 64), (2, 64), (4, 576), (3, 300), (8, 40), (5, 45), (1, 37), (7, 2107), (4, 2048), (2, 256),
          (1, 768), (1, 576), (3, 816)]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer(bits: int, gpr: int, inp: int, out: int = 23, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out, inp), generator=gen)
    return layout.pack_codes(codes, bits), torch.randn(out, gpr, 1 << bits, generator=gen)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gemv_matches_reference_everywhere(bits, threads):
    with torch_threads(threads):
        for gpr, inp in SHAPES:
            packed, codebook = layer(bits, gpr, inp, seed=gpr * inp)
            w = layout.dequantize(packed, codebook, bits, inp).double()
            for dtype in (torch.float32, torch.bfloat16):
                for tokens in (1, 2, 3, 4, 7, 16):
                    x = torch.randn(tokens, inp).to(dtype)
                    ref = x.double() @ w.t()
                    for isa in ISAS:
                        y = ext.lut_gemv(x, packed, codebook, bits, inp, isa)
                        assert y.dtype == torch.float32 and y.shape == ref.shape
                        err = (y.double() - ref).abs().max() / ref.abs().max()
                        assert err < 1e-5, (bits, gpr, inp, dtype, tokens, isa, float(err))


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


@pytest.mark.skipif((__import__("os").cpu_count() or 1) < 2, reason="one CPU core: nothing to split across")
def test_kernels_split_rows_across_torchs_threads():
    """The extension is built with OpenMP, so its at::parallel_for really runs on torch's intra-op threads
    (without -fopenmp it silently ran everything on one) and follows torch.set_num_threads."""
    for n in (1, 2):
        with torch_threads(n):
            assert ext.parallel_threads(64) == n


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


def test_inference_skips_the_op_dispatch_and_training_keeps_it(monkeypatch):
    """Without a gradient wanted, ``sketched_linear`` runs the op's body directly (no custom-op dispatch, which cost
    as much as a small layer's GEMV); with one, it goes through ``sketchtune::linear`` and its autograd."""
    from sketchtune.kernels import dispatch

    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)
    monkeypatch.setenv(dispatch.BACKEND_ENV, "auto")
    op_calls = []
    real = dispatch.linear
    monkeypatch.setattr(dispatch, "linear", lambda *a: op_calls.append(1) or real(*a))
    packed, codebook = layer(4, 2, 576, out=40)
    x = torch.randn(3, 576)
    ref = x @ layout.dequantize(packed, codebook, 4, 576).t()
    with torch.no_grad():
        y = dispatch.sketched_linear(x, packed, codebook, None, 4, 576)
    assert not op_calls
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    y = dispatch.sketched_linear(x, packed, codebook, None, 4, 576)  # grad enabled, but nothing requires it
    assert not op_calls
    trainable = codebook.clone().requires_grad_()
    y = dispatch.sketched_linear(x, packed, trainable, None, 4, 576)
    assert op_calls == [1] and y.requires_grad
    y.sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_native_decoding_gives_the_reference_logits(sketched_dir, monkeypatch):
    """Token-by-token decoding of the bundled sketched model: native GEMV logits = reference logits."""
    import sketchtune

    model, tok = sketchtune.load(sketched_dir, dtype=torch.float32)
    ids = tok("Once upon a time there was a little", return_tensors="pt").input_ids

    def decode(backend: str) -> torch.Tensor:
        monkeypatch.setenv("SKETCHTUNE_KERNELS", backend)
        past, logits = None, []
        # transformers 5.x renamed forward's ``past_key_values`` to ``cache`` (the old name warns until 5.40)
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            for t in range(ids.shape[1]):
                step = model(input_ids=ids[:, t : t + 1], use_cache=True, **{cache_kw: past})
                past = getattr(step, cache_kw)  # the output field has the same name
                logits.append(step.logits[:, -1])
        return torch.cat(logits)

    native, reference = decode("native"), decode("reference")
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-4)
    # and no dense weight was cached for any layer
    assert all(m.dense_cache.weight is None for m in model.modules() if isinstance(m, sketchtune.SketchedLinear))


def test_native_perplexity_equals_reference(sketched_dir, monkeypatch):
    """The bundled sketched model scored with the C++ kernels (prefill tile by tile, no dense-Ŵ cache) gives the
    reference's perplexity to 1e-3 relative."""
    import sketchtune
    from sketchtune.eval.perplexity import perplexity

    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)  # not Triton's interpreter, if it is installed
    model, tok = sketchtune.load(sketched_dir, dtype=torch.float32)
    calls = []
    real = cpu_kernels.linear_any
    monkeypatch.setattr(cpu_kernels, "linear_any", lambda *a: calls.append(a[0].shape) or real(*a))
    scores = {}
    for backend in ("native", "reference"):
        monkeypatch.setenv("SKETCHTUNE_KERNELS", backend)
        scores[backend] = perplexity(model, tok, "tinystories", seqlen=128, max_windows=4, progress=False).ppl
    assert calls and cpu_kernels.kernel_for(calls[0][:-1].numel(), torch.float32, calls[0][-1]) == "tiles"
    assert abs(scores["native"] / scores["reference"] - 1) < 1e-3, scores
    assert all(m.dense_cache.weight is None for m in model.modules() if isinstance(m, sketchtune.SketchedLinear))


@pytest.mark.parametrize("gpr", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_counts_pick_the_kernel_and_keep_the_numbers(monkeypatch, dtype, gpr):
    """Batched decoding (vLLM serving several requests) and short prompts: up to ``gemv_tokens`` tokens a GEMV
    (16 for fp32; for bf16 3 where the AMX kernel runs, else 4 where the batched bf16 kernel exists) — for bf16 the
    bf16 GEMV where the CPU has it and groups are a multiple of 16 columns (GPR 4 of 576: 144), else the fp32 one
    (GPR 8: 72) — then bf16 inputs up to 64 tokens the AMX kernel or up to 32 the bf16 dot kernel, everything
    else the tiles. The C++ dispatcher (``linear_cpu``) is checked to run the kernel it names — its output equals
    that kernel's, bit for bit — and each with the reference's numbers, bias included."""
    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)
    packed, codebook = layer(4, gpr, 576, out=40)
    bias = torch.randn(40)
    w = layout.dequantize(packed, codebook, 4, 576)
    gemv_max = cpu_kernels.gemv_tokens(dtype)
    dot = dtype == torch.bfloat16 and cpu_kernels.bf16_dot()
    amx = dtype == torch.bfloat16 and cpu_kernels.amx()
    bf16_gemv = dtype == torch.bfloat16 and cpu_kernels.bf16_gemv(576, gpr)
    isa = cpu_kernels.isa()
    direct = {"gemv": lambda x: ext.lut_gemv(x, packed, codebook, 4, 576, isa).to(dtype),
              "bf16_gemv": lambda x: ext.linear_bf16_gemv(x, packed, codebook, 4, 576).to(dtype),
              "amx": lambda x: ext.linear_amx(x, packed, codebook, 4, 576),
              "bf16_dot": lambda x: ext.linear_bf16_dot(x, packed, codebook, 4, 576),
              "tiles": lambda x: ext.linear_tiled(x, packed, codebook, 4, 576, isa).to(dtype)}
    for tokens in (1, 3, 4, 5, 9, 16, 17, 32, 33, 64, 65):
        x = torch.randn(tokens, 576).to(dtype)
        with torch.no_grad():
            y = ops.linear(x, packed, codebook, bias, 4, 576)
        want = ("bf16_gemv" if bf16_gemv and tokens <= gemv_max else
                "gemv" if tokens <= gemv_max else
                "amx" if amx and tokens <= cpu_kernels.AMX_MAX_TOKENS else
                "bf16_dot" if dot and tokens <= cpu_kernels.BF16_DOT_MAX_TOKENS else "tiles")
        assert cpu_kernels.kernel_for(tokens, dtype, 576, gpr) == want, tokens
        assert torch.equal(y, direct[want](x) + bias.to(dtype)), (tokens, want)
        assert y.dtype == dtype and y.shape == (tokens, 40)
        ref = x.float() @ (w.to(dtype).float() if dtype == torch.bfloat16 else w).t() + bias
        torch.testing.assert_close(y.float(), ref, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 * ref.abs().max().item() if dtype == torch.bfloat16 else 1e-4)
        y3 = cpu_kernels.linear_any(x.reshape(1, tokens, 576), packed, codebook, None, 4, 576)  # (..., in) shapes
        assert y3.shape == (1, tokens, 40) and torch.equal(y3[0], direct[want](x))
    assert gemv_max == (16 if dtype == torch.float32 or not cpu_kernels.bf16_dot() else 3 if amx else 4)
    if amx:  # widths that are not a multiple of 32 skip the AMX kernel
        assert cpu_kernels.kernel_for(16, dtype, 40) == ("bf16_dot" if dot else "tiles")


@pytest.mark.skipif(ext is None or not ext.bf16_gemv_fits(32, 1), reason="this CPU lacks AVX512-BF16 or VBMI")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bf16_gemv_matches_the_reference(bits, threads):
    """``bf16_gemv.cpp`` over groups of whole 64-byte chunks (128 INT4/INT3 or 256 INT2 columns), INT2's 32-byte
    narrow chunks (groups of 144, 192, 384, 400, 576 columns: not whole 256-column chunks), whole chunks
    plus a 32- or 16-column tail (the last row's 16-column tail reads no byte past the tensor), tails only (groups
    of 16–96 columns), one or several groups, rows split over threads, 1–4 tokens: y = x · bf16(Ŵ)ᵀ with fp32
    accumulation (the reference's bf16 arithmetic) to 1e-5 relative; groups that are not a multiple of 16 columns,
    more than 4 tokens and fp32 inputs are refused with a clear error."""
    with torch_threads(threads):
        for gpr, inp, out in [(1, 256, 23), (1, 4096, 7), (2, 768, 41), (3, 576, 9), (1, 576, 33), (4, 1536, 18),
                              (1, 32, 5), (3, 96, 17), (5, 480, 3), (4, 576, 11), (1, 16, 4), (3, 144, 7),
                              (1, 400, 6)]:
            assert ext.bf16_gemv_fits(inp, gpr)
            packed, codebook = layer(bits, gpr, inp, out, seed=gpr * inp + out + bits)
            wb = layout.dequantize(packed, codebook, bits, inp).bfloat16().double()
            for tokens in (1, 2, 3, 4):
                x = torch.randn(tokens, inp).bfloat16()
                y = ext.linear_bf16_gemv(x, packed, codebook, bits, inp)
                ref = x.double() @ wb.t()
                assert y.dtype == torch.float32 and y.shape == ref.shape
                err = (y.double() - ref).abs().max() / ref.abs().max()
                assert err < 1e-5, (bits, gpr, inp, out, tokens, float(err))
    assert not ext.bf16_gemv_fits(576, 8) and not ext.bf16_gemv_fits(40, 1)
    packed, codebook = layer(bits, 8, 576, 8)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ext.linear_bf16_gemv(torch.randn(1, 576).bfloat16(), packed, codebook, bits, 576)
    packed, codebook = layer(bits, 1, 64, 8)
    with pytest.raises(RuntimeError, match="at most 4 tokens"):
        ext.linear_bf16_gemv(torch.randn(5, 64).bfloat16(), packed, codebook, bits, 64)
    with pytest.raises(RuntimeError, match="bf16"):
        ext.linear_bf16_gemv(torch.randn(1, 64), packed, codebook, bits, 64)


@pytest.mark.skipif(ext is None or not ext.has_bf16_dot(), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bf16_dot_kernel_matches_the_reference(bits, threads):
    """``bf16_dot.cpp`` over group sizes that are whole 32-column chunks (INT4's nibble-pair decoding), whole
    16-column ones (word permutes), neither (the fp32 decoding narrowed), row tails, a short last row panel and
    1–70 tokens (the zero-padded last token block): y = x · bf16(Ŵ)ᵀ with fp32 accumulation, rounded to bf16."""
    with torch_threads(threads):
        for gpr, inp, out in [(1, 64, 23), (4, 576, 41), (2, 288, 6), (3, 75, 9), (5, 45, 17), (1, 37, 3),
                              (7, 2107, 5), (4, 2048, 130)]:
            packed, codebook = layer(bits, gpr, inp, out, seed=gpr * inp + out + bits)
            wb = layout.dequantize(packed, codebook, bits, inp).bfloat16().double()
            for tokens in (1, 2, 5, 8, 33, 70):
                x = torch.randn(tokens, inp).bfloat16()
                y = ext.linear_bf16_dot(x, packed, codebook, bits, inp)
                ref = x.double() @ wb.t()
                assert y.dtype == torch.bfloat16 and y.shape == ref.shape
                err = (y.double() - ref).abs().max() / ref.abs().max()
                assert err < 8e-3, (bits, gpr, inp, out, tokens, float(err))  # bf16 rounding of y: ≤ 2^-8


@pytest.mark.skipif(ext is None or not ext.has_amx(), reason="this CPU has no AMX-BF16 tiles (or Linux withheld them)")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_amx_kernel_matches_the_reference(bits, threads):
    """``amx_linear.cpp`` over group sizes that are whole 32-column chunks, whole 16-column ones, neither (the
    three decodings), a short last 32-row panel, one and several panels per thread, and 1–70 tokens (one or two
    16-token B tiles, a partial last block): y = x · bf16(Ŵ)ᵀ with fp32 accumulation, rounded to bf16; widths
    that are not a multiple of 32 are refused with a clear error."""
    with torch_threads(threads):
        for gpr, inp, out in [(1, 64, 23), (4, 576, 41), (2, 288, 6), (3, 96, 33), (5, 160, 17), (1, 1536, 70),
                              (4, 2048, 130)]:
            packed, codebook = layer(bits, gpr, inp, out, seed=gpr * inp + out + bits)
            wb = layout.dequantize(packed, codebook, bits, inp).bfloat16().double()
            for tokens in (1, 2, 5, 16, 17, 32, 33, 70):
                x = torch.randn(tokens, inp).bfloat16()
                y = ext.linear_amx(x, packed, codebook, bits, inp)
                ref = x.double() @ wb.t()
                assert y.dtype == torch.bfloat16 and y.shape == ref.shape
                err = (y.double() - ref).abs().max() / ref.abs().max()
                assert err < 8e-3, (bits, gpr, inp, out, tokens, float(err))  # bf16 rounding of y: ≤ 2^-8
    packed, codebook = layer(bits, 1, 40, 8)
    with pytest.raises(RuntimeError, match="divisible by 32"):
        ext.linear_amx(torch.randn(2, 40).bfloat16(), packed, codebook, bits, 40)


# --- tiles.cpp: prefill, ∂x and the fused codebook gradient -----------------------------------------------

# (gpr, in, out): one tile, and (in 2048 → 512-row tiles; in 2050 → 496) several tiles with a ragged last one.
TILE_SHAPES = [(1, 64, 23), (2, 300, 23), (4, 576, 41), (3, 75, 9), (5, 45, 17), (7, 2107, 5), (4, 2048, 1100),
               (5, 2050, 1030)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tiled_kernels_match_reference_values_and_gradients(bits, threads):
    with torch_threads(threads):
        for gpr, inp, out in TILE_SHAPES:
            packed, codebook = layer(bits, gpr, inp, out, seed=gpr * inp + out)
            w = layout.dequantize(packed, codebook, bits, inp)
            for isa in ISAS:  # the AVX-512 permute decoding, and the portable loop (what AVX2 machines run)
                assert torch.equal(ext.dequantize(packed, codebook, bits, inp, isa), w)
            for dtype in (torch.float32, torch.bfloat16):
                x, dy = torch.randn(33, inp).to(dtype), torch.randn(33, out).to(dtype)
                xd, dyd, wd = x.double(), dy.double(), w.double()
                ref_cb = layout.bin_reduce(dyd.t() @ xd, packed, bits, gpr)
                for isa in ISAS:
                    y = ext.linear_tiled(x, packed, codebook, bits, inp, isa)
                    if dtype == torch.bfloat16:  # bf16 tiles and GEMM: the reference path's own arithmetic
                        assert y.dtype == torch.bfloat16
                        torch.testing.assert_close(y, x @ w.to(dtype).t(), rtol=1.6e-2, atol=1e-2 * y.abs().max())
                        y = ext.linear_tiled(x.float(), packed, codebook, bits, inp, isa)
                    gx, gcb = ext.linear_backward(dy, x, packed, codebook, bits, inp, gpr, True, True, isa)
                    for got, ref in ((y, xd @ wd.t()), (gx, dyd @ wd), (gcb, ref_cb),
                                     (ext.bin_reduce(dy.t() @ x, packed, bits, gpr, isa), layout.bin_reduce(
                                         (dy.t() @ x).double(), packed, bits, gpr))):
                        assert got.dtype == torch.float32 and got.shape == ref.shape
                        err = (got.double() - ref).abs().max() / ref.abs().max()
                        assert err < 1e-5, (bits, gpr, inp, out, dtype, isa, float(err))


def test_bf16_codebook_gradient_is_the_bf16_product_binned(monkeypatch):
    """``SKETCHTUNE_CODEBOOK_GRAD=bf16``: ∂codebook from dYᵀX with dY and x rounded to bf16 (one and several
    tiles, ragged groups): equal to the same arithmetic in PyTorch (bf16 product, binned in fp32) and within bf16
    rounding of the exact fp32 gradient, through ``sketched_linear`` too; ∂x is untouched by the option."""
    from sketchtune.kernels import BACKEND_ENV, sketched_linear

    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)
    for bits, gpr, inp, out in [(4, 1, 576, 40), (3, 5, 2050, 1030), (2, 4, 2048, 1100)]:
        packed, codebook = layer(bits, gpr, inp, out, seed=inp + out)
        x, dy = torch.randn(37, inp), torch.randn(37, out)
        _, gcb = ext.linear_backward(dy, x, packed, codebook, bits, inp, gpr, False, True, 0, True)
        same = layout.bin_reduce((dy.bfloat16().t() @ x.bfloat16()).float(), packed, bits, gpr)
        exact = layout.bin_reduce(dy.double().t() @ x.double(), packed, bits, gpr)
        scale = exact.abs().max()
        assert (gcb.double() - same.double()).abs().max() / scale < 1e-5
        assert 1e-6 < (gcb.double() - exact).abs().max() / scale < 2e-2  # bf16 rounding, not exact fp32
        grads = {}
        for mode in ("fused", "bf16"):
            monkeypatch.setenv(ops.CODEBOOK_GRAD_ENV, mode)
            for backend in ("auto", "reference"):
                monkeypatch.setenv(BACKEND_ENV, backend)
                xg, cb = x.clone().requires_grad_(), codebook.clone().requires_grad_()
                sketched_linear(xg, packed, cb, None, bits, inp).backward(dy)
                grads[mode, backend] = xg.grad, cb.grad
        torch.testing.assert_close(grads["bf16", "auto"][1], gcb, rtol=1e-5, atol=1e-5 * scale.item())
        # the reference autograd (gather, Ŵ saved) is the exact fp32 gradient whatever the option says
        torch.testing.assert_close(grads["bf16", "reference"][1].double(), exact.double(), rtol=1e-4,
                                   atol=1e-5 * scale.item())
        assert torch.equal(grads["bf16", "auto"][0], grads["fused", "auto"][0])
    monkeypatch.setenv(BACKEND_ENV, "auto")
    monkeypatch.setenv(ops.CODEBOOK_GRAD_ENV, "fp8")
    with pytest.raises(ValueError, match="'fused', 'unfused' or 'bf16'"):
        cb = codebook.clone().requires_grad_()
        sketched_linear(x, packed, cb, None, bits, inp).sum().backward()


def test_linear_op_trains_through_the_tiles(monkeypatch):
    """On CPU ``sketched_linear`` with a trainable codebook runs ``sketchtune::linear`` on the tiled kernels
    (nothing per weight saved for the backward) and its gradients are the reference autograd's."""
    from sketchtune.kernels import BACKEND_ENV, sketched_linear

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)
    calls = []
    for name in ("linear_any", "linear_backward"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    packed, codebook = layer(3, 5, 2050, 1030)
    cb = codebook.clone().requires_grad_()
    bias = torch.randn(1030, requires_grad=True)
    x = torch.randn(2, 40, 2050, requires_grad=True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        y = sketched_linear(x, packed, cb, bias, 3, 2050)
    # x, the codes and the codebook, nothing the size of Ŵ (1030 × 2050 fp32 = 8.4 MB; the codes are 0.8 MB)
    assert sum(saved) <= x.nbytes + packed.nbytes + cb.nbytes
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert {"linear_any", "linear_backward"} <= set(calls)
    grads = x.grad, cb.grad, bias.grad
    x.grad = cb.grad = bias.grad = None
    monkeypatch.setenv(BACKEND_ENV, "reference")
    (sketched_linear(x, packed, cb, bias, 3, 2050) * g).sum().backward()
    for got, ref in zip(grads, (x.grad, cb.grad, bias.grad)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max()))


def test_opcheck_on_the_cpu_kernels(monkeypatch):
    """Every ``sketchtune::*`` op passes ``torch.library.opcheck`` with its C++ CPU body (not Triton's)."""
    monkeypatch.setattr(ops, "triton_runs_on", lambda t: False)
    packed, codebook = layer(3, 5, 2050, 40)
    cb = codebook.clone().requires_grad_()
    sk = torch.ops.sketchtune
    for tokens in (3, 12, 70):  # GEMV, GEMV in blocks, tiles
        x = torch.randn(tokens, 2050, requires_grad=True)
        torch.library.opcheck(sk.linear.default, (x, packed, cb, torch.randn(40, requires_grad=True), 3, 2050))
    torch.library.opcheck(sk.dequantize.default, (packed, codebook, 3, 2050, torch.bfloat16))
    torch.library.opcheck(sk.grad_input.default, (torch.randn(70, 40), packed, codebook, 3, 2050))
    torch.library.opcheck(sk.codebook_grad.default, (torch.randn(70, 40), torch.randn(70, 2050), packed, 3, 5))
    torch.library.opcheck(sk.bin_reduce.default, (torch.randn(40, 2050), packed, 3, 5))
