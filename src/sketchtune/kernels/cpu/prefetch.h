// Software prefetch shared by the one-token GEMVs (lut_gemv.cpp, bf16_gemv.cpp). One token streams a layer's
// codes once at one core's DRAM speed; the hardware prefetcher alone kept too few lines in flight for that.
#pragma once

#include <immintrin.h>

#include <cstdint>

// The `n` fp32 codebook entries from `books` on (a row some rows ahead: its tables are a second stream beside
// the codes, 11% of INT4 GPR 4's bytes), one prefetch per cache line into L1. Prefetches never fault, so rows
// past the layer's last one are harmless.
inline void prefetch_books(const float* books, int64_t n) {
  for (int64_t b = 0; b < n * 4; b += 64) _mm_prefetch(reinterpret_cast<const char*>(books) + b, _MM_HINT_T0);
}
