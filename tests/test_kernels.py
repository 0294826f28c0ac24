"""Triton kernels and ``sketchtune::*`` ops against the pure-PyTorch reference; dispatch; the CPU decode cache.

Without a GPU the kernels run on CPU tensors under Triton's interpreter, which has to be switched on before
the kernels are built — hence the environment variable below, set before anything imports triton. Shapes
are small and odd (37 × 72, groups of 9 columns at GPR 8) so tiles are ragged and cross group boundaries.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from sketchtune import layout  # noqa: E402
from sketchtune.kernels import (  # noqa: E402
    BACKEND_ENV,
    DenseWeightCache,
    backend_for,
    cpu_kernels,  # noqa: E402
    ops,
    sketched_linear,
    triton_runs_on,
)
from sketchtune.layout import dequantize, pack_codes  # noqa: E402
from sketchtune.sketched_linear import SketchedLinear  # noqa: E402

OUT, IN = 37, 72
GPRS = [1, 2, 3, 8]  # divisors of 72
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture
def tk(monkeypatch):
    """The Triton kernel module, skipping when triton is missing or cannot run here. On CPU the ops prefer the
    native C++ kernels to Triton's interpreter; these tests ask for Triton."""
    pytest.importorskip("triton")
    monkeypatch.setenv(BACKEND_ENV, "triton")
    if not triton_runs_on(torch.empty(0, device=DEVICE)):
        pytest.skip("triton kernels were built without the interpreter and there is no GPU")
    from sketchtune.kernels import triton_kernels

    return triton_kernels


def make_layer(bits: int, gpr: int, dtype: torch.dtype = torch.float32, out: int = OUT, inp: int = IN, seed: int = 0):
    """(packed codes, codebook) on DEVICE, codebook values O(1) and exactly representable in ``dtype``."""
    gen = torch.Generator().manual_seed(seed * 100 + bits * 10 + gpr)
    codes = torch.randint(0, 2**bits, (out, inp), generator=gen)
    codebook = torch.randn(out, gpr, 2**bits, generator=gen).to(dtype)
    return pack_codes(codes, bits).to(DEVICE), codebook.to(DEVICE)


def rand(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, ulps: float = 2.0):
    """|actual − expected| ≤ ulps · eps(dtype) · max|expected|: rounding-level agreement for that dtype."""
    expected = expected.double()
    tol = ulps * torch.finfo(dtype).eps * max(expected.abs().max().item(), 1.0)
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g} ({dtype})"


def ground_truth_bins(dy: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bits: int, gpr: int) -> torch.Tensor:
    """∂L/∂codebook in fp64: autograd of the reference gather, i.e. the scatter-add of dYᵀX."""
    codebook = torch.zeros(dy.shape[1], gpr, 2**bits, dtype=torch.float64, device=dy.device, requires_grad=True)
    w = dequantize(packed, codebook, bits, x.shape[1])
    (w * (dy.double().t() @ x.double())).sum().backward()
    return codebook.grad


# --- kernels against the reference ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gpr", GPRS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dequantize_kernel_is_exact(tk, bits, gpr, dtype):
    packed, codebook = make_layer(bits, gpr, dtype)
    w = ops.dequantize(packed, codebook, bits, IN, dtype)
    assert w.dtype == dtype and w.shape == (OUT, IN)
    assert torch.equal(w, dequantize(packed, codebook, bits, IN))
    # and straight into another dtype (the activation's), as the matmul path does
    assert torch.equal(ops.dequantize(packed, codebook, bits, IN, torch.float32),
                       dequantize(packed, codebook, bits, IN).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gpr", GPRS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_gemv_matches_reference(tk, bits, gpr, dtype):
    packed, codebook = make_layer(bits, gpr, dtype)
    w = dequantize(packed, codebook, bits, IN).double()
    for tokens in ([1, 2, 3, 4, 5, 6, 7, 8] if dtype == torch.float32 else [1, 3, 8]):
        x = rand(tokens, IN, dtype=dtype, seed=tokens)
        y = ops.lut_gemv(x, packed, codebook, bits, IN)
        assert y.dtype == dtype and y.shape == (tokens, OUT)
        assert_close_scaled(y, x.double() @ w.t(), dtype)


@pytest.mark.parametrize("split_k", [1, 2, 5])
def test_lut_gemv_split_k(tk, split_k):
    packed, codebook = make_layer(3, 3, torch.float32, out=19, inp=300)
    x = rand(2, 300)
    y = tk.lut_gemv(x, packed, codebook, 3, 300, split_k=split_k)
    assert_close_scaled(y, x.double() @ dequantize(packed, codebook, 3, 300).double().t(), torch.float32, ulps=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gpr", GPRS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_grad_fused_and_unfused(tk, bits, gpr, dtype):
    packed, _ = make_layer(bits, gpr)
    tokens = 40  # more than one BLOCK_N of the fused kernel
    dy, x = rand(tokens, OUT, dtype=dtype, seed=2), rand(tokens, IN, dtype=dtype, seed=3)
    expected = ground_truth_bins(dy, x, packed, bits, gpr)
    fused = ops.codebook_grad(dy, x, packed, bits, gpr)
    assert fused.dtype == torch.float32 and fused.shape == (OUT, gpr, 2**bits)
    # fp32 accumulation of exact fp16/bf16 products: fp32-level agreement whatever the input dtype
    assert_close_scaled(fused, expected, torch.float32, ulps=64)
    unfused = ops.bin_reduce(dy.float().t() @ x.float(), packed, bits, gpr)
    assert_close_scaled(unfused, expected, torch.float32, ulps=64)


# --- the layer op, forward and backward -------------------------------------------------------------------


def _run(monkeypatch, backend, x, packed, codebook, bias, bits, dy):
    monkeypatch.setenv(BACKEND_ENV, backend)
    x = x.detach().requires_grad_()
    codebook = codebook.detach().requires_grad_()
    bias = bias.detach().requires_grad_()
    y = sketched_linear(x, packed, codebook, bias, bits, x.shape[-1])
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, codebook.grad, bias.grad


@pytest.mark.parametrize("grad_mode", ["fused", "unfused"])
@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (1, 8), (3, 7), (2, 20)])  # ≤ 8 tokens: GEMV; more: matmul
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_op_forward_backward(tk, monkeypatch, dtype, shape, grad_mode):
    bits, gpr = (4, 3) if shape[1] % 2 else (3, 8)
    monkeypatch.setenv(ops.CODEBOOK_GRAD_ENV, grad_mode)
    packed, codebook = make_layer(bits, gpr, dtype)
    x, bias = rand(*shape, IN, dtype=dtype, seed=5), rand(OUT, dtype=dtype, seed=6)
    dy = rand(*shape, OUT, dtype=dtype, seed=7)
    got = _run(monkeypatch, "triton", x, packed, codebook, bias, bits, dy)
    truth = _run(monkeypatch, "reference", x.double(), packed, codebook.double(), bias.double(), bits, dy)
    for name, g, t in zip(["y", "dx", "dcodebook", "dbias"], got, truth):
        assert g.dtype == dtype and g.shape == t.shape, name
        assert_close_scaled(g, t, dtype, ulps=4)


def test_no_gradient_for_codes_and_only_what_is_asked(tk, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "triton")
    packed, codebook = make_layer(4, 1)
    codebook.requires_grad_()
    x = rand(12, IN)
    sketched_linear(x, packed, codebook, None, 4, IN).sum().backward()
    assert codebook.grad is not None and x.grad is None and packed.grad is None


# --- registration -----------------------------------------------------------------------------------------


def test_opcheck(tk):
    bits, gpr = 3, 3
    packed, codebook = make_layer(bits, gpr)
    cb = codebook.clone().requires_grad_()
    bias = rand(OUT).requires_grad_()
    for tokens in (3, 12):  # GEMV and matmul branches of sketchtune::linear, with autograd
        x = rand(tokens, IN).requires_grad_()
        torch.library.opcheck(torch.ops.sketchtune.linear.default, (x, packed, cb, bias, bits, IN))
    torch.library.opcheck(torch.ops.sketchtune.linear.default, (rand(2, 5, IN), packed, codebook, None, bits, IN))
    torch.library.opcheck(torch.ops.sketchtune.dequantize.default, (packed, codebook, bits, IN, torch.float16))
    torch.library.opcheck(torch.ops.sketchtune.lut_gemv.default, (rand(4, IN), packed, codebook, bits, IN))
    torch.library.opcheck(torch.ops.sketchtune.codebook_grad.default,
                          (rand(12, OUT), rand(12, IN), packed, bits, gpr))
    torch.library.opcheck(torch.ops.sketchtune.bin_reduce.default, (rand(OUT, IN), packed, bits, gpr))
    torch.library.opcheck(torch.ops.sketchtune.grad_input.default, (rand(12, OUT), packed, codebook, bits, IN))


def test_kernels_match_the_format_reference(tk):
    """Each kernel computes what its op's pure-PyTorch body (the :mod:`sketchtune.layout` reference) does."""
    bits, gpr = 3, 8
    packed, codebook = make_layer(bits, gpr)
    x, dy = rand(5, IN), rand(5, OUT, seed=2)
    w = layout.dequantize(packed, codebook, bits, IN)
    pairs = [
        (ops.dequantize(packed, codebook, bits, IN, torch.float32), w.float()),
        (ops.lut_gemv(x, packed, codebook, bits, IN), x.float() @ w.float().t()),
        (ops.codebook_grad(dy, x, packed, bits, gpr), layout.bin_reduce(dy.float().t() @ x.float(), packed, bits, gpr)),
        (ops.bin_reduce(dy.t() @ x, packed, bits, gpr), layout.bin_reduce(dy.t() @ x, packed, bits, gpr)),
    ]
    for kernel, reference in pairs:
        assert_close_scaled(kernel, reference, torch.float32, ulps=16)


# --- dispatch (no triton needed) --------------------------------------------------------------------------


def test_dispatch_rule(monkeypatch):
    x = torch.zeros(1, IN)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    native = "native" if cpu_kernels.native(x) else "reference"
    assert backend_for(x) == native  # CPU tensors: the C++ kernels under "auto" where they are built
    assert backend_for(x.half()) == "reference"  # activations they do not take
    monkeypatch.setenv(BACKEND_ENV, "cache")
    assert backend_for(x) == "reference" and backend_for(x, training=True) == native
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert backend_for(x) == "reference"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert backend_for(x) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        backend_for(x)
    if torch.cuda.is_available() and ops.triton_available():
        monkeypatch.delenv(BACKEND_ENV)
        assert backend_for(x.cuda()) == "triton"


def test_reference_forced_by_env_never_calls_the_op(monkeypatch):
    from sketchtune.kernels import dispatch

    def boom(*args):
        raise AssertionError("sketchtune::linear called")

    monkeypatch.setattr(dispatch, "linear", boom)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    packed, codebook = make_layer(4, 2)
    layer = SketchedLinear.from_codes(codebook.cpu(), torch.zeros(OUT, IN, dtype=torch.long), 4)
    layer.weight.data.copy_(packed.cpu())
    x = torch.randn(3, IN)
    with torch.no_grad():
        y = layer.eval()(x)
    torch.testing.assert_close(y, x @ layer.dequantize().t(), rtol=0, atol=0)
    assert layer.dense_cache.weight is None  # "reference" is the bare ground truth: no cache either


# --- CPU decode cache (no triton needed) ------------------------------------------------------------------


def cpu_layer(bits=4, gpr=2, bias=True) -> SketchedLinear:
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2**bits, (OUT, IN), generator=gen)
    codebook = torch.randn(OUT, gpr, 2**bits, generator=gen)
    return SketchedLinear.from_codes(codebook, codes, bits, bias=torch.randn(OUT, generator=gen) if bias else None)


def reference_out(layer: SketchedLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, layer.dequantize().detach(), layer.bias.detach())


def test_cache_used_in_eval_and_exact(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cache")  # opt-in since the C++ kernels
    layer = cpu_layer().eval()
    x = torch.randn(2, 3, IN)
    with torch.no_grad():
        y1 = layer(x)
        w = layer.dense_cache.weight
        y2 = layer(x[:, :1])
    assert w is not None and layer.dense_cache.weight is w  # built once, reused
    torch.testing.assert_close(y1, reference_out(layer, x), rtol=0, atol=0)
    torch.testing.assert_close(y2, reference_out(layer, x[:, :1]), rtol=0, atol=0)


def test_cache_never_used_when_training(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cache")  # opt-in since the C++ kernels
    layer = cpu_layer()
    with torch.no_grad():
        layer.eval()(torch.randn(1, IN))
    assert layer.dense_cache.weight is not None
    layer.train()
    x = torch.randn(4, IN)
    layer(x).square().sum().backward()
    assert layer.dense_cache.weight is None  # train mode drops it
    # the gradient is the gather's autograd (exactly with the reference; the native op sums in another order)
    cb = layer.codebook.detach().clone().requires_grad_()
    torch.nn.functional.linear(x, dequantize(layer.weight, cb, 4, IN), layer.bias.detach()).square().sum().backward()
    exact = not cpu_kernels.native(x)
    torch.testing.assert_close(layer.codebook.grad, cb.grad, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-4)


def test_cache_skipped_in_eval_when_codebook_needs_grad(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cache")  # opt-in since the C++ kernels
    layer = cpu_layer().eval()
    layer(torch.randn(2, IN)).sum().backward()  # eval mode but grad mode on and codebook trainable
    assert layer.dense_cache.weight is None and layer.codebook.grad is not None
    layer.codebook.requires_grad_(False)
    x = torch.randn(2, IN, requires_grad=True)  # frozen codebook: cached Ŵ gives the exact input gradient
    layer(x).sum().backward()
    assert layer.dense_cache.weight is not None
    torch.testing.assert_close(x.grad, layer.dequantize().sum(0).expand(2, IN), rtol=1e-6, atol=1e-6)


def test_cache_invalidated_by_in_place_changes(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cache")  # opt-in since the C++ kernels
    layer = cpu_layer().eval()
    x = torch.randn(3, IN)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_out(layer, x), rtol=0, atol=0)

    check()
    # training steps without leaving eval mode; the fused AdamW step does not even bump _version
    for opt in (torch.optim.SGD([layer.codebook], lr=0.1), torch.optim.AdamW([layer.codebook], fused=True)):
        layer(x).square().sum().backward()  # a forward that needs the codebook gradient drops the cache
        opt.step()
        check()
    # load_state_dict (copy_ into the parameters)
    other = cpu_layer(bits=4, gpr=2)
    with torch.no_grad():
        other.codebook.mul_(-2)
        other.weight.copy_(pack_codes(torch.randint(0, 16, (OUT, IN)), 4))
    layer.load_state_dict(other.state_dict())
    check()
    # an edit through .data is invisible to the version counter: documented, clear() is the remedy
    layer.codebook.data[0, 0, :] += 1
    layer.dense_cache.clear()
    check()
    # the parameter's storage replaced (as .to()/.float() conversions do), also via a freed address
    layer.codebook.data = layer.codebook.data.clone() * 3
    check()
    layer.half().float()  # codebook rounded through fp16, fresh tensors with fresh version counters
    check()
    # another activation dtype
    with torch.no_grad():
        torch.testing.assert_close(layer(x.double()), reference_out(layer.double(), x.double()), rtol=0, atol=0)


def test_cache_under_inference_mode(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cache")  # opt-in since the C++ kernels
    layer = cpu_layer().eval()
    x = torch.randn(2, IN)
    with torch.inference_mode():
        y = layer(x)
    assert not layer.dense_cache.weight.is_inference()  # still usable outside inference mode
    torch.testing.assert_close(y, reference_out(layer, x), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)


def test_dense_cache_rebuilds_only_on_change():
    packed, codebook = make_layer(2, 1)
    packed, codebook = packed.cpu(), codebook.cpu()
    cache = DenseWeightCache()
    w = cache.get(packed, codebook, 2, IN, torch.float32)
    assert cache.get(packed, codebook, 2, IN, torch.float32) is w
    assert cache.get(packed, codebook, 2, IN, torch.float64).dtype == torch.float64
    with torch.no_grad():
        packed[0, 0] ^= 0xFF  # codes changed in place
    assert torch.equal(cache.get(packed, codebook, 2, IN, torch.float32), dequantize(packed, codebook, 2, IN))
    cache.clear()
    assert cache.weight is None


_NO_COMPILER_SCRIPT = r"""
import warnings
import torch
from sketchtune.layout import dequantize, pack_codes
from sketchtune.sketched_linear import SketchedLinear
from sketchtune.kernels import cpu_kernels

g = torch.Generator().manual_seed(0)
codes, codebook = torch.randint(0, 16, (24, 64), generator=g), torch.randn(24, 2, 16, generator=g)
layer = SketchedLinear.from_codes(codebook, codes, 4)
w = dequantize(pack_codes(codes, 4), codebook, 4, 64)
for tokens in (1, 5, 40):  # the GEMV's and the tiled kernels' token counts
    x = torch.randn(tokens, 64, generator=g)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ w.t(), rtol=1e-5, atol=1e-5)
    layer.train()
    layer(x).square().sum().backward()
    assert layer.codebook.grad is not None and layer.codebook.grad.abs().sum() > 0
assert cpu_kernels.extension() is None
print("REFERENCE PATH OK")
"""


def test_without_a_compiler_one_warning_line_and_the_pytorch_path(tmp_path):
    """Issue #11: where the extension cannot be built (CXX names no compiler; nothing built in the extension
    cache), sketched layers still run — the pure-PyTorch path, forward and codebook gradient — after a single
    one-line warning, not torch's compiler banner or a failed build command."""
    import subprocess
    import sys

    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("SKETCHTUNE_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REFERENCE PATH OK" in run.stdout
    ours = [line for line in run.stderr.splitlines() if "sketchtune:" in line]
    assert len(ours) == 1 and "no C++ compiler" in ours[0] and "no-such-c++" in ours[0], run.stderr[-2000:]
    assert "WARNING" not in run.stderr and "Error building" not in run.stderr, run.stderr[-2000:]
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.o"))


def test_compiler_check_reads_a_wrapped_cxx(monkeypatch):
    """CXX may name a wrapper and the compiler ("ccache g++"): the check looks for the first word."""
    import shutil

    monkeypatch.setenv("CXX", "/no/such/ccache g++")
    assert "/no/such/ccache" in cpu_kernels._cannot_build()
    if shutil.which("env") and shutil.which("g++"):
        monkeypatch.setenv("CXX", "env g++")
        assert cpu_kernels._cannot_build() is None
