// Run-time CPU feature detection: picks the kernels; the module itself is compiled for baseline x86-64.
#pragma once

#include <string>

#include "ksdk/row_dot.h"
#include "ksdk/tile_gemm.h"

namespace ksdk {

struct CpuFeatures {
  bool avx2 = false;        // with FMA and F16C
  bool avx512vnni = false;  // AVX512F/BW/VL + VNNI
  bool amx_int8 = false;    // AMX-TILE + AMX-INT8 with OS tile state (XCR0 bits 17-18), and avx512vnni
};

const CpuFeatures& cpu_features();

// The best kernels this CPU runs, or the named ones ("auto", "scalar", "avx2", "avx512vnni").
// Throws std::invalid_argument for an unknown name or one this CPU cannot run.
const RowDotTable& select_row_dot(const std::string& isa);

}  // namespace ksdk
