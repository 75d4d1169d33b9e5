// The prefill path for experts with many tokens: k-quant weights times packed tokens on int8 tiles.
//
// Each 16-row x 256-value piece of a Q4_K/Q5_K/Q6_K weight tile is decoded once into integer weights
// v = scale_j * q (Q6_K: scale_j * (q - 32) + 4096 >= 0) and split into two u8 planes, lo = v & 255 and
// hi = v >> 8, so that one super-block's sum C_lo + 256 C_hi = sum v x is exact in int32 with no per-32
// scale work between tile instructions. Once per super-block, per (row, token), the fp32 epilogue adds
// d_w d_x C - dmin_w sum_j m_j (d_x bsum_j) (Q4_K/Q5_K mins; Q6_K instead removes 4096 sum x).
// Tokens are packed once per call into TileGemm's B layout, with the Q8_K scales and sums beside them.
#pragma once

#include <cstdint>

#include "ksdk/quant_blocks.h"
#include "ksdk/tile_gemm.h"

namespace ksdk {

// Whether the tile path decodes this weight type.
inline bool tile_supported(QType t) { return t == QType::Q4_K || t == QType::Q5_K || t == QType::Q6_K; }

// What the epilogue needs of one super-block of a 16-token tile besides the int8 values.
struct alignas(64) TokenTileMeta {
  float d[kTileTokens];              // Q8_K scale per token
  float fsum32[8][kTileTokens];      // d * (sum of the 32 values of sub-block j), per token
  int32_t qsum[kTileTokens];         // sum of the 256 int8 values
};
static_assert(sizeof(TokenTileMeta) == 640, "meta layout");

// One expert's tokens in B tiles: block (tile, sb) at data + (tile * n_sb + sb) * kTokenBlockBytes, its
// meta at meta[tile * n_sb + sb]. Tokens past the expert's count are zeros (they add nothing).
struct PackedTokens {
  int8_t* data;
  TokenTileMeta* meta;
  int n_tiles, n_sb;
};

// Packs up to 16 Q8_K activation rows (n_sb super-blocks each) as token tile `tile` of `packed`.
void pack_token_tile(const uint8_t* const* act_rows, int n_tok, const PackedTokens& packed, int tile);

// Up to 16 rows of one expert's weight matrix: row r at row0 + r * row_stride, n_sb k-quant blocks each.
struct WeightTile {
  const uint8_t* row0;
  int64_t row_stride;
  int n_rows;
  QType type;
};

// One decoded super-block of 16 weight rows: the u8 planes and the row scales.
struct alignas(64) DecodedBlock {
  uint8_t lo[kTileRows * 256], hi[kTileRows * 256];
  float dw[kTileRows], mw[kTileRows][8];  // d per row; dmin * min_j per row and sub-block
};

// A worker's buffers (34 KB). The loop is software-pipelined so that no vector load waits on a tile store
// just issued, and no tile load on vector stores just issued: while the tiles multiply step k, the vector
// units decode the block of step k+1 and run the epilogue of step k-1. That keeps three decoded blocks
// (k-1's scales, k's planes, k+1's) and two sets of sums alive.
struct alignas(64) TileScratch {
  DecodedBlock blocks[3];
  int32_t c[2][4 * kTileRows * kTileTokens];
};

// For i < n_w (1 or 2, e.g. gate and up, sharing each loaded token block): acc[i][r * acc_stride + t] =
// row r of w[i] dotted with token t, for r < 16 and t < 16 * x.n_tiles (padded rows and tokens are 0).
// Needs AVX512-VNNI (BW, VL) on top of what gemm needs.
void weight_tiles_times_tokens(const TileGemm& gemm, const WeightTile* w, float* const* acc, int n_w,
                               int acc_stride, const PackedTokens& x, TileScratch& scratch);

}  // namespace ksdk
