// y = x · Ŵᵀ for bf16 x and a few to a few dozen tokens — vLLM decoding 8–32 requests at once, short prompts —
// on AVX512-BF16 dot products (vdpbf16ps), Ŵ dequantized only a panel of rows at a time.
//
// Why: the GEMV (lut_gemv.cpp) pays its decoding per token block, so its cost grows with the tokens; the tiles
// (tiles.cpp) decode once but write a 4 MiB Ŵ tile to memory and read it back through torch's GEMM. Here each
// panel of kRows rows is decoded once into a buffer that stays in L1/L2 (kRows · in bf16: 4.5 KiB for SmolLM2's
// 576, 32 KiB for 4096) and every token block reads it from there. Lanes run along the input dimension, so
// the panel is the codes' own layout (no transpose): one vdpbf16ps multiplies 32 adjacent (weight, x) pairs
// of one row and one token and adds them pairwise into 16 fp32 lanes; kRows × kTokens accumulators stay in
// registers and are reduced once per row. Arithmetic: bf16 Ŵ (the codebook rounded once, as the reference's
// x @ Ŵ.to(bf16)ᵀ does) times bf16 x, fp32 accumulation.
//
// Only where the CPU has AVX512-BF16 (checked at run time; otherwise cpu_kernels uses the tiles).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

// lut_gemv.cpp
void dequant_rows_bf16_avx512(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits,
                              int64_t gpr, int64_t in, int64_t r0, int64_t r1, uint16_t* dst);
int64_t cpu_isa();

namespace {

#define BF16DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

constexpr int kRows = 4;    // rows per panel
constexpr int kTokens = 4;  // tokens per register block: 16 accumulators + 4 x + 1 weight of 32 registers

// y[t, r0 + r] = Σ_c panel[r, c] · x[t, c] for the panel's `rows` rows and T tokens (x rows of length in).
// y[t, r0 + r] = Σ_c panel[r, c] · x[t, c] for the panel's `rows` rows and `tokens` ≤ 4 of the 4 x rows (x rows
// of length in; rows past `tokens` are read but not stored). The 16 accumulators are named variables: as an
// array (acc[4][4] or four acc[4]) GCC stored every one of them to the stack each iteration, 4× slower.
BF16DOT void panel_times_4_tokens(const uint16_t* panel, int rows, const uint16_t* x, int tokens, int64_t in,
                                  int64_t out, int64_t r0, float* y) {
#define ST_ROW(r) __m512 a##r##0 = _mm512_setzero_ps(), a##r##1 = a##r##0, a##r##2 = a##r##0, a##r##3 = a##r##0;
  ST_ROW(0) ST_ROW(1) ST_ROW(2) ST_ROW(3)
#undef ST_ROW
  const uint16_t *x0 = x, *x1 = x + in, *x2 = x + 2 * in, *x3 = x + 3 * in;
  for (int64_t c = 0; c < in; c += 32) {
    const int64_t valid = std::min<int64_t>(32, in - c);
    const __mmask32 mask = valid == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << valid) - 1);
    const __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi16(mask, x0 + c);
    const __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi16(mask, x1 + c);
    const __m512bh v2 = (__m512bh)_mm512_maskz_loadu_epi16(mask, x2 + c);
    const __m512bh v3 = (__m512bh)_mm512_maskz_loadu_epi16(mask, x3 + c);
#define ST_ROW(r)                                                                      \
  {                                                                                    \
    const __m512bh w = (__m512bh)_mm512_maskz_loadu_epi16(mask, panel + r * in + c); \
    a##r##0 = _mm512_dpbf16_ps(a##r##0, v0, w);                                      \
    a##r##1 = _mm512_dpbf16_ps(a##r##1, v1, w);                                      \
    a##r##2 = _mm512_dpbf16_ps(a##r##2, v2, w);                                      \
    a##r##3 = _mm512_dpbf16_ps(a##r##3, v3, w);                                      \
  }
    ST_ROW(0) ST_ROW(1) ST_ROW(2) ST_ROW(3)
#undef ST_ROW
  }
  const float sums[kRows][kTokens] = {
      {_mm512_reduce_add_ps(a00), _mm512_reduce_add_ps(a01), _mm512_reduce_add_ps(a02), _mm512_reduce_add_ps(a03)},
      {_mm512_reduce_add_ps(a10), _mm512_reduce_add_ps(a11), _mm512_reduce_add_ps(a12), _mm512_reduce_add_ps(a13)},
      {_mm512_reduce_add_ps(a20), _mm512_reduce_add_ps(a21), _mm512_reduce_add_ps(a22), _mm512_reduce_add_ps(a23)},
      {_mm512_reduce_add_ps(a30), _mm512_reduce_add_ps(a31), _mm512_reduce_add_ps(a32), _mm512_reduce_add_ps(a33)}};
  for (int r = 0; r < rows; ++r)
    for (int t = 0; t < tokens; ++t) y[t * out + r0 + r] = sums[r][t];
}

// Every token of x (M, in) against one panel, 4 tokens at a time; the last 1–3 tokens are read from `tail`, a
// zero-padded copy of them (4 × in).
BF16DOT void tokens_of_panel(const uint16_t* panel, int rows, const uint16_t* x, const uint16_t* tail, int64_t M,
                             int64_t in, int64_t out, int64_t r0, float* y) {
  for (int64_t t0 = 0; t0 < M; t0 += kTokens) {
    const int tokens = static_cast<int>(std::min<int64_t>(kTokens, M - t0));
    panel_times_4_tokens(panel, rows, tokens == kTokens ? x + t0 * in : tail, tokens, in, out, r0, y + t0 * out);
  }
}

}  // namespace

bool has_bf16_dot() {
  __builtin_cpu_init();
  return cpu_isa() == 2 && __builtin_cpu_supports("avx512bf16");
}

// x (M, in) bf16, packed (out, row_bytes) uint8, codebook (out, gpr, 2^bits) → y (M, out) bf16.
torch::Tensor linear_bf16_dot(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                              int64_t in_features) {
  TORCH_CHECK(has_bf16_dot(), "this CPU has no AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == torch::kBFloat16,
              "x must be (tokens, in_features) bf16");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2, "packed codes must be 2-D uint8");
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4");
  TORCH_CHECK(packed.size(1) == (in_features + 7) / 8 * bits, "packed row length does not match in_features");
  TORCH_CHECK(codebook.dim() == 3 && codebook.size(0) == packed.size(0) && codebook.size(2) == (1 << bits) &&
              in_features % codebook.size(1) == 0, "codebook must be (out, gpr, 2^bits), gpr dividing in");
  auto xb = x.contiguous();
  auto pc = packed.contiguous();
  auto cb = codebook.to(torch::kFloat).contiguous();  // rounded to bf16 tables as they are decoded
  const int64_t M = xb.size(0), out = pc.size(0), gpr = cb.size(1);
  auto y = torch::empty({M, out}, xb.options().dtype(torch::kFloat));
  if (M == 0 || out == 0) return y.to(torch::kBFloat16);
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  const uint8_t* codes = pc.data_ptr<uint8_t>();
  const float* books = cb.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<uint16_t> tail(static_cast<size_t>(kTokens * in_features), 0);
  if (M % kTokens) std::memcpy(tail.data(), xp + (M - M % kTokens) * in_features, M % kTokens * in_features * 2);
  const int64_t panels = (out + kRows - 1) / kRows;
  at::parallel_for(0, panels, 8, [&](int64_t p0, int64_t p1) {
    std::vector<uint16_t> panel(static_cast<size_t>(kRows * in_features), 0);  // short last panel: zero rows
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t r0 = p * kRows, r1 = std::min(out, r0 + kRows);
      dequant_rows_bf16_avx512(codes, pc.size(1), books, static_cast<int>(bits), gpr, in_features, r0, r1,
                               panel.data());
      if (r1 - r0 < kRows) std::fill(panel.begin() + (r1 - r0) * in_features, panel.end(), uint16_t{0});
      tokens_of_panel(panel.data(), static_cast<int>(r1 - r0), xp, tail.data(), M, in_features, out, r0, yp);
    }
  });
  return y.to(torch::kBFloat16);
}
