// The one matrix operation the k-quant prefill path needs: int8 16x16 tiles over a 256-value super-block.
//
// A is 16 weight rows of u8 (two planes, lo and hi bytes of the decoded integer weights), B is 16 tokens
// of s8 in the VNNI-packed layout AMX's TDPBUSD reads: 64 rows of 64 bytes, row kk holding values
// 4kk..4kk+3 of token 0, then of token 1, ... (the 16 x 256 token block transposed in 4-byte units).
// Two implementations compute bit-identical int32 sums: AMX tiles, and an emulation on AVX512-VNNI
// (vpdpbusd on the same layout) that lets CPUs without AMX run and test the whole path.
#pragma once

#include <cstdint>
#include <string>

namespace ksdk {

constexpr int kTileRows = 16;         // weight rows per tile (A's M)
constexpr int kTileTokens = 16;       // tokens per tile (B's N)
constexpr int kTokenBlockBytes = 4096;  // one super-block of 16 tokens in B's layout (256 x 16 s8)

struct TileGemm {
  const char* name;  // "amx" or "amx-emulated"
  // Called on a worker thread before its first superblock() of a job (AMX: loads the tile palette, which
  // other code on the same thread may have changed), and after its last (AMX: releases the tile state).
  void (*begin_thread)();
  void (*end_thread)();
  // For t < n_b (1 or 2): c[2t] = A_lo * B_t and c[2t+1] = A_hi * B_t over one super-block (K = 256).
  // a_lo, a_hi: 16 rows x 256 u8, row stride 256; b[t]: kTokenBlockBytes in B's layout; c: n_b * 2 tiles of
  // 16 x 16 int32, [row][token], 64-byte rows. Sums are exact (no saturation can occur for |B| <= 127).
  void (*superblock)(const uint8_t* a_lo, const uint8_t* a_hi, const int8_t* const* b, int n_b, int32_t* c);
};

// AMX-INT8 tiles. Throws std::runtime_error if the CPU or OS lacks AMX, or Linux refuses the tile-data
// permission (requested once per process with arch_prctl(ARCH_REQ_XCOMP_PERM)).
const TileGemm& tile_gemm_amx();
// The exact emulation on AVX512-VNNI (AVX512F/BW/VL + VNNI). Throws std::runtime_error without them.
const TileGemm& tile_gemm_emulated();

// "auto" (AMX where the CPU, the OS and Linux's permission allow it, else none), "amx", "amx-emulated",
// or "off" (none: the row kernels do every expert). Returns nullptr for none; throws
// std::invalid_argument for an unknown name or one this machine cannot run (the message says why).
const TileGemm* select_tile_gemm(const std::string& name);

}  // namespace ksdk
