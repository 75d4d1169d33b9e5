// The pause hint for spin-wait loops (fewer pipeline flushes on exit, less power, the sibling thread runs).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace ksdk {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

}  // namespace ksdk
