// What the one-token GEMVs (lut_gemv.cpp: fp32, bf16_gemv.cpp: bf16) share: the INT2 chunk rule, so both pick the
// same chunks for a layer, and the software prefetch of the codebooks.
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
