// Prefill and training on CPU without a whole-layer Ŵ: the layer is walked in tiles of rows, each tile
// dequantized into a buffer of about kTileBytes and handed to torch's GEMM, then dropped.
//
//   forward        y[:, tile]      = x · Ŵ[tile]ᵀ
//   ∂x             ∂x             += ∂y[:, tile] · Ŵ[tile]
//   ∂codebook      G               = ∂y[:, tile]ᵀ · x          (tile × in, fp32)
//                  ∂cb[r, g, code] = Σ over the columns c of group g whose code is `code` of G[r, c]
//
// The bin reduction is fused with the unpacking of the codes (no int64 index tensor, no dense ∂Ŵ), and the
// only transients are one Ŵ tile and one G tile. Why tiles of rows and ~4 MiB: the GEMMs keep their full
// inner dimension (in for the forward and ∂codebook, the tile for ∂x), and a tile small next to a large layer
// bounds memory while each tile still re-reads x or ∂x only (layer bytes / 4 MiB) times — for Llama-7B's
// 11008 × 4096 that is 43 passes, a few percent of the GEMM's time; smaller tiles (128 KiB–1 MiB, to stay in
// L2) measured slower at 8–32 tokens on one thread (each GEMM call has a fixed cost). The forward of bf16
// inputs runs bf16 tiles on torch's bf16 GEMM (the reference's arithmetic; 1.6–1.9× faster than fp32 tiles at
// 32 tokens on Zen 4); everything else is fp32, bf16 inputs converted once. Rows within a tile are split
// across torch's intra-op threads; the GEMMs use them too.
//
// Format: see lut_gemv.cpp (every run of 8 codes of a row is `bits` bytes, little-endian).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>

// lut_gemv.cpp
int64_t cpu_isa();
void dequant_rows_avx512(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits, int64_t gpr,
                         int64_t in, int64_t r0, int64_t r1, float* dst);
void dequant_rows_bf16_avx512(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits,
                              int64_t gpr, int64_t in, int64_t r0, int64_t r1, uint16_t* dst);
void bin_rows_avx512(const uint8_t* packed, int64_t row_bytes, const float* g_rows, int bits, int64_t gpr,
                     int64_t in, int64_t r0, int64_t r1, float* bins);

namespace {

constexpr int64_t kTileBytes = 4 << 20;

struct Codes {
  const uint8_t* packed;  // (out, row_bytes)
  int64_t row_bytes, in, gpr;
  int bits;
  bool avx512;  // dequantize with the GEMV's permute decoding (else the portable loop below)
};

inline uint32_t run_word(const uint8_t* src, int bits) {
  uint32_t w = 0;
  std::memcpy(&w, src, static_cast<size_t>(bits));  // 8 codes of ≤ 4 bits: at most 4 bytes
  return w;
}

// Calls f(column, code_slot) for every column of row r, code_slot = group · 2^bits + code, run by run with
// the group looked up once per run where the run lies inside one group.
template <typename F>
inline void for_each_slot(const Codes& c, int64_t r, F&& f) {
  const int k = 1 << c.bits;
  const uint32_t mask = static_cast<uint32_t>(k - 1);
  const int64_t gsize = c.in / c.gpr;
  const uint8_t* src = c.packed + r * c.row_bytes;
  for (int64_t c0 = 0, run = 0; c0 < c.in; c0 += 8, ++run) {
    const uint32_t w = run_word(src + run * c.bits, c.bits);
    const int64_t n = std::min<int64_t>(8, c.in - c0);
    const int64_t g = c0 / gsize;
    if (c0 + n <= (g + 1) * gsize) {
      const int64_t base = g * k;
      for (int64_t j = 0; j < n; ++j) f(c0 + j, base + ((w >> (j * c.bits)) & mask));
    } else {
      for (int64_t j = 0; j < n; ++j) f(c0 + j, ((c0 + j) / gsize) * k + ((w >> (j * c.bits)) & mask));
    }
  }
}

// Ŵ rows [r0, r1) into dst (r1 − r0, in), fp32 or bf16 (`Out` = c10::BFloat16, from a codebook already
// rounded to bf16 values, so that the conversion is exact).
template <typename Out>
void dequantize_rows(const Codes& c, const float* codebook, int64_t r0, int64_t r1, Out* dst) {
  const int64_t slots = c.gpr << c.bits;
  at::parallel_for(r0, r1, 4, [&](int64_t a, int64_t b) {
    if (c.avx512) {
      if constexpr (std::is_same_v<Out, float>) {
        dequant_rows_avx512(c.packed, c.row_bytes, codebook, c.bits, c.gpr, c.in, a, b, dst + (a - r0) * c.in);
      } else {
        dequant_rows_bf16_avx512(c.packed, c.row_bytes, codebook, c.bits, c.gpr, c.in, a, b,
                                 reinterpret_cast<uint16_t*>(dst + (a - r0) * c.in));
      }
      return;
    }
    for (int64_t r = a; r < b; ++r) {
      const float* table = codebook + r * slots;
      Out* d = dst + (r - r0) * c.in;
      for_each_slot(c, r, [&](int64_t col, int64_t slot) { d[col] = static_cast<Out>(table[slot]); });
    }
  });
}

// ∂cb rows [r0, r1) += the bins of G (r1 − r0, in).
void bin_rows(const Codes& c, const float* g, int64_t r0, int64_t r1, float* bins) {
  const int64_t slots = c.gpr << c.bits;
  const bool vector = c.avx512 && (c.in / c.gpr) % 16 == 0;  // groups of whole 16-column chunks
  at::parallel_for(r0, r1, 4, [&](int64_t a, int64_t b) {
    if (vector) {
      bin_rows_avx512(c.packed, c.row_bytes, g + (a - r0) * c.in, c.bits, c.gpr, c.in, a, b, bins);
      return;
    }
    for (int64_t r = a; r < b; ++r) {
      float* acc = bins + r * slots;
      const float* src = g + (r - r0) * c.in;
      for_each_slot(c, r, [&](int64_t col, int64_t slot) { acc[slot] += src[col]; });
    }
  });
}

Codes codes_of(const torch::Tensor& packed, int64_t bits, int64_t in_features, int64_t gpr, int64_t isa) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2 && packed.is_contiguous(),
              "packed codes must be contiguous 2-D uint8");
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4");
  TORCH_CHECK(packed.size(1) == (in_features + 7) / 8 * bits, "packed row length does not match in_features");
  TORCH_CHECK(gpr >= 1 && in_features % gpr == 0, "gpr must divide in_features");
  const int64_t have = cpu_isa();
  TORCH_CHECK(isa <= have, "requested instruction set is not available on this CPU");
  return Codes{packed.data_ptr<uint8_t>(), packed.size(1), in_features, gpr, static_cast<int>(bits),
               (isa == 0 ? have : isa) == 2};
}

int64_t tile_rows(int64_t in, int64_t out, int64_t elem_bytes = 4) {
  const int64_t rows = std::max<int64_t>(16, kTileBytes / (elem_bytes * std::max<int64_t>(in, 1)) / 16 * 16);
  return std::min(rows, std::max<int64_t>(out, 1));
}

torch::Tensor fp32(const torch::Tensor& t) { return t.to(torch::kFloat).contiguous(); }

}  // namespace

// Ŵ (out, in) fp32.
torch::Tensor dequantize(torch::Tensor packed, torch::Tensor codebook, int64_t bits, int64_t in_features,
                         int64_t isa) {
  auto pc = packed.contiguous();
  auto cb = fp32(codebook);
  const Codes c = codes_of(pc, bits, in_features, cb.size(1), isa);
  auto w = torch::empty({pc.size(0), in_features}, cb.options());
  dequantize_rows(c, cb.data_ptr<float>(), 0, pc.size(0), w.data_ptr<float>());
  return w;
}

// y = x · Ŵᵀ in bf16, Ŵ tiles in bf16: the reference path's arithmetic (x @ Ŵ.to(bf16)ᵀ) on torch's bf16 GEMM,
// which on AVX512-BF16 CPUs runs ~2–3× faster than fp32 at 8+ tokens — the fp32 tiles lost to dense bf16.
torch::Tensor linear_tiled_bf16(const torch::Tensor& x, const torch::Tensor& pc, const torch::Tensor& codebook,
                                int64_t bits, int64_t in_features, int64_t isa) {
  auto cb = codebook.to(torch::kBFloat16).to(torch::kFloat).contiguous();  // tables rounded once
  auto xb = x.contiguous();
  const Codes c = codes_of(pc, bits, in_features, cb.size(1), isa);
  const int64_t out = pc.size(0), tile = tile_rows(in_features, out, 2);
  auto y = torch::empty({x.size(0), out}, xb.options());
  auto buf = torch::empty({tile, in_features}, xb.options());
  for (int64_t r0 = 0; r0 < out; r0 += tile) {
    const int64_t r1 = std::min(out, r0 + tile);
    auto w = buf.narrow(0, 0, r1 - r0);
    dequantize_rows(c, cb.data_ptr<float>(), r0, r1, w.data_ptr<c10::BFloat16>());
    if (r1 - r0 == out) return at::mm(xb, w.t());
    auto y_tile = y.narrow(1, r0, r1 - r0);
    at::mm_out(y_tile, xb, w.t());
  }
  return y;
}

// y = x · Ŵᵀ (M, out), one row tile of Ŵ at a time: fp32, or bf16 for bf16 x.
torch::Tensor linear_tiled(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                           int64_t in_features, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be (tokens, in_features)");
  auto pc = packed.contiguous();
  if (x.scalar_type() == torch::kBFloat16) return linear_tiled_bf16(x, pc, codebook, bits, in_features, isa);
  auto cb = fp32(codebook);
  auto xf = fp32(x);
  const Codes c = codes_of(pc, bits, in_features, cb.size(1), isa);
  const int64_t out = pc.size(0), tile = tile_rows(in_features, out);
  auto y = torch::empty({x.size(0), out}, xf.options());
  auto buf = torch::empty({tile, in_features}, xf.options());
  for (int64_t r0 = 0; r0 < out; r0 += tile) {
    const int64_t r1 = std::min(out, r0 + tile);
    auto w = buf.narrow(0, 0, r1 - r0);
    dequantize_rows(c, cb.data_ptr<float>(), r0, r1, w.data_ptr<float>());
    auto y_tile = y.narrow(1, r0, r1 - r0);
    at::mm_out(y_tile, xf, w.t());
  }
  return y;
}

// (∂x (M, in) fp32 or empty, ∂codebook (out, gpr, 2^bits) fp32 or empty) of y = x · Ŵᵀ, tile by tile.
// `codebook` is needed only for ∂x, `x` only for ∂codebook (either may be empty when not needed).
// `bf16_product`: G = ∂yᵀ·x from ∂y and x rounded to bf16, on torch's bf16 GEMM (fp32 accumulation, G rounded
// to bf16, binned in fp32) — the arithmetic of a weight gradient under bf16 autocast; on AVX512-BF16 CPUs that
// GEMM runs ~4× faster than fp32 and is the one product LoRA does not compute. Opt-in (ops.CODEBOOK_GRAD_ENV).
std::tuple<torch::Tensor, torch::Tensor> linear_backward(torch::Tensor grad_out, torch::Tensor x,
                                                         torch::Tensor packed, torch::Tensor codebook,
                                                         int64_t bits, int64_t in, int64_t gpr, bool need_x,
                                                         bool need_codebook, int64_t isa, bool bf16_product) {
  auto pc = packed.contiguous();
  const int64_t out = pc.size(0), M = grad_out.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(1) == out, "∂y must be (tokens, out)");
  TORCH_CHECK(!need_codebook || (x.dim() == 2 && x.size(0) == M && x.size(1) == in), "x must be (tokens, in)");
  const Codes c = codes_of(pc, bits, in, gpr, isa);
  const bool low = need_codebook && bf16_product;
  auto dy = need_x || !low ? fp32(grad_out) : grad_out;
  auto xf = need_codebook && !low ? fp32(x) : x;
  torch::Tensor dy_b, x_b, g_b;  // bf16 copies (bf16_product): made once per call
  auto opts = dy.options().dtype(torch::kFloat);
  torch::Tensor cb, grad_x = torch::empty({0}, opts), grad_cb = torch::empty({0}, opts);
  if (need_x) {
    cb = fp32(codebook);
    TORCH_CHECK(cb.dim() == 3 && cb.size(0) == out && cb.size(1) == gpr && cb.size(2) == (1 << bits),
                "codebook must be (out, gpr, 2^bits)");
    grad_x = torch::zeros({M, in}, opts);
  }
  if (need_codebook) grad_cb = torch::zeros({out, gpr, int64_t{1} << bits}, opts);
  if (!need_x && !need_codebook) return {grad_x, grad_cb};
  const int64_t tile = tile_rows(in, out);
  auto buf = torch::empty({tile, in}, opts);
  if (low) {
    dy_b = grad_out.to(torch::kBFloat16).contiguous();
    x_b = x.to(torch::kBFloat16).contiguous();
    g_b = torch::empty({tile, in}, x_b.options());
  }
  for (int64_t r0 = 0; r0 < out; r0 += tile) {
    const int64_t r1 = std::min(out, r0 + tile);
    auto t = buf.narrow(0, 0, r1 - r0);
    if (need_x) {
      auto dy_tile = dy.narrow(1, r0, r1 - r0);
      dequantize_rows(c, cb.data_ptr<float>(), r0, r1, t.data_ptr<float>());
      grad_x.addmm_(dy_tile, t);
    }
    if (need_codebook) {
      if (low) {
        auto g = g_b.narrow(0, 0, r1 - r0);
        at::mm_out(g, dy_b.narrow(1, r0, r1 - r0).t(), x_b);
        t.copy_(g);
      } else {
        at::mm_out(t, dy.narrow(1, r0, r1 - r0).t(), xf);
      }
      bin_rows(c, t.data_ptr<float>(), r0, r1, grad_cb.data_ptr<float>());
    }
  }
  return {grad_x, grad_cb};
}

// ∂codebook from a dense ∂Ŵ (out, in): the bin reduction alone.
torch::Tensor bin_reduce(torch::Tensor grad_weight, torch::Tensor packed, int64_t bits, int64_t gpr, int64_t isa) {
  auto pc = packed.contiguous();
  auto g = fp32(grad_weight);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == pc.size(0), "∂Ŵ must be (out, in)");
  const Codes c = codes_of(pc, bits, g.size(1), gpr, isa);
  auto bins = torch::zeros({pc.size(0), gpr, int64_t{1} << bits}, g.options());
  bin_rows(c, g.data_ptr<float>(), 0, pc.size(0), bins.data_ptr<float>());
  return bins;
}
