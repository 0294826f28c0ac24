// y = x · Ŵᵀ for 1–4 bf16 tokens straight from the packed codes, on AVX512-BF16 dot products; Ŵ never exists.
//
// Why: the fp32 GEMV (lut_gemv.cpp) turns 16 codes into 16 fp32 weights per permute and spends one FMA per 16
// multiply-adds. Once a layer no longer fits in L2 that instruction count, not memory, bounds it: on Zen 4 its
// INT4 11008×4096 layer read its codes at ~7 GB/s where bitsandbytes' NF4 kernel (which computes in bf16 on
// CPU even when asked for fp32) reads at ~15. With bf16 activations the reference's arithmetic is bf16 Ŵ times
// bf16 x with fp32 accumulation (x @ Ŵ.to(bf16)ᵀ), and then 32 weights fit in one register: the group's table
// as 16 bf16 words, one word permute (vpermw) turns 32 codes into 32 weights, and one vdpbf16ps does 32
// multiply-adds — half the instructions per weight.
//
// Layout (as the fp32 GEMV's wide chunks, in 16-bit lanes): a chunk is 64 bytes of one row — 128 INT4 codes,
// 256 INT2 — loaded once; 16-bit lane r holds the codes of columns c + L·r … c + L·r + L − 1 (L = 4 or 8), so
// step q = shift by bits·q gives 32 codes of the columns ≡ q (mod L), one per lane. INT3 chunks are 48
// bytes (128 codes) spread into 16 dword lanes of 8 codes (a byte permute, VBMI) and step q takes codes 2q and
// 2q+1 of every dword lane into its two words. x is reordered once per call to match, so the dot product pairs
// each weight with its own x. A group's columns past its last whole chunk keep x's order and are decoded 32 at
// a time (a byte permute puts each code's two bytes into its lane, a per-lane shift, a mask). Groups must be a
// multiple of 16 columns; other layers keep the fp32 GEMV. INT2 groups that are not whole 256-column chunks
// (SmolLM2's GPR 4: 144 and 384 columns) take "narrow" chunks instead: 32 bytes, each byte widened into its own
// 16-bit lane (L = 4, INT4's column order), so that such a group is whole chunks plus at most 112 tail columns
// rather than all tail (1536×576 INT2 GPR 4 had taken 1.4× the fp32 GEMV's time).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "bf16_round.h"
#include "gemv_common.h"

#include <algorithm>
#include <utility>
#include <vector>

int64_t cpu_isa();
bool has_bf16_dot();

namespace {

#define BF16GEMV __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,fma")))

// `narrow`: narrow_chunks (gemv_common.h), the rule lut_gemv.cpp's INT2 lanes follow too.
constexpr int chunk_cols(int bits, bool narrow) { return bits == 2 && !narrow ? 256 : 128; }
constexpr int steps(int bits, bool narrow) { return bits == 2 && !narrow ? 8 : 4; }  // 32-weight steps per chunk

// Column of x that lane r (0…31) of step q of a chunk multiplies.
inline int64_t lane_column(int bits, bool narrow, int64_t q, int64_t r) {
  if (bits == 3) return 8 * (r / 2) + 2 * q + (r % 2);
  return (bits == 4 || narrow ? 4 : 8) * r + q;
}

// x (M, in) bf16 → xs in the lanes' order: whole chunks reordered, each group's tail as it is.
void reorder_x(const uint16_t* x, int64_t M, int64_t in, int64_t gpr, int bits, uint16_t* xs) {
  const int64_t group = in / gpr;
  const bool narrow = narrow_chunks(bits, group);
  const int64_t chunk = chunk_cols(bits, narrow), full = group / chunk * chunk;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* src = x + m * in;
    uint16_t* dst = xs + m * in;
    for (int64_t g = 0; g < gpr; ++g) {
      for (int64_t c = g * group; c < g * group + full; c += chunk)
        for (int64_t q = 0; q < steps(bits, narrow); ++q)
          for (int64_t r = 0; r < 32; ++r) dst[c + 32 * q + r] = src[c + lane_column(bits, narrow, q, r)];
      std::copy(src + g * group + full, src + (g + 1) * group, dst + g * group + full);
    }
  }
}

// The group's k = 2^bits fp32 codebook entries as bf16 words (nearest even, as torch's .to(bfloat16)),
// repeated across all 32 words. vpermw reads only an index's low 5 bits, and with the table repeated they select
// code mod k — the code itself when the bits above it hold the next codes — so the whole-chunk steps skip the
// mask after each shift (INT4/INT2: shift, permute, dot product per 32 weights instead of 4 instructions).
BF16GEMV inline __m512i bf16_table(const float* book, int k) {
  const __m512i rounded = bf16_bits_rne(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << k) - 1), book));
  const __m256i words = _mm512_cvtepi32_epi16(rounded);  // k words in the low 2k bytes
  if (k == 16) return _mm512_broadcast_i64x4(words);
  if (k == 8) return _mm512_broadcast_i32x4(_mm256_castsi256_si128(words));
  return _mm512_set1_epi64(_mm_cvtsi128_si64(_mm256_castsi256_si128(words)));
}

// INT3 step q: one vpmultishiftqb (VBMI) puts code 2q of each dword (bit 6q) in the low byte of the dword's low
// word and code 2q+1 (bit 6q+3) in that of its high word — each byte takes 8 bits from any offset within its
// qword. The byte's 5 bits above the code are the next code's, which the repeated table ignores. (It was a
// shift, a shift and a blend: 5 instructions per 32 weights where INT4 takes 3; now INT3 takes 3 too.)
template <int kQ>
constexpr uint64_t int3_step_offsets() {
  constexpr uint64_t lo = 6 * kQ, hi = 6 * kQ + 3;  // the two codes' bits in the qword's first dword
  return lo | (lo + 8) << 8 | hi << 16 | (hi + 8) << 24 | (32 + lo) << 32 | (40 + lo) << 40 | (32 + hi) << 48 |
         (40 + hi) << 56;
}

// Step q's 32 codes of a loaded chunk `v` (INT3: already spread into dword lanes), one in the low bits of each
// 16-bit lane; the bits above it hold other codes, which the repeated table (bf16_table) makes harmless.
template <int kBits, int kQ>
BF16GEMV inline __m512i step_codes(__m512i v) {
  if constexpr (kBits == 3) {
    return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(static_cast<long long>(int3_step_offsets<kQ>())), v);
  } else {
    return kQ ? _mm512_srli_epi16(v, kBits * kQ) : v;  // no mask: bf16_table repeats the table
  }
}

// 32 codes of the columns c … c + 31 in x's order (a group's tail), one per 16-bit lane; `avail` is how many bytes
// of the row are left at c (a 16-column tail at the row's end has only 2·kBits).
template <int kBits>
BF16GEMV inline __m512i tail_codes(const uint8_t* row, int64_t c, int64_t avail, __m512i pick, __m512i shifts) {
  const int64_t n = std::min<int64_t>(4 * kBits, avail);
  const __m512i bytes = _mm512_maskz_loadu_epi8((1ULL << n) - 1, row + c * kBits / 8);
  return _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(pick, bytes), shifts),
                          _mm512_set1_epi16((1 << kBits) - 1));
}

constexpr int kChains = 4;  // accumulators per token: independent vdpbf16ps chains

// Step kQ of a chunk: 32 weights of the row from its codes, one dot product per token.
template <int kBits, int kQ, int kTokens>
BF16GEMV __attribute__((always_inline)) inline void step(__m512i v, __m512i table, const uint16_t* xs, int64_t in,
                                                          int64_t c, __m512 (&acc)[kTokens][kChains]) {
  const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(step_codes<kBits, kQ>(v), table);
  for (int m = 0; m < kTokens; ++m)
    acc[m][kQ % kChains] = _mm512_dpbf16_ps(acc[m][kQ % kChains], w,
                                            (__m512bh)_mm512_loadu_si512(xs + m * in + c + 32 * kQ));
}

template <int kBits, int kTokens, int... kQ>
BF16GEMV __attribute__((always_inline)) inline void chunk(std::integer_sequence<int, kQ...>, __m512i v,
                                                           __m512i table, const uint16_t* xs, int64_t in, int64_t c,
                                                           __m512 (&acc)[kTokens][kChains]) {
  (step<kBits, kQ, kTokens>(v, table, xs, in, c, acc), ...);
}

// Rows [r0, r1) for kTokens tokens, one row at a time. One row's codes are one sequential stream: walking two
// rows at once (one x load for both) was faster while a layer sat in L2 but read DRAM at half speed — on Zen 4,
// 11008×4096 INT4 took 2.5 ms (0.8× bitsandbytes NF4) with row pairs and 1.3 ms with single rows.
template <int kBits, bool kNarrow, int kTokens>
BF16GEMV void rows(const uint8_t* packed, int64_t row_bytes, const float* codebook, int64_t gpr, int64_t in,
                   const uint16_t* xs, int64_t out, int64_t r0, int64_t r1, float* y) {
  constexpr int kK = 1 << kBits, kChunk = chunk_cols(kBits, kNarrow), kSteps = steps(kBits, kNarrow);
  constexpr int kLoad = kBits == 3 ? 48 : 64;
  const int64_t group = in / gpr, full = group / kChunk * kChunk;
  alignas(64) uint8_t spread[64], pick[64];
  alignas(64) uint16_t shift[32];
  for (int i = 0; i < 64; ++i) spread[i] = static_cast<uint8_t>(3 * (i / 4) + std::min(i % 4, 2));
  for (int r = 0; r < 32; ++r) {  // tails: lane r's code starts at bit kBits·r, inside bytes kBits·r/8 and next
    pick[2 * r] = static_cast<uint8_t>(kBits * r / 8);
    pick[2 * r + 1] = static_cast<uint8_t>(kBits * r / 8 + 1);
    shift[r] = static_cast<uint16_t>(kBits * r % 8);
  }
  const __m512i spread_idx = _mm512_load_si512(spread), pick_idx = _mm512_load_si512(pick);
  const __m512i shifts = _mm512_load_si512(shift);
  const __mmask64 load_mask = kLoad == 64 ? ~0ULL : (1ULL << kLoad) - 1;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = packed + r * row_bytes;
    prefetch_books(codebook + (r + 8) * gpr * kK, gpr * kK);  // 8 rows ahead, as in lut_gemv.cpp
    __m512 acc[kTokens][kChains];
    for (int m = 0; m < kTokens; ++m)
      for (int k = 0; k < kChains; ++k) acc[m][k] = _mm512_setzero_ps();
    for (int64_t g = 0; g < gpr; ++g) {
      const __m512i table = bf16_table(codebook + (r * gpr + g) * kK, kK);
      for (int64_t c = g * group; c < g * group + full; c += kChunk) {
        // One token asks for bytes faster than the hardware prefetcher alone delivers them from DRAM (on Zen 4,
        // 11008×4096 INT4 took 2.3–2.5 ms without any, 1.5–1.8 with 2 KiB): see prefetch_codes.
        prefetch_codes<kLoad == 64 && !kNarrow>(row + c * kBits / 8);
        __m512i v;
        if constexpr (kNarrow) {
          v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * kBits / 8)));
        } else {
          v = _mm512_maskz_loadu_epi8(load_mask, row + c * kBits / 8);
          if constexpr (kBits == 3) v = _mm512_permutexvar_epi8(spread_idx, v);
        }
        chunk<kBits, kTokens>(std::make_integer_sequence<int, kSteps>{}, v, table, xs, in, c, acc);
      }
      for (int64_t c = g * group + full; c < (g + 1) * group; c += 32) {
        // 32 columns, or the last 16 of a group: lanes past it decode the next group's codes (or zero bytes)
        // with this table, but meet zero x, so they add nothing (codebooks are finite: NaN ones are refused)
        const __mmask32 valid = (g + 1) * group - c >= 32 ? ~__mmask32{0} : __mmask32{0xFFFF};
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(
            tail_codes<kBits>(row, c, row_bytes - c * kBits / 8, pick_idx, shifts), table);
        for (int m = 0; m < kTokens; ++m)
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w, (__m512bh)_mm512_maskz_loadu_epi16(valid, xs + m * in + c));
      }
    }
    for (int m = 0; m < kTokens; ++m) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
      y[m * out + r] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <int kBits, bool kNarrow = false>
void block(int64_t M, const uint8_t* packed, int64_t row_bytes, const float* codebook, int64_t gpr, int64_t in,
           const uint16_t* xs, int64_t out, int64_t r0, int64_t r1, float* y) {
  switch (M) {
    case 1: rows<kBits, kNarrow, 1>(packed, row_bytes, codebook, gpr, in, xs, out, r0, r1, y); break;
    case 2: rows<kBits, kNarrow, 2>(packed, row_bytes, codebook, gpr, in, xs, out, r0, r1, y); break;
    case 3: rows<kBits, kNarrow, 3>(packed, row_bytes, codebook, gpr, in, xs, out, r0, r1, y); break;
    default: rows<kBits, kNarrow, 4>(packed, row_bytes, codebook, gpr, in, xs, out, r0, r1, y);
  }
}

bool vbmi_bf16() {
  __builtin_cpu_init();
  return has_bf16_dot() && __builtin_cpu_supports("avx512vbmi");
}

}  // namespace

constexpr int64_t kBf16GemvMaxTokens = 4;

// Whether linear_bf16_gemv takes a layer of this shape here (the CPU has AVX512-BF16 and VBMI; groups of a
// multiple of 16 columns).
bool bf16_gemv_fits(int64_t in_features, int64_t gpr) {
  return vbmi_bf16() && gpr > 0 && in_features % gpr == 0 && (in_features / gpr) % 16 == 0;
}

// x (M ≤ 4, in) bf16, packed (out, row_bytes) uint8, codebook (out, gpr, 2^bits) → y (M, out) fp32.
torch::Tensor linear_bf16_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                               int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features && x.scalar_type() == torch::kBFloat16,
              "x must be (tokens, in_features) bf16");
  TORCH_CHECK(x.size(0) <= kBf16GemvMaxTokens, "linear_bf16_gemv takes at most 4 tokens");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2, "packed codes must be 2-D uint8");
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4");
  TORCH_CHECK(packed.size(1) == (in_features + 7) / 8 * bits, "packed row length does not match in_features");
  TORCH_CHECK(codebook.dim() == 3 && codebook.size(0) == packed.size(0) && codebook.size(2) == (1 << bits),
              "codebook must be (out, gpr, 2^bits)");
  TORCH_CHECK(bf16_gemv_fits(in_features, codebook.size(1)),
              "linear_bf16_gemv needs AVX512-BF16 and VBMI and groups of a multiple of 16 columns");
  auto xb = x.contiguous();
  auto pc = packed.contiguous();
  auto cb = codebook.to(torch::kFloat).contiguous();
  const int64_t M = xb.size(0), out = pc.size(0), gpr = cb.size(1);
  auto y = torch::empty({M, out}, xb.options().dtype(torch::kFloat));
  if (M == 0 || out == 0) return y;
  std::vector<uint16_t> xs(static_cast<size_t>(M * in_features));
  reorder_x(reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>()), M, in_features, gpr,
            static_cast<int>(bits), xs.data());
  const uint8_t* codes = pc.data_ptr<uint8_t>();
  const float* books = cb.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    if (bits == 4) block<4>(M, codes, pc.size(1), books, gpr, in_features, xs.data(), out, r0, r1, yp);
    else if (bits == 3) block<3>(M, codes, pc.size(1), books, gpr, in_features, xs.data(), out, r0, r1, yp);
    else if (narrow_chunks(2, in_features / gpr)) block<2, true>(M, codes, pc.size(1), books, gpr, in_features,
                                                                 xs.data(), out, r0, r1, yp);
    else block<2>(M, codes, pc.size(1), books, gpr, in_features, xs.data(), out, r0, r1, yp);
  });
  return y;
}
