// What the one-token GEMVs (lut_gemv.cpp: fp32, bf16_gemv.cpp: bf16) share: the INT2 chunk rule, so both pick the
// same chunks for a layer, and the software prefetch of the code stream and of the codebooks.
#pragma once

#include <immintrin.h>

#include <cstdint>

// Whether a layer of INT2 groups of `group` columns takes narrow (128-column) chunks: 256-column ones only tile
// groups that are whole multiples of 256 columns (not SmolLM2's GPR 4 groups of 144 and 384 columns).
inline bool narrow_chunks(int bits, int64_t group) { return bits == 2 && group % 256 != 0; }

// The `n` fp32 codebook entries from `books` on (a row some rows ahead: its tables are a second stream beside
// the codes, 11% of INT4 GPR 4's bytes), one prefetch per cache line into L1. One token streams a layer's bytes
// once at one core's DRAM speed, and the hardware prefetcher alone keeps too few lines in flight for that.
// Prefetches never fault, so rows past the layer's last one are harmless.
inline void prefetch_books(const float* books, int64_t n) {
  for (int64_t b = 0; b < n * 4; b += 64) _mm_prefetch(reinterpret_cast<const char*>(books) + b, _MM_HINT_T0);
}

// Ahead of a chunk's codes at `at`: 2 KiB into L1 (rows are contiguous, so past a row's end it is the next row's
// start), and with `deep` (64-byte chunks: INT4, INT2 with 16 codes a lane) 6 KiB into L2 as well. One line
// in flight per chunk at 2 KiB was too few for INT4 (Zen 4, one thread, 11008×4096: fp32 1.7–2.3 ms, 0.77–1.02×
// NF4 paired by round; with the second 1.42–1.71 ms, 1.05–1.21×; bf16 0.91–1.06 ms, 1.68–1.83×; no prefetch at all
// 3.1–3.5 ms). INT3 (48-byte chunks) and narrow INT2 are bound by their decode: the second prefetch cost INT3
// 5–15% in fp32 and gained nothing in bf16, so they keep the one.
template <bool deep>
inline void prefetch_codes(const uint8_t* at) {
  _mm_prefetch(reinterpret_cast<const char*>(at + 2048), _MM_HINT_T0);
  if constexpr (deep) _mm_prefetch(reinterpret_cast<const char*>(at + 6144), _MM_HINT_T1);
}
