// AVX512-VNNI kernels (Cascade Lake, Sapphire Rapids, Zen 4): k-quants in 512-bit vectors (vpdpwssd),
// Q8_0 with 256-bit vpdpbusd (AVX512VL encoding), BF16/F16 as in the AVX2 file.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
// GCC 12's _mm512_inserti64x4 passes _mm512_undefined_epi32() and trips this warning (false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define KSDK_ISA_NS avx512vnni
#define KSDK_ISA_NAME "avx512vnni"
#define KSDK_TABLE_FN row_dot_avx512vnni
#define KSDK_VNNI 1
#include "row_dot_x86.inc"
