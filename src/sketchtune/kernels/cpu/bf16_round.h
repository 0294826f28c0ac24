// fp32 → bf16 rounding shared by the kernels that produce bf16 (the dequantized tiles, the bf16 GEMV's tables,
// the AMX kernel's outputs): one definition, so all round exactly as torch's .to(torch.bfloat16) does.
#pragma once

#include <immintrin.h>

// fp32 lanes → their bf16 bit patterns in the low 16 bits of each dword, rounded to nearest even (finite
// values: checkpoints with NaN codebooks are refused at load, and a NaN here would only need its payload kept).
// Inlined into callers compiled for any superset of these instruction sets.
__attribute__((target("avx512f,avx512bw"))) inline __m512i bf16_bits_rne(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), odd), 16);
}
