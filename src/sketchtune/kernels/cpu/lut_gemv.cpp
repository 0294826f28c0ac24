// y = x · Ŵᵀ for a few tokens, straight from packed codes and per-row codebooks; Ŵ is never materialised.
//
// Format (sketchtune/layout.py): every run of 8 codes of a row is `bits` bytes, little-endian, code j at bits
// [j·bits, (j+1)·bits); codebooks are (out, gpr, 2^bits) fp32; column c belongs to group c / (in / gpr).
//
// A chunk of 16 columns (8 for AVX2) is 2·bits bytes (bits bytes): one load, shifted per lane, gives the
// codes. While a chunk stays inside one group, the group's ≤ 16-entry codebook sits in registers and a
// permute (vpermps) turns codes into weights; chunks that straddle a group boundary (group sizes that are not
// a multiple of the chunk) gather from the row's flattened codebooks instead. Accumulation is fp32; x is fp32
// or bf16. Rows are split across torch's intra-op threads. The AVX-512 and AVX2 bodies are compiled with
// target attributes and picked at run time, so the extension needs no -march flag and either path can be
// forced (``isa``: 0 = best available, 1 = AVX2, 2 = AVX-512).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "bf16_round.h"
#include "gemv_common.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kMaxTokens = 16;

struct Problem {
  const void* x;        // (M, in) fp32 or bf16, contiguous
  bool bf16;
  int64_t M, in, out;
  const uint8_t* packed;  // (out, row_bytes)
  int64_t row_bytes;
  const float* codebook;  // (out, gpr, k)
  int bits;
  int64_t gpr;
  float* y;             // (M, out) fp32
};

inline uint64_t load_bytes(const uint8_t* p, int64_t n) {
  uint64_t v = 0;
  std::memcpy(&v, p, static_cast<size_t>(n));  // x86 is little-endian, as the format is
  return v;
}

// ---------------------------------------------------------------------------------------------- AVX-512

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

AVX512 inline __m512 load_x16(const Problem& p, int64_t m, int64_t col, __mmask16 mask) {
  if (p.bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(p.x) + m * p.in + col;
    const __m256i h = _mm256_maskz_loadu_epi16(mask, src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p.x) + m * p.in + col);
}

// The group's k = 2^bits codebook entries repeated across all 16 lanes (k = 8: twice, k = 4: four times).
// vpermps reads only an index's low 4 bits, and with the table repeated those bits select code mod k — the code
// itself when the bits above it hold the next codes. The wide and split chunks therefore skip the mask after
// each shift: 3 instructions per 16 weights instead of 4 (shift, permute, FMA), where the decode, not memory,
// bounds the GEMV (INT2/INT3, and every layer that stays in cache).
AVX512 inline __m512 tiled_book(const float* book, int k) {
  const __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << k) - 1), book);
  if (k == 16) return b;
  return k == 8 ? _mm512_shuffle_f32x4(b, b, 0x44) : _mm512_shuffle_f32x4(b, b, 0x00);
}

// 16 codes of `bits` bits from the 2·bits bytes at `src`, as 16 int32 lanes. `avail` is how many bytes may be
// read there: 8 at once (bits past the chunk are masked off) unless the tensor ends sooner.
AVX512 inline __m512i codes16(const uint8_t* src, int64_t avail, int bits, __m512i shift_lo, __m512i shift_hi,
                              __m512i code_mask) {
  uint64_t word;
  if (avail >= 8) std::memcpy(&word, src, 8); else word = load_bytes(src, avail);
  if (bits == 4) {  // nibbles: low then high of each byte, interleaved back into column order
    const __m128i b = _mm_cvtsi64_si128(static_cast<long long>(word));
    const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
  }
  if (bits == 2) {  // 16 codes in 32 bits: one broadcast, one per-lane shift
    const __m512i shifts = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(word)), shifts),
                            _mm512_set1_epi32(3));
  }
  if (bits == 3) {  // lane j takes the 4 bytes from byte 3j/8 (vpshufb within each 128-bit copy), shifts 3j%8
    const __m512i pick = _mm512_set_epi8(
        8, 7, 6, 5, 8, 7, 6, 5, 7, 6, 5, 4, 7, 6, 5, 4, 7, 6, 5, 4, 6, 5, 4, 3, 6, 5, 4, 3, 6, 5, 4, 3,
        5, 4, 3, 2, 5, 4, 3, 2, 4, 3, 2, 1, 4, 3, 2, 1, 4, 3, 2, 1, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    const __m512i shifts = _mm512_set_epi32(5, 2, 7, 4, 1, 6, 3, 0, 5, 2, 7, 4, 1, 6, 3, 0);
    const __m512i bytes = _mm512_shuffle_epi8(
        _mm512_broadcast_i32x4(_mm_cvtsi64_si128(static_cast<long long>(word))), pick);
    return _mm512_and_si512(_mm512_srlv_epi32(bytes, shifts), _mm512_set1_epi32(7));
  }
  const __m512i v = _mm512_set1_epi64(static_cast<long long>(word));
  const __m256i lo = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srlv_epi64(v, shift_lo), code_mask));
  const __m256i hi = _mm512_cvtepi64_epi32(_mm512_and_si512(_mm512_srlv_epi64(v, shift_hi), code_mask));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// The 16 weights of a row at columns c … c + valid − 1 (lanes past `valid` zero): codes16, then one permute of
// the group's codebook where the chunk lies inside one group, a gather from the row's flattened codebooks
// where it straddles groups. `g0` is the group of column c; the caller walks along the row, so it only grows.
AVX512 inline __m512 weights16(const uint8_t* row, int64_t row_bytes, const float* books, int bits, int64_t group,
                               int64_t c, int64_t valid, __mmask16 mask, int64_t& g0, __m512i shift_lo,
                               __m512i shift_hi, __m512i code_mask) {
  const int k = 1 << bits;
  const int64_t off = (c / 8) * bits;
  const __m512i codes = codes16(row + off, row_bytes - off, bits, shift_lo, shift_hi, code_mask);
  while ((g0 + 1) * group <= c) ++g0;
  int64_t g1 = g0;
  while ((g1 + 1) * group < c + valid) ++g1;
  if (g0 == g1) {
    const __mmask16 book_mask = static_cast<__mmask16>((1u << k) - 1);
    return _mm512_permutexvar_ps(codes, _mm512_maskz_loadu_ps(book_mask, books + g0 * k));
  }
  const __m512i lanes32 = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i col = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c)), lanes32);
  __m512i grp = _mm512_set1_epi32(static_cast<int>(g0));
  for (int64_t g = g0 + 1; g <= g1; ++g) {
    const __mmask16 past = _mm512_cmpge_epi32_mask(col, _mm512_set1_epi32(static_cast<int>(g * group)));
    grp = _mm512_mask_add_epi32(grp, past, grp, _mm512_set1_epi32(1));
  }
  const __m512i slot = _mm512_add_epi32(_mm512_mullo_epi32(grp, _mm512_set1_epi32(k)), codes);
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, slot, books, 4);
}

// Ŵ rows [r0, r1) into dst (r1 − r0, in): the GEMV's decoding without the FMA — 16 weights per permute where
// a chunk lies inside one group, a gather where it straddles two. Used by the tiled kernels (tiles.cpp).
// With `Out` = uint16_t the rows are written as bf16, each weight rounded to nearest even.
template <typename Out>
AVX512 void dequant_rows_avx512_impl(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits,
                                     int64_t gpr, int64_t in, int64_t r0, int64_t r1, Out* dst) {
  const int k = 1 << bits;
  const int64_t group = in / gpr;
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i shift_lo = _mm512_mullo_epi64(lane, _mm512_set1_epi64(bits));
  const __m512i shift_hi = _mm512_add_epi64(shift_lo, _mm512_set1_epi64(8LL * bits));
  const __m512i code_mask = _mm512_set1_epi64(k - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = packed + r * row_bytes;
    const float* books = codebook + r * gpr * k;
    Out* d = dst + (r - r0) * in;
    int64_t g0 = 0;
    for (int64_t c = 0; c < in; c += 16) {
      const int64_t valid = std::min<int64_t>(16, in - c);
      const __mmask16 mask = valid == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1);
      const __m512 w = weights16(row, row_bytes, books, bits, group, c, valid, mask, g0, shift_lo, shift_hi,
                                 code_mask);
      if constexpr (sizeof(Out) == 4) {
        _mm512_mask_storeu_ps(d + c, mask, w);
      } else {
        const __m256i h = _mm512_cvtepi32_epi16(bf16_bits_rne(w));
        _mm256_mask_storeu_epi16(d + c, mask, h);
      }
    }
  }
}

// Ŵ rows [r0, r1) as bf16 for groups of whole 16-column chunks, decoded in 16-bit lanes: the group's table as
// 16 bf16 words in one register and a word permute (vpermw) per 16 weights — or per 32 for INT4 where groups are
// whole 32-column chunks — instead of an fp32 permute and a narrowing per 16 (≈3× fewer instructions; the
// batched bf16 kernel decodes one panel per call, so this is its decoding cost). The tables are rounded to
// bf16 (nearest even) as they are loaded.
AVX512 void dequant_rows_bf16_words(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits,
                                    int64_t gpr, int64_t in, int64_t r0, int64_t r1, uint16_t* dst) {
  const int k = 1 << bits;
  const int64_t group = in / gpr;
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i shift_lo = _mm512_mullo_epi64(lane, _mm512_set1_epi64(bits));
  const __m512i shift_hi = _mm512_add_epi64(shift_lo, _mm512_set1_epi64(8LL * bits));
  const __m512i code_mask = _mm512_set1_epi64(k - 1);
  const __mmask16 book_mask = static_cast<__mmask16>((1u << k) - 1);
  const bool pairs = bits == 4 && group % 32 == 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = packed + r * row_bytes;
    uint16_t* d = dst + (r - r0) * in;
    for (int64_t g = 0; g < gpr; ++g) {
      const __m512 book = _mm512_maskz_loadu_ps(book_mask, codebook + (r * gpr + g) * k);
      const __m256i table = _mm512_cvtepi32_epi16(bf16_bits_rne(book));
      const int64_t end = (g + 1) * group;
      if (pairs) {  // 32 nibbles = 16 bytes → 32 word indices → one vpermw on the table doubled to 32 words
        const __m512i table32 = _mm512_inserti64x4(_mm512_castsi256_si512(table), table, 1);
        for (int64_t c = g * group; c < end; c += 32) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2));
          const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
          const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
          const __m256i idx8 = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
          _mm512_storeu_si512(d + c, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx8), table32));
        }
        continue;
      }
      for (int64_t c = g * group; c < end; c += 16) {
        const int64_t off = (c / 8) * bits;
        const __m256i idx = _mm512_cvtepi32_epi16(codes16(row + off, row_bytes - off, bits, shift_lo, shift_hi,
                                                          code_mask));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c), _mm256_permutexvar_epi16(idx, table));
      }
    }
  }
}

// bins[r, g, code] += Σ of g_rows[r − r0, c] over the columns c of group g holding `code`, rows [r0, r1), for
// groups that are whole 16-column chunks: one accumulator register per code, a compare and a masked add per
// code and chunk (2^bits ≤ 16 registers), reduced once per group — no scatter, no index tensor.
template <int K>  // 2^bits, a constant so the K accumulators stay in registers
AVX512 void bin_rows_avx512_impl(const uint8_t* packed, int64_t row_bytes, const float* g_rows, int bits,
                                 int64_t gpr, int64_t in, int64_t r0, int64_t r1, float* bins) {
  const int64_t group = in / gpr;
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i shift_lo = _mm512_mullo_epi64(lane, _mm512_set1_epi64(bits));
  const __m512i shift_hi = _mm512_add_epi64(shift_lo, _mm512_set1_epi64(8LL * bits));
  const __m512i code_mask = _mm512_set1_epi64(K - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = packed + r * row_bytes;
    const float* src = g_rows + (r - r0) * in;
    for (int64_t g = 0; g < gpr; ++g) {
      __m512 acc[K];
      for (int j = 0; j < K; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = g * group; c < (g + 1) * group; c += 16) {
        const int64_t off = (c / 8) * bits;
        const __m512i codes = codes16(row + off, row_bytes - off, bits, shift_lo, shift_hi, code_mask);
        const __m512 v = _mm512_loadu_ps(src + c);
        for (int j = 0; j < K; ++j) {
          const __mmask16 hit = _mm512_cmpeq_epi32_mask(codes, _mm512_set1_epi32(j));
          acc[j] = _mm512_mask_add_ps(acc[j], hit, acc[j], v);
        }
      }
      float* out = bins + (r * gpr + g) * K;
      for (int j = 0; j < K; ++j) out[j] += _mm512_reduce_add_ps(acc[j]);
    }
  }
}

template <int kTokens>  // 0: any count up to kMaxTokens (runtime), else exactly kTokens (kept in registers)
AVX512 void rows_avx512_t(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t M = kTokens ? kTokens : p.M;
  const int k = 1 << p.bits;
  const int64_t group = p.in / p.gpr;
  const int64_t chunk_bytes = 2 * p.bits;
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i shift_lo = _mm512_mullo_epi64(lane, _mm512_set1_epi64(p.bits));
  const __m512i shift_hi = _mm512_add_epi64(shift_lo, _mm512_set1_epi64(8LL * p.bits));
  const __m512i code_mask = _mm512_set1_epi64(k - 1);
  const __mmask16 book_mask = static_cast<__mmask16>((1u << k) - 1);
  const bool aligned_groups = group % 16 == 0;  // every chunk inside one group
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * p.row_bytes;
    const float* books = p.codebook + r * p.gpr * k;
    __m512 acc[kTokens ? kTokens : kMaxTokens];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    if (aligned_groups && kTokens == 1) {  // decoding: two accumulators halve the FMA latency chain
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      const __mmask16 all = static_cast<__mmask16>(0xFFFF);
      for (int64_t g = 0; g < p.gpr; ++g) {
        const __m512 book = _mm512_maskz_loadu_ps(book_mask, books + g * k);
        const int64_t end = (g + 1) * group;
        int64_t c = g * group;
        for (; c + 16 < end; c += 32) {
          const int64_t off0 = (c / 8) * p.bits, off1 = off0 + 2 * p.bits;
          const __m512 w0 = _mm512_permutexvar_ps(
              codes16(row + off0, p.row_bytes - off0, p.bits, shift_lo, shift_hi, code_mask), book);
          const __m512 w1 = _mm512_permutexvar_ps(
              codes16(row + off1, p.row_bytes - off1, p.bits, shift_lo, shift_hi, code_mask), book);
          a0 = _mm512_fmadd_ps(w0, load_x16(p, 0, c, all), a0);
          a1 = _mm512_fmadd_ps(w1, load_x16(p, 0, c + 16, all), a1);
        }
        if (c < end) {
          const int64_t off = (c / 8) * p.bits;
          const __m512 w = _mm512_permutexvar_ps(
              codes16(row + off, p.row_bytes - off, p.bits, shift_lo, shift_hi, code_mask), book);
          a0 = _mm512_fmadd_ps(w, load_x16(p, 0, c, all), a0);
        }
      }
      acc[0] = _mm512_add_ps(a0, a1);
    } else if (aligned_groups) {
      for (int64_t g = 0; g < p.gpr; ++g) {
        const __m512 book = _mm512_maskz_loadu_ps(book_mask, books + g * k);
        const int64_t end = (g + 1) * group;
        for (int64_t c = g * group; c < end; c += 16) {
          const int64_t off = (c / 8) * p.bits;
          const __m512 w = _mm512_permutexvar_ps(
              codes16(row + off, p.row_bytes - off, p.bits, shift_lo, shift_hi,
                      code_mask), book);
          for (int64_t m = 0; m < M; ++m) {
            const __m512 xv = p.bf16
                ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                      reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.x) + m * p.in + c))), 16))
                : _mm512_loadu_ps(static_cast<const float*>(p.x) + m * p.in + c);
            acc[m] = _mm512_fmadd_ps(w, xv, acc[m]);
          }
        }
      }
    } else {  // groups not a multiple of 16 columns, or a row tail: masked chunks, gathered across groups
      int64_t g0 = 0;
      for (int64_t c = 0; c < p.in; c += 16) {
        const int64_t valid = std::min<int64_t>(16, p.in - c);
        const __mmask16 mask = valid == 16 ? static_cast<__mmask16>(0xFFFF)
                                           : static_cast<__mmask16>((1u << valid) - 1);
        const __m512 w = weights16(row, p.row_bytes, books, p.bits, group, c, valid, mask, g0, shift_lo, shift_hi,
                                   code_mask);
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(w, load_x16(p, m, c, mask), acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) p.y[m * p.out + r] = _mm512_reduce_add_ps(acc[m]);
  }
}

// INT4 and INT2 with groups of whole chunks (16 bytes: 32 INT4 or 64 INT2 codes). Byte b holds the codes of
// columns P·b + j (P = 8 / bits codes per byte, j = 0 … P−1) at bit offset bits·j, so shifting the 16 bytes by
// bits·j puts the 16 codes of the columns ≡ j (mod P) in the low bits of each byte. With x reordered once per
// call into that split (`xs`: per chunk, its columns ≡ 0, then ≡ 1, … mod P, fp32), a chunk costs one load and,
// per j, a shift, a widening, a permute and an FMA per token (no mask: tiled_book) — no interleave back into
// column order, about half the shuffle-port work of the general path.
template <int kTokens, int kBits>
AVX512 void rows_split_t(const Problem& p, const float* xs, int64_t r0, int64_t r1) {
  constexpr int kPer = 8 / kBits, kChunk = 16 * kPer, kK = 1 << kBits;
  const int64_t M = kTokens ? kTokens : p.M;
  const int64_t group = p.in / p.gpr;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * p.row_bytes;
    const float* books = p.codebook + r * p.gpr * kK;
    __m512 acc[kPer][kTokens ? kTokens : kMaxTokens];
    for (int j = 0; j < kPer; ++j)
      for (int64_t m = 0; m < M; ++m) acc[j][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.gpr; ++g) {
      const __m512 book = tiled_book(books + g * kK, kK);  // no mask after the shift: see tiled_book
      for (int64_t c = g * group; c < (g + 1) * group; c += kChunk) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / kPer));
        for (int j = 0; j < kPer; ++j) {
          const __m128i codes = j ? _mm_srli_epi16(b, kBits * j) : b;
          const __m512 w = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), book);
          for (int64_t m = 0; m < M; ++m)
            acc[j][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + m * p.in + c + 16 * j), acc[j][m]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int j = 1; j < kPer; ++j) sum = _mm512_add_ps(sum, acc[j][m]);
      p.y[m * p.out + r] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <int kBits>
AVX512 void rows_split(const Problem& p, const float* xs, int64_t r0, int64_t r1) {
  switch (p.M) {
    case 1: rows_split_t<1, kBits>(p, xs, r0, r1); break;
    case 2: rows_split_t<2, kBits>(p, xs, r0, r1); break;
    case 4: rows_split_t<4, kBits>(p, xs, r0, r1); break;
    case 8: rows_split_t<8, kBits>(p, xs, r0, r1); break;
    default: rows_split_t<0, kBits>(p, xs, r0, r1);
  }
}

// Wide chunks: 16 dword lanes, lane r holding the kL consecutive codes of columns c + kL·r … (kL = 8 for INT4
// and INT3, 16 or 8 for INT2), so a chunk of 16·kL columns is one load (INT3: 48 bytes spread into the lanes by
// one byte permute, AVX-512 VBMI; INT2 with kL = 8: 32 bytes widened word → dword) and, per code position j, a
// shift, a permute and an FMA (no mask: tiled_book) — no widening, half the shuffle-port work of the 32-column
// split. x is reordered to match: xs[c + 16j + r] = x[c + kL·r + j]. INT2 takes kL = 8 (128-column chunks)
// where its groups are not whole 256-column ones: SmolLM2's GPR 4 groups of 144 and 384 columns, which
// otherwise fell to the general path (144) or the split (384).
// A group's columns past its last whole chunk (groups need only be a multiple of 16 columns) keep x's order
// and are decoded 16 at a time as in the general path.
#define AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma")))

template <int kTokens, int kBits, int kL>
AVX512VBMI void rows_wide_t(const Problem& p, const float* xs, int64_t r0, int64_t r1) {
  constexpr int kChunk = 16 * kL, kK = 1 << kBits;
  constexpr int kBytes = kChunk * kBits / 8;  // 64 (INT4, INT2 with kL = 16), 48 (INT3) or 32 (INT2, kL = 8)
  // Independent FMA chains per token. One token with two chains was bound by the FMA latency, not by the decode
  // or memory: 4 cycles per FMA, 2 chains → 16 weights per 2 cycles (Zen 4: INT2 11008×4096 1.77 ms, the same as
  // INT4's 1.86 from twice the bytes). Two tokens already give two chains each; more would crowd the registers.
  constexpr int kChains = kTokens == 1 ? 4 : 2;
  const int64_t M = kTokens ? kTokens : p.M;
  const int64_t group = p.in / p.gpr;
  const __mmask64 load_mask = kBytes == 64 ? ~0ULL : ((1ULL << kBytes) - 1);
  // INT3: lane r takes bytes 3r, 3r+1, 3r+2 (the fourth byte is never read by a 3-bit code ≤ bit 23).
  alignas(64) uint8_t spread[64];
  for (int k = 0; k < 64; ++k) spread[k] = static_cast<uint8_t>(3 * (k / 4) + std::min(k % 4, 2));
  const __m512i spread_idx = _mm512_load_si512(spread);
  const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i shift_lo = _mm512_mullo_epi64(lane, _mm512_set1_epi64(kBits));
  const __m512i shift_hi = _mm512_add_epi64(shift_lo, _mm512_set1_epi64(8LL * kBits));
  const __m512i code_mask = _mm512_set1_epi64(kK - 1);
  const int64_t full = group / kChunk * kChunk;  // columns of a group in whole chunks
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * p.row_bytes;
    const float* books = p.codebook + r * p.gpr * kK;
    prefetch_books(books + 8 * p.gpr * kK, p.gpr * kK);  // 8 rows ahead: GPR 4's tables are 11% of INT4's bytes
    __m512 acc[kChains][kTokens ? kTokens : kMaxTokens];
    for (int h = 0; h < kChains; ++h)
      for (int64_t m = 0; m < M; ++m) acc[h][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.gpr; ++g) {
      const __m512 book = tiled_book(books + g * kK, kK);  // no mask after the shift: see tiled_book
      for (int64_t c = g * group; c < g * group + full; c += kChunk) {
        // One token asks for bytes faster than the hardware prefetcher brings them from DRAM: see prefetch_codes.
        prefetch_codes<kBytes == 64>(row + c * kBits / 8);
        __m512i v;
        if constexpr (kBytes == 32) {
          v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * kBits / 8)));
        } else {
          v = _mm512_maskz_loadu_epi8(load_mask, row + c * kBits / 8);
          if (kBits == 3) v = _mm512_permutexvar_epi8(spread_idx, v);
        }
        for (int j = 0; j < kL; ++j) {
          const __m512i codes = j ? _mm512_srli_epi32(v, kBits * j) : v;
          const __m512 w = _mm512_permutexvar_ps(codes, book);
          for (int64_t m = 0; m < M; ++m)
            acc[j % kChains][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + m * p.in + c + 16 * j), acc[j % kChains][m]);
        }
      }
      for (int64_t c = g * group + full; c < (g + 1) * group; c += 16) {  // the tail, in x's own order
        const int64_t off = (c / 8) * kBits;
        const __m512 w = _mm512_permutexvar_ps(
            codes16(row + off, p.row_bytes - off, kBits, shift_lo, shift_hi, code_mask), book);
        for (int64_t m = 0; m < M; ++m)
          acc[0][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xs + m * p.in + c), acc[0][m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int h = 1; h < kChains; ++h) sum = _mm512_add_ps(sum, acc[h][m]);
      p.y[m * p.out + r] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <int kBits, int kL>
AVX512VBMI void rows_wide(const Problem& p, const float* xs, int64_t r0, int64_t r1) {
  switch (p.M) {
    // One token: one row at a time. Walking two rows at once (one x load serving both) was faster while the
    // layer sat in cache but read DRAM at half speed: on Zen 4, one thread, INT4 4096² took 1.4–1.5 ms with row
    // pairs and 0.72–0.78 with single rows, 11008×4096 3.5 ms and 1.9–2.8 (bitsandbytes NF4: 0.7 and 1.8–2.1).
    case 1: rows_wide_t<1, kBits, kL>(p, xs, r0, r1); break;
    case 2: rows_wide_t<2, kBits, kL>(p, xs, r0, r1); break;
    case 4: rows_wide_t<4, kBits, kL>(p, xs, r0, r1); break;
    case 8: rows_wide_t<8, kBits, kL>(p, xs, r0, r1); break;
    default: rows_wide_t<0, kBits, kL>(p, xs, r0, r1);
  }
}

inline float x_at(const Problem& p, int64_t i) {
  if (!p.bf16) return static_cast<const float*>(p.x)[i];
  const uint32_t bitsv = static_cast<uint32_t>(static_cast<const uint16_t*>(p.x)[i]) << 16;
  float v;
  std::memcpy(&v, &bitsv, 4);
  return v;
}

// x (M, in) → xs in the lane order of rows_wide_t with L codes per lane (whole chunks; each group's tail as it
// is), fp32.
void wide_columns(const Problem& p, int64_t L, float* xs) {
  const int64_t chunk = 16 * L, group = p.in / p.gpr, full = group / chunk * chunk;
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t g = 0; g < p.gpr; ++g) {
      for (int64_t c = g * group; c < g * group + full; c += chunk)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t j = 0; j < L; ++j) xs[m * p.in + c + 16 * j + r] = x_at(p, m * p.in + c + L * r + j);
      for (int64_t c = g * group + full; c < (g + 1) * group; ++c) xs[m * p.in + c] = x_at(p, m * p.in + c);
    }
  }
}

// x (M, in) → xs in the split of rows_split_t, fp32.
void split_columns(const Problem& p, float* xs) {
  const int64_t per = 8 / p.bits, chunk = 16 * per;
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t c = 0; c < p.in; c += chunk)
      for (int64_t i = 0; i < 16; ++i)
        for (int64_t j = 0; j < per; ++j) xs[m * p.in + c + 16 * j + i] = x_at(p, m * p.in + c + per * i + j);
}

AVX512 void rows_avx512(const Problem& p, int64_t r0, int64_t r1) {
  switch (p.M) {
    case 1: rows_avx512_t<1>(p, r0, r1); break;
    case 2: rows_avx512_t<2>(p, r0, r1); break;
    case 4: rows_avx512_t<4>(p, r0, r1); break;
    default: rows_avx512_t<0>(p, r0, r1);
  }
}

// ------------------------------------------------------------------------------------------------- AVX2

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 inline __m256 load_x8(const Problem& p, int64_t m, int64_t col, int64_t valid) {
  if (valid < 8) {  // the row's tail: no masked 16-bit loads in AVX2, so go through a zeroed buffer
    alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < valid; ++j) {
      if (p.bf16) {
        const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p.x)[m * p.in + col + j]) << 16;
        std::memcpy(&buf[j], &bits, 4);
      } else {
        buf[j] = static_cast<const float*>(p.x)[m * p.in + col + j];
      }
    }
    return _mm256_load_ps(buf);
  }
  if (p.bf16) {
    const uint16_t* xh = static_cast<const uint16_t*>(p.x) + m * p.in + col;
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xh));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(p.x) + m * p.in + col);
}

AVX2 inline __m256 book_lookup(__m256i codes, __m256 lo, __m256 hi, int k) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, codes);
  if (k <= 8) return a;
  const __m256 b = _mm256_permutevar8x32_ps(hi, codes);  // permutevar uses the low 3 bits of each code
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(codes, _mm256_set1_epi32(7))));
}

// 8 codes (one run, `bits` bytes) starting at column c, as 8 int32 lanes.
AVX2 inline __m256i codes8(const Problem& p, const uint8_t* row, int64_t c, __m256i shifts, __m256i code_mask) {
  const int64_t off = (c / 8) * p.bits;
  uint32_t word;
  if (p.row_bytes - off >= 4) std::memcpy(&word, row + off, 4);
  else word = static_cast<uint32_t>(load_bytes(row + off, p.row_bytes - off));
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), code_mask);
}

// kTokens as in rows_avx512_t: a compile-time token count keeps the accumulators in registers (with a runtime
// count GCC kept them in memory — the AVX2 path ran at 0.4–0.8× dense fp32 before this).
template <int kTokens>
AVX2 void rows_avx2_t(const Problem& p, int64_t r0, int64_t r1) {
  const int64_t M = kTokens ? kTokens : p.M;
  const int k = 1 << p.bits;
  const int64_t group = p.in / p.gpr;
  const __m256i shifts = _mm256_mullo_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32(p.bits));
  const __m256i code_mask = _mm256_set1_epi32(k - 1);
  const __m256i lanes = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  const __m256i book_lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(std::min(k, 8)), lanes);
  const bool aligned_groups = group % 8 == 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.packed + r * p.row_bytes;
    const float* books = p.codebook + r * p.gpr * k;
    __m256 acc[kTokens ? kTokens : kMaxTokens];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    if (aligned_groups) {
      for (int64_t g = 0; g < p.gpr; ++g) {
        const __m256 lo = _mm256_maskload_ps(books + g * k, book_lanes);
        const __m256 hi = k > 8 ? _mm256_loadu_ps(books + g * k + 8) : lo;
        for (int64_t c = g * group, end = (g + 1) * group; c < end; c += 8) {
          const __m256 w = book_lookup(codes8(p, row, c, shifts, code_mask), lo, hi, k);
          for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w, load_x8(p, m, c, 8), acc[m]);
        }
      }
    } else {
      int64_t g0 = 0;
      for (int64_t c = 0; c < p.in; c += 8) {
        const int64_t valid = std::min<int64_t>(8, p.in - c);
        const __m256i codes = codes8(p, row, c, shifts, code_mask);
        while ((g0 + 1) * group <= c) ++g0;
        int64_t g1 = g0;
        while ((g1 + 1) * group < c + valid) ++g1;
        __m256 w;
        if (g0 == g1) {
          const __m256 lo = _mm256_maskload_ps(books + g0 * k, book_lanes);
          w = book_lookup(codes, lo, k > 8 ? _mm256_loadu_ps(books + g0 * k + 8) : lo, k);
        } else {
          const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c)), lanes);
          __m256i grp = _mm256_set1_epi32(static_cast<int>(g0));
          for (int64_t g = g0 + 1; g <= g1; ++g) {
            const __m256i past = _mm256_cmpgt_epi32(col, _mm256_set1_epi32(static_cast<int>(g * group - 1)));
            grp = _mm256_sub_epi32(grp, past);  // past is -1 where col ≥ g·group
          }
          const __m256i slot = _mm256_add_epi32(_mm256_mullo_epi32(grp, _mm256_set1_epi32(k)), codes);
          const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid)), lanes);
          w = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), books, slot, _mm256_castsi256_ps(live), 4);
        }
        for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w, load_x8(p, m, c, valid), acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
      p.y[m * p.out + r] = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
    }
  }
}

AVX2 void rows_avx2(const Problem& p, int64_t r0, int64_t r1) {
  switch (p.M) {
    case 1: rows_avx2_t<1>(p, r0, r1); break;
    case 2: rows_avx2_t<2>(p, r0, r1); break;
    case 4: rows_avx2_t<4>(p, r0, r1); break;
    default: rows_avx2_t<0>(p, r0, r1);
  }
}

bool vbmi() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vbmi");
}

int best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
  return 0;
}

constexpr int64_t kBlock = 4;
void gemv_block(const Problem& p, int use);

}  // namespace

// x (M, in) fp32/bf16, packed (out, row_bytes) uint8, codebook (out, gpr, 2^bits) → y (M, out) fp32.
torch::Tensor lut_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                       int64_t in_features, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in_features, "x must be (tokens, in_features)");
  TORCH_CHECK(x.size(0) <= kMaxTokens, "lut_gemv takes at most 16 tokens");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "x must be fp32 or bf16");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 2, "packed codes must be 2-D uint8");
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4");
  TORCH_CHECK(packed.size(1) == (in_features + 7) / 8 * bits, "packed row length does not match in_features");
  TORCH_CHECK(codebook.dim() == 3 && codebook.size(0) == packed.size(0) && codebook.size(2) == (1 << bits),
              "codebook must be (out, gpr, 2^bits)");
  TORCH_CHECK(in_features % codebook.size(1) == 0, "gpr must divide in_features");
  const int have = best_isa();
  const int use = isa == 0 ? have : static_cast<int>(isa);
  TORCH_CHECK(use >= 1 && use <= have, "requested instruction set is not available on this CPU");
  auto xc = x.contiguous();
  auto pc = packed.contiguous();
  auto cb = codebook.to(torch::kFloat).contiguous();
  const int64_t out = packed.size(0);
  auto y = torch::empty({x.size(0), out}, x.options().dtype(torch::kFloat));
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  const int64_t x_bytes = bf16 ? 2 : 4;
  // Tokens in blocks of kBlock, the remainder as 2 + 1: each block's accumulators stay in registers (8 tokens'
  // spill on AVX-512 and ran up to 2.6× slower than two blocks of 4), and every block size is a compiled one.
  for (int64_t m0 = 0; m0 < x.size(0);) {
    const int64_t left = x.size(0) - m0, m = left >= kBlock ? kBlock : (left >= 2 ? 2 : 1);
    Problem p{static_cast<const char*>(xc.data_ptr()) + m0 * in_features * x_bytes, bf16, m, in_features, out,
              pc.data_ptr<uint8_t>(), pc.size(1), cb.data_ptr<float>(), static_cast<int>(bits), cb.size(1),
              y.data_ptr<float>() + m0 * out};
    if (out > 0) gemv_block(p, use);
    m0 += m;
  }
  return y;
}

namespace {

void gemv_block(const Problem& p, int use) {
  const int64_t bits = p.bits, in_features = p.in, out = p.out;
  const int64_t group = in_features / p.gpr;
  // Which decoding: wide chunks when they tile the group exactly; else the 32/64-column split when it does
  // (INT4/INT2); else wide chunks with a tail; else the general path.
  const int64_t lanes = bits == 2 && !narrow_chunks(bits, group) ? 16 : 8, wide = 16 * lanes;
  const bool split_fits = (bits == 4 || bits == 2) && group % (16 * 8 / bits) == 0;
  if (use == 2 && vbmi() && group % 16 == 0 && group >= wide && (group % wide == 0 || !split_fits)) {
    std::vector<float> xs(static_cast<size_t>(p.M * in_features));
    wide_columns(p, lanes, xs.data());
    at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
      if (bits == 4) rows_wide<4, 8>(p, xs.data(), r0, r1);
      else if (bits == 3) rows_wide<3, 8>(p, xs.data(), r0, r1);
      else if (lanes == 16) rows_wide<2, 16>(p, xs.data(), r0, r1);
      else rows_wide<2, 8>(p, xs.data(), r0, r1);
    });
    return;
  }
  if (use == 2 && split_fits) {
    std::vector<float> xs(static_cast<size_t>(p.M * in_features));
    split_columns(p, xs.data());
    at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
      if (bits == 4) rows_split<4>(p, xs.data(), r0, r1); else rows_split<2>(p, xs.data(), r0, r1);
    });
    return;
  }
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    if (use == 2) rows_avx512(p, r0, r1); else rows_avx2(p, r0, r1);
  });
}

}  // namespace

int64_t cpu_isa() { return best_isa(); }

void dequant_rows_avx512(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits, int64_t gpr,
                         int64_t in, int64_t r0, int64_t r1, float* dst) {
  dequant_rows_avx512_impl<float>(packed, row_bytes, codebook, bits, gpr, in, r0, r1, dst);
}

void dequant_rows_bf16_avx512(const uint8_t* packed, int64_t row_bytes, const float* codebook, int bits,
                              int64_t gpr, int64_t in, int64_t r0, int64_t r1, uint16_t* dst) {
  if ((in / gpr) % 16 == 0) dequant_rows_bf16_words(packed, row_bytes, codebook, bits, gpr, in, r0, r1, dst);
  else dequant_rows_avx512_impl<uint16_t>(packed, row_bytes, codebook, bits, gpr, in, r0, r1, dst);
}

void bin_rows_avx512(const uint8_t* packed, int64_t row_bytes, const float* g_rows, int bits, int64_t gpr,
                     int64_t in, int64_t r0, int64_t r1, float* bins) {
  if (bits == 2) bin_rows_avx512_impl<4>(packed, row_bytes, g_rows, bits, gpr, in, r0, r1, bins);
  else if (bits == 3) bin_rows_avx512_impl<8>(packed, row_bytes, g_rows, bits, gpr, in, r0, r1, bins);
  else bin_rows_avx512_impl<16>(packed, row_bytes, g_rows, bits, gpr, in, r0, r1, bins);
}

// tiles.cpp
torch::Tensor dequantize(torch::Tensor packed, torch::Tensor codebook, int64_t bits, int64_t in_features,
                         int64_t isa);
torch::Tensor linear_tiled(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                           int64_t in_features, int64_t isa);
std::tuple<torch::Tensor, torch::Tensor> linear_backward(torch::Tensor grad_out, torch::Tensor x,
                                                         torch::Tensor packed, torch::Tensor codebook,
                                                         int64_t bits, int64_t in, int64_t gpr, bool need_x,
                                                         bool need_codebook, int64_t isa, bool bf16_product);
torch::Tensor bin_reduce(torch::Tensor grad_weight, torch::Tensor packed, int64_t bits, int64_t gpr, int64_t isa);
// bf16_dot.cpp
bool has_bf16_dot();
torch::Tensor linear_bf16_dot(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                              int64_t in_features);
// amx_linear.cpp
bool has_amx();
torch::Tensor linear_amx(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                         int64_t in_features);
// bf16_gemv.cpp
bool bf16_gemv_fits(int64_t in_features, int64_t gpr);
torch::Tensor linear_bf16_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook, int64_t bits,
                               int64_t in_features);
// linear_dispatch.cpp
std::string linear_kernel(int64_t tokens, bool bf16, int64_t in_features, int64_t gpr, int64_t isa);
int64_t gemv_max_tokens(bool bf16, int64_t isa);
torch::Tensor linear_cpu(torch::Tensor x, torch::Tensor packed, torch::Tensor codebook,
                         c10::optional<torch::Tensor> bias, int64_t bits, int64_t in_features, int64_t isa);
int64_t parallel_threads(int64_t tasks);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_gemv", &lut_gemv, "y = x·Ŵᵀ from packed codes (fp32 out)");
  m.def("dequantize", &dequantize, "Ŵ (out, in) fp32 from packed codes");
  m.def("linear_tiled", &linear_tiled, "y = x·Ŵᵀ (fp32), Ŵ dequantized one row tile at a time");
  m.def("linear_backward", &linear_backward, "(∂x, ∂codebook) fp32, tile by tile, bins fused with the codes",
        py::arg("grad_out"), py::arg("x"), py::arg("packed"), py::arg("codebook"), py::arg("bits"), py::arg("in"),
        py::arg("gpr"), py::arg("need_x"), py::arg("need_codebook"), py::arg("isa"), py::arg("bf16_product") = false);
  m.def("bin_reduce", &bin_reduce, "∂codebook (fp32) from a dense ∂Ŵ");
  m.def("cpu_isa", &cpu_isa, "0: neither, 1: AVX2+FMA, 2: AVX-512");
  m.def("has_bf16_dot", &has_bf16_dot, "whether linear_bf16_dot runs here (AVX-512 with AVX512-BF16)");
  m.def("linear_bf16_dot", &linear_bf16_dot, "y = x·Ŵᵀ (bf16) on bf16 dot products, Ŵ one row panel at a time");
  m.def("bf16_gemv_fits", &bf16_gemv_fits, "whether linear_bf16_gemv takes this in_features and gpr here");
  m.def("linear_bf16_gemv", &linear_bf16_gemv, "y = x·Ŵᵀ (fp32) for ≤ 4 bf16 tokens on bf16 dot products, no Ŵ");
  m.def("gemv_max_tokens", &gemv_max_tokens, "up to how many tokens linear_cpu runs the GEMV");
  m.def("linear_kernel", &linear_kernel, "which kernel linear_cpu runs: gemv, bf16_gemv, amx, bf16_dot or tiles");
  m.def("linear_cpu", &linear_cpu, "y = x·Ŵᵀ (+ bias) in x's dtype, the kernel picked by token count");
  m.def("parallel_threads", &parallel_threads, "distinct threads at::parallel_for used for n one-element tasks");
  m.def("has_amx", &has_amx, "whether linear_amx runs here (AMX-TILE and AMX-BF16, granted by the OS)");
  m.def("linear_amx", &linear_amx, "y = x·Ŵᵀ (bf16) on AMX tiles, Ŵ one 32-row panel at a time");
}
