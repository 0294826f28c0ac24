// y = x · Ŵᵀ for bf16 x on Intel AMX tiles (Sapphire Rapids and later), Ŵ decoded 32 rows at a time into a
// panel that stays in L1/L2 and is read by the tile loads straight from there.
//
// Why: where the CPU has AMX, torch's dense bf16 GEMM runs on it (oneDNN) and its time barely grows from 1 to 32
// tokens (a 4096² layer: 2.2 ms at 1 token, 2.9 ms at 32, one thread); the AVX512-BF16 dot kernel
// (bf16_dot.cpp) grows linearly (14 ms at 32) and the tiles (tiles.cpp: Ŵ written to a 4 MiB buffer, then the
// GEMM) pay a full dequantization pass through memory (5.2 ms). Here the multiply is the same AMX instruction as
// dense's, so the layer costs its decoding plus the codes' bytes — fewer bytes than dense reads.
//
// Layout: C = Ŵ · xᵀ. A tile = 16 rows of the decoded panel × 32 input columns (bf16, the codes' own row-major
// order: no transpose), B tile = xᵀ for 32 input columns × 16 tokens in AMX's pair ("VNNI") layout, built once
// per call (row i holds (x[t, 2i], x[t, 2i+1]) for the 16 tokens t), C tile = 16 rows × 16 tokens fp32. A
// panel of 32 rows and a block of 32 tokens use all 8 tile registers: C 0–3, A 4–5, B 6–7. Arithmetic: bf16 Ŵ
// (the codebook rounded to bf16 as it is decoded, as the reference x @ Ŵ.to(bf16)ᵀ rounds it) times bf16 x,
// fp32 accumulation, y rounded to bf16.
//
// Only where CPUID reports AMX-TILE and AMX-BF16 and Linux grants the tile state (arch_prctl); input widths
// that are a multiple of 32 (every tile row is 32 columns). Otherwise cpu_kernels picks another kernel.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>

#include "bf16_round.h"
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

// lut_gemv.cpp
void dequant_rows_bf16_avx512(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits,
                              int64_t gpr, int64_t in, int64_t r0, int64_t r1, uint16_t* dst);
int64_t cpu_isa();

namespace {

#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")))

constexpr int kPanelRows = 32;   // two A tiles
constexpr int kBlockTokens = 32; // two B tiles
constexpr int kCols = 32;        // bf16 input columns per tile row (64 bytes)

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_granted() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = d & (1u << 24), bf16 = d & (1u << 22);
  if (!tile || !bf16) return false;
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // Linux: ask once per process for the tile state
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

// x (M, in) bf16 → B tiles: for each block of 16 tokens and each 32-column chunk, 16 rows × 16 dwords, row i
// = the pairs (x[t, c + 2i], x[t, c + 2i + 1]) of tokens t; tokens past M are zero.
std::vector<uint32_t> pack_tokens(const uint16_t* x, int64_t M, int64_t in) {
  const int64_t blocks = (M + 15) / 16, chunks = in / kCols;
  std::vector<uint32_t> b(static_cast<size_t>(blocks * chunks * 256), 0);
  for (int64_t t = 0; t < M; ++t) {
    const uint32_t* row = reinterpret_cast<const uint32_t*>(x + t * in);  // pairs of columns
    uint32_t* dst = b.data() + (t / 16) * chunks * 256 + (t % 16);
    for (int64_t p = 0; p < in / 2; ++p) dst[(p / 16) * 256 + (p % 16) * 16] = row[p];
  }
  return b;
}

// A C tile (16 rows × 16 tokens, fp32) → y[t0 + t, r0 + r] in bf16 (nearest even), valid rows and tokens only:
// per token, one gather of its 16 rows' sums (a column of the tile, in L1), rounded and stored as 16
// contiguous bf16 — the scalar loop this replaced converted and stored one value at a time.
AMX void store_block(const float* c, int64_t rows, int64_t tokens, int64_t out, int64_t r0, int64_t t0,
                     at::BFloat16* y) {
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  const __mmask16 valid = rows >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rows) - 1);
  for (int64_t t = 0; t < tokens; ++t) {
    const __m512i rounded = bf16_bits_rne(_mm512_i32gather_ps(column, c + t, 4));
    _mm256_mask_storeu_epi16(y + (t0 + t) * out + r0, valid, _mm512_cvtepi32_epi16(rounded));
  }
}

// One thread's panels [p0, p1): decode each panel once, then every token block against it.
AMX void panels(const uint8_t* codes, int64_t row_bytes, const float* books, int bits, int64_t gpr, int64_t in,
                int64_t out, const uint32_t* xt, int64_t M, int64_t p0, int64_t p1, at::BFloat16* y) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
  std::vector<uint16_t> panel(static_cast<size_t>(kPanelRows * in), 0);
  alignas(64) float c[4][256];
  const int64_t chunks = in / kCols, stride = in * 2;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t r0 = p * kPanelRows, r1 = std::min(out, r0 + kPanelRows);
    dequant_rows_bf16_avx512(codes, row_bytes, books, bits, gpr, in, r0, r1, panel.data());
    if (r1 - r0 < kPanelRows) std::fill(panel.begin() + (r1 - r0) * in, panel.end(), uint16_t{0});
    const uint16_t* a0 = panel.data();
    const uint16_t* a1 = panel.data() + 16 * in;
    for (int64_t t0 = 0; t0 < M; t0 += kBlockTokens) {
      const bool two = t0 + 16 < M;  // a second block of 16 tokens
      const uint32_t* b0 = xt + (t0 / 16) * chunks * 256;
      const uint32_t* b1 = two ? b0 + chunks * 256 : b0;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < chunks; ++k) {
        _tile_loadd(4, a0 + k * kCols, stride);
        _tile_loadd(5, a1 + k * kCols, stride);
        _tile_loadd(6, b0 + k * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (two) {
          _tile_loadd(7, b1 + k * 256, 64);
          _tile_dpbf16ps(2, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c[0], 64);
      _tile_stored(1, c[1], 64);
      const int64_t first = std::min<int64_t>(16, M - t0);
      store_block(c[0], std::min<int64_t>(16, r1 - r0), first, out, r0, t0, y);
      if (r1 - r0 > 16) store_block(c[1], r1 - r0 - 16, first, out, r0 + 16, t0, y);
      if (two) {
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        const int64_t second = std::min<int64_t>(16, M - t0 - 16);
        store_block(c[2], std::min<int64_t>(16, r1 - r0), second, out, r0, t0 + 16, y);
        if (r1 - r0 > 16) store_block(c[3], r1 - r0 - 16, second, out, r0 + 16, t0 + 16, y);
      }
    }
  }
  _tile_release();
}

}  // namespace

bool has_amx() {
  static const bool granted = cpu_isa() == 2 && amx_granted();
  return granted;
}

// x (M, in) bf16, packed (out, row_bytes) uint8, codebook (out, gpr, 2^bits) → y (M, out) bf16; in % 32 == 0.
torch::Tensor linear_amx(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                         int64_t in_features) {
  TORCH_CHECK(has_amx(), "this CPU (or kernel) offers no AMX-BF16 tiles");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == torch::kBFloat16,
              "x must be (tokens, in_features) bf16");
  TORCH_CHECK(in_features % kCols == 0, "the AMX kernel needs in_features divisible by 32");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2, "packed codes must be 2-D uint8");
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4");
  TORCH_CHECK(packed.size(1) == (in_features + 7) / 8 * bits, "packed row length does not match in_features");
  TORCH_CHECK(codebook.dim() == 3 && codebook.size(0) == packed.size(0) && codebook.size(2) == (1 << bits) &&
              in_features % codebook.size(1) == 0, "codebook must be (out, gpr, 2^bits), gpr dividing in");
  auto xb = x.contiguous();
  auto pc = packed.contiguous();
  auto cb = codebook.to(torch::kFloat).contiguous();  // rounded to bf16 tables as they are decoded
  const int64_t M = xb.size(0), out = pc.size(0), gpr = cb.size(1);
  auto y = torch::empty({M, out}, xb.options());
  if (M == 0 || out == 0) return y;
  const auto xt = pack_tokens(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), M, in_features);
  const uint8_t* codes = pc.data_ptr<uint8_t>();
  const float* books = cb.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t n_panels = (out + kPanelRows - 1) / kPanelRows;
  at::parallel_for(0, n_panels, 4, [&](int64_t p0, int64_t p1) {
    panels(codes, pc.size(1), books, static_cast<int>(bits), gpr, in_features, out, xt.data(), M, p0, p1, yp);
  });
  return y;
}
