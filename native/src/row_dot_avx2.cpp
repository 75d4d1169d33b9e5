// AVX2 kernels (Haswell and later, Zen): compiled for AVX2 here only, chosen at run time.
#pragma GCC target("avx2,fma,f16c")
#define KSDK_ISA_NS avx2
#define KSDK_ISA_NAME "avx2"
#define KSDK_TABLE_FN row_dot_avx2
#define KSDK_VNNI 0
#include "row_dot_x86.inc"
