// k-quant super-blocks decoded into the tile path's u8 planes, token packing, and the fp32 epilogue
// (see kquant_tiles.h). AVX-512 only: the tile path runs on CPUs with AMX (all have it) or on its emulation.
#include "ksdk/kquant_tiles.h"

#include <cstring>

// Library headers first, then the target (see tile_gemm_amx.cpp: GCC 13).
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
// GCC 12's _mm512_inserti64x4 / broadcasts pass undefined vectors and trip this warning (false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

namespace ksdk {
namespace {

inline float f16(uint16_t h) { return _cvtsh_ss(h); }

// A vector of i16 lanes: lo in the low 256 bits, hi in the high 256 (constants after unrolling).
inline __m512i halves16(int lo, int hi) {
  const int l = (lo & 0xFFFF) | (lo << 16), h = (hi & 0xFFFF) | (hi << 16);
  return _mm512_set_epi32(h, h, h, h, h, h, h, h, l, l, l, l, l, l, l, l);
}

// vpshufb index: byte e_l of each 128-bit lane l of the table at even (odd) byte positions, zero at the others.
inline __m512i pick_bytes(int e0, int e1, int e2, int e3, bool odd) {
  auto word = [odd](int e) {
    const int w = odd ? (e << 8) | 0x80 : 0x8000 | e;
    return w | (w << 16);
  };
  const int w0 = word(e0), w1 = word(e1), w2 = word(e2), w3 = word(e3);
  return _mm512_set_epi32(w3, w3, w3, w3, w2, w2, w2, w2, w1, w1, w1, w1, w0, w0, w0, w0);
}

// q: 64 u8 weights (values 64p..64p+63), scales: a table whose byte e_l scales 128-bit lane l.
// Returns the words v of the even bytes (e) and of the odd bytes (o): v = scale * q.
struct Words {
  __m512i e, o;
};
inline Words scale_bytes(__m512i q, __m512i table, int e0, int e1, int e2, int e3) {
  const __m512i s_even = _mm512_shuffle_epi8(table, pick_bytes(e0, e1, e2, e3, false));
  const __m512i s_odd = _mm512_shuffle_epi8(table, pick_bytes(e0, e1, e2, e3, true));
  return {_mm512_maddubs_epi16(q, s_even), _mm512_maddubs_epi16(q, s_odd)};  // |v| < 2^13: no saturation
}

// Stores the 64 values (words e: even bytes, o: odd bytes, each < 2^16) as lo and hi u8 planes.
inline void split_store(const Words& v, uint8_t* lo, uint8_t* hi) {
  const __m512i low_byte = _mm512_set1_epi16(0x00FF);
  _mm512_store_si512(lo, _mm512_or_si512(_mm512_and_si512(v.e, low_byte), _mm512_slli_epi16(v.o, 8)));
  _mm512_store_si512(hi, _mm512_or_si512(_mm512_srli_epi16(v.e, 8), _mm512_andnot_si512(low_byte, v.o)));
}

inline __m512i low_nibbles_pair(const uint8_t* qs32) {  // 32 bytes: low nibbles, then high nibbles
  const __m512i q = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs32)));
  return _mm512_and_si512(_mm512_srlv_epi16(q, halves16(0, 4)), _mm512_set1_epi8(0xF));
}

// Q4_K/Q5_K: 6-bit scales and mins (see kquant_scale_min), as 8 bytes each.
inline void kquant_scales_mins(const uint8_t* packed, uint64_t* sc, uint64_t* mn) {
  uint32_t w[3];
  std::memcpy(w, packed, 12);
  const uint32_t sc_lo = w[0] & 0x3F3F3F3Fu, mn_lo = w[1] & 0x3F3F3F3Fu;
  const uint32_t sc_hi = (w[2] & 0x0F0F0F0Fu) | (((w[0] >> 6) & 0x03030303u) << 4);
  const uint32_t mn_hi = ((w[2] >> 4) & 0x0F0F0F0Fu) | (((w[1] >> 6) & 0x03030303u) << 4);
  *sc = sc_lo | uint64_t(sc_hi) << 32;
  *mn = mn_lo | uint64_t(mn_hi) << 32;
}

template <typename Block>
void decode_q45k(const Block& b, int r, DecodedBlock& s) {
  constexpr bool kQ5 = sizeof(Block) == sizeof(BlockQ5K);
  uint64_t sc, mn;
  kquant_scales_mins(b.scales, &sc, &mn);
  s.dw[r] = f16(b.d);
  const __m256 mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(mn))));
  _mm256_store_ps(s.mw[r], _mm256_mul_ps(mins, _mm256_set1_ps(f16(b.dmin))));
  const __m512i table = _mm512_set1_epi64(int64_t(sc));
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {  // values 64p..64p+63: sub-blocks 2p (low nibbles) and 2p+1 (high)
    __m512i q = low_nibbles_pair(b.qs + 32 * p);
    if constexpr (kQ5) {
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh)));
      const __m512i bit = _mm512_and_si512(_mm512_srlv_epi16(qh, halves16(2 * p, 2 * p + 1)), _mm512_set1_epi8(1));
      q = _mm512_or_si512(q, _mm512_slli_epi16(bit, 4));
    }
    const Words v = scale_bytes(q, table, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1);
    split_store(v, s.lo + 256 * r + 64 * p, s.hi + 256 * r + 64 * p);
  }
}

void decode_q6k(const BlockQ6K& b, int r, DecodedBlock& s) {
  s.dw[r] = f16(b.d);
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales)));
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {  // values 64p..64p+63, one scale per 16 (per 128-bit lane)
    const int half = p / 2, g = 2 * (p % 2);
    const __m512i l = _mm512_loadu_si512(b.ql + 64 * half);
    const __m512i lo = _mm512_and_si512(g == 0 ? l : _mm512_srli_epi16(l, 4), _mm512_set1_epi8(0xF));
    const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * half)));
    const __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(h, halves16(2 * g, 2 * g + 2)), _mm512_set1_epi8(3));
    const __m512i q = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));  // 0..63, the value is q - 32
    Words v = scale_bytes(q, table, 4 * p, 4 * p + 1, 4 * p + 2, 4 * p + 3);
    // + 4096 - 32 * scale: v = scale * (q - 32) + 4096 in [32, 8192]
    const __m512i scale32 = _mm512_maddubs_epi16(_mm512_set1_epi8(32),
                                                 _mm512_shuffle_epi8(table, pick_bytes(4 * p, 4 * p + 1, 4 * p + 2, 4 * p + 3, false)));
    const __m512i offset = _mm512_sub_epi16(_mm512_set1_epi16(4096), scale32);
    v.e = _mm512_add_epi16(v.e, offset);
    v.o = _mm512_add_epi16(v.o, offset);
    split_store(v, s.lo + 256 * r + 64 * p, s.hi + 256 * r + 64 * p);
  }
}

template <typename Block>
void decode_rows(const WeightTile& w, int sb, DecodedBlock& s) {
  for (int r = 0; r < kTileRows; ++r) {
    if (r >= w.n_rows) {  // past the matrix: zero weights
      std::memset(s.lo + 256 * r, 0, 256);
      std::memset(s.hi + 256 * r, 0, 256);
      s.dw[r] = 0.f;
      std::memset(s.mw[r], 0, sizeof(s.mw[r]));
      continue;
    }
    const Block& b = reinterpret_cast<const Block*>(w.row0 + r * w.row_stride)[sb];
    if constexpr (sizeof(Block) == sizeof(BlockQ6K))
      decode_q6k(b, r, s);
    else
      decode_q45k(b, r, s);
  }
}

void decode(const WeightTile& w, int sb, DecodedBlock& s) {
  switch (w.type) {
    case QType::Q4_K: return decode_rows<BlockQ4K>(w, sb, s);
    case QType::Q5_K: return decode_rows<BlockQ5K>(w, sb, s);
    case QType::Q6_K: return decode_rows<BlockQ6K>(w, sb, s);
    default: return;  // callers check tile_supported()
  }
}

// The weight tile's blocks `sb` in flight: they are read 16 streams at a time, too many for the
// hardware prefetchers to follow.
void prefetch_blocks(const WeightTile& w, int sb) {
  const int64_t bytes = int64_t(block_bytes(w.type));
  for (int r = 0; r < w.n_rows; ++r) {
    const uint8_t* p = w.row0 + r * w.row_stride + sb * bytes;
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(p + off), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p + bytes - 1), _MM_HINT_T0);
  }
}

// acc[r][16 tokens] += this super-block's contribution, from its int32 sums c_lo, c_hi.
void epilogue(QType type, const int32_t* c_lo, const int32_t* c_hi, const TokenTileMeta& m, const DecodedBlock& s,
              float* acc, int acc_stride) {
  const __m512 dx = _mm512_load_ps(m.d);
  if (type == QType::Q6_K) {
    const __m512i offset = _mm512_slli_epi32(_mm512_load_si512(m.qsum), 12);  // 4096 * sum x
    for (int r = 0; r < kTileRows; ++r) {
      __m512i c = _mm512_add_epi32(_mm512_load_si512(c_lo + 16 * r), _mm512_slli_epi32(_mm512_load_si512(c_hi + 16 * r), 8));
      c = _mm512_sub_epi32(c, offset);
      float* a = acc + r * acc_stride;
      const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(c), dx);
      _mm512_storeu_ps(a, _mm512_fmadd_ps(f, _mm512_set1_ps(s.dw[r]), _mm512_loadu_ps(a)));
    }
    return;
  }
  __m512 fsum[8];
  for (int j = 0; j < 8; ++j) fsum[j] = _mm512_load_ps(m.fsum32[j]);
  for (int r = 0; r < kTileRows; ++r) {
    const __m512i c = _mm512_add_epi32(_mm512_load_si512(c_lo + 16 * r), _mm512_slli_epi32(_mm512_load_si512(c_hi + 16 * r), 8));
    float* a = acc + r * acc_stride;
    __m512 v = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(c), dx), _mm512_set1_ps(s.dw[r]), _mm512_loadu_ps(a));
    for (int j = 0; j < 8; ++j) v = _mm512_fnmadd_ps(_mm512_set1_ps(s.mw[r][j]), fsum[j], v);
    _mm512_storeu_ps(a, v);
  }
}

constexpr int kPrefetchBlocksAhead = 2;

}  // namespace

void pack_token_tile(const uint8_t* const* act_rows, int n_tok, const PackedTokens& packed, int tile) {
  for (int sb = 0; sb < packed.n_sb; ++sb) {
    int32_t* dst = reinterpret_cast<int32_t*>(packed.data + (int64_t(tile) * packed.n_sb + sb) * kTokenBlockBytes);
    TokenTileMeta& meta = packed.meta[int64_t(tile) * packed.n_sb + sb];
    for (int n = 0; n < kTileTokens; ++n) {
      if (n >= n_tok) {
        for (int kk = 0; kk < 64; ++kk) dst[kk * kTileTokens + n] = 0;
        meta.d[n] = 0.f;
        meta.qsum[n] = 0;
        for (int j = 0; j < 8; ++j) meta.fsum32[j][n] = 0.f;
        continue;
      }
      const BlockQ8K& x = reinterpret_cast<const BlockQ8K*>(act_rows[n])[sb];
      int32_t q4[64];
      std::memcpy(q4, x.qs, sizeof(q4));
      for (int kk = 0; kk < 64; ++kk) dst[kk * kTileTokens + n] = q4[kk];  // 4 values of token n per B row
      int qsum = 0;
      for (int j = 0; j < 8; ++j) {
        const int s32 = x.bsums[2 * j] + x.bsums[2 * j + 1];
        meta.fsum32[j][n] = x.d * float(s32);
        qsum += s32;
      }
      meta.d[n] = x.d;
      meta.qsum[n] = qsum;
    }
  }
}

void weight_tiles_times_tokens(const TileGemm& gemm, const WeightTile* w, float* const* acc, int n_w,
                               int acc_stride, const PackedTokens& x, TileScratch& scratch) {
  const int n_tokens = x.n_tiles * kTileTokens;
  for (int i = 0; i < n_w; ++i)
    for (int r = 0; r < kTileRows; ++r) std::memset(acc[i] + r * acc_stride, 0, sizeof(float) * n_tokens);
  for (int i = 0; i < n_w; ++i)
    for (int sb = 0; sb < kPrefetchBlocksAhead && sb < x.n_sb; ++sb) prefetch_blocks(w[i], sb);
  // Step k multiplies one pair (or the last single) of token tiles by one decoded block; the blocks
  // (group g = k / pairs: super-block g / n_w of weight g % n_w) are used in order, a pair at a time.
  const int pairs = (x.n_tiles + 1) / 2, n_steps = x.n_sb * n_w * pairs;
  auto decode_group = [&](int g) {
    const int sb = g / n_w, i = g % n_w;
    if (sb + kPrefetchBlocksAhead < x.n_sb) prefetch_blocks(w[i], sb + kPrefetchBlocksAhead);
    decode(w[i], sb, scratch.blocks[g % 3]);
  };
  auto finish = [&](int k) {  // the epilogue of step k, from its sums in c[k % 2]
    const int g = k / pairs, sb = g / n_w, i = g % n_w, t = 2 * (k % pairs);
    const int32_t* c = scratch.c[k % 2];
    for (int u = 0; u < 2 && t + u < x.n_tiles; ++u)
      epilogue(w[i].type, c + 512 * u, c + 512 * u + 256, x.meta[int64_t(t + u) * x.n_sb + sb], scratch.blocks[g % 3],
               acc[i] + (t + u) * kTileTokens, acc_stride);
  };
  decode_group(0);
  for (int k = 0; k < n_steps; ++k) {
    const int g = k / pairs, sb = g / n_w, t = 2 * (k % pairs);
    const int n_b = x.n_tiles - t >= 2 ? 2 : 1;
    const int8_t* b[2] = {x.data + (int64_t(t) * x.n_sb + sb) * kTokenBlockBytes,
                          x.data + (int64_t(t + n_b - 1) * x.n_sb + sb) * kTokenBlockBytes};
    const DecodedBlock& block = scratch.blocks[g % 3];
    gemm.superblock(block.lo, block.hi, b, n_b, scratch.c[k % 2]);
    if (k + 1 < n_steps && (k + 1) / pairs != g) decode_group(g + 1);
    if (k > 0) finish(k - 1);
  }
  if (n_steps > 0) finish(n_steps - 1);
}

}  // namespace ksdk
