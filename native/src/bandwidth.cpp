#include "ksdk/bandwidth.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "ksdk/cpu_features.h"
#include "ksdk/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ksdk {
namespace {

uint64_t read_scalar(const uint64_t* p, size_t n) {
  uint64_t a = 0, b = 0, c = 0, d = 0;
  for (size_t i = 0; i + 4 <= n; i += 4) {
    a ^= p[i];
    b ^= p[i + 1];
    c ^= p[i + 2];
    d ^= p[i + 3];
  }
  return a ^ b ^ c ^ d;
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) uint64_t read_avx2(const uint64_t* p, size_t n) {
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  const __m256i* v = reinterpret_cast<const __m256i*>(p);
  for (size_t i = 0; i + 16 <= n; i += 16, v += 4) {
    a = _mm256_xor_si256(a, _mm256_load_si256(v));
    b = _mm256_xor_si256(b, _mm256_load_si256(v + 1));
    c = _mm256_xor_si256(c, _mm256_load_si256(v + 2));
    d = _mm256_xor_si256(d, _mm256_load_si256(v + 3));
  }
  a = _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_xor_si256(c, d));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3];
}
#endif

}  // namespace

double read_bandwidth_gbs(size_t bytes, int num_threads, int repeats) {
  ThreadPool pool(num_threads);
  const int n = pool.size();
  const size_t words_per_thread = std::max<size_t>(bytes / 8 / n / 16 * 16, 16);
  const size_t words = words_per_thread * n;
  std::unique_ptr<uint64_t, decltype(&std::free)> buf(
      static_cast<uint64_t*>(std::aligned_alloc(64, words * 8)), &std::free);
  if (!buf) return 0.0;
  uint64_t* data = buf.get();
  // First touch by the thread that later reads each slice (page placement on NUMA hosts).
  pool.launch([&](int w) {
    uint64_t* p = data + size_t(w) * words_per_thread;
    for (size_t i = 0; i < words_per_thread; ++i) p[i] = i * 0x9E3779B97F4A7C15ull + w;
  });
  pool.join();
  bool avx2 = false;
#if defined(__x86_64__)
  avx2 = cpu_features().avx2;
#endif
  std::vector<uint64_t> sink(n);
  double best = 0.0;
  for (int rep = 0; rep < std::max(repeats, 1); ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.launch([&](int w) {
      const uint64_t* p = data + size_t(w) * words_per_thread;
#if defined(__x86_64__)
      sink[w] ^= avx2 ? read_avx2(p, words_per_thread) : read_scalar(p, words_per_thread);
#else
      sink[w] ^= read_scalar(p, words_per_thread);
#endif
    });
    pool.join();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(words) * 8 / s / 1e9);
  }
  // Keep the reads observable so they are not optimized away.
  volatile uint64_t keep = 0;
  for (uint64_t v : sink) keep = keep ^ v;
  (void)keep;
  return best;
}

}  // namespace ksdk
