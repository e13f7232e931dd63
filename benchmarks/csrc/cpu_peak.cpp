// The CPU's dot-product peak and which other AVX-512 instructions take a dot product's slot.
// Built and run by benchmarks/cpu_peak.py (c++ -O2 -march=native); needs AVX512-BF16 and VNNI.
// Usage: cpu_peak [threads, default 2] [loop trips per timed run, default 2000000]
//
// Each test runs 16 independent `vdpbf16ps` (or `vpdpbusd`) chains on registers, plus EXTRA
// instructions of one kind per 16 dot products on their own registers. If the kind shares the
// dot products' pipes, each one adds a dot product's time; if not, it is free.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

long g_iters = 2000000;  // loop trips per timed run (16 dot products each)

enum Kind { kNone, kFma, kMul, kAdd, kCvt, kUnpack, kTernlog, kShift, kVnni };
const char* kNames[] = {"(none)", "vfmadd231ps", "vmulps", "vaddps", "vcvtdq2ps",
                        "vpunpcklbw", "vpternlogd", "vpsrlw", "vpdpbusd"};

template <bool kInt8, Kind kKind, int kExtra>
__attribute__((noinline)) float run(long iters) {
  __m512 acc[16];
  __m512i iacc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps(), iacc[i] = _mm512_setzero_si512();
  __m512bh w = (__m512bh)_mm512_set1_epi32(0x3f803f80), x = w;
  __m512i wi = _mm512_set1_epi32(0x01010101), xi = wi;
  __m512i e[4];
  __m512 f[4];
  for (int i = 0; i < 4; ++i) e[i] = _mm512_set1_epi32(i + 1), f[i] = _mm512_set1_ps(1.0f + i);
  const __m512i m = _mm512_set1_epi32(0x000f000f), c = _mm512_set1_epi32(0x43004300);
  const __m512 k = _mm512_set1_ps(1.0001f);
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      if constexpr (kInt8) iacc[j] = _mm512_dpbusd_epi32(iacc[j], wi, xi);
      else acc[j] = _mm512_dpbf16_ps(acc[j], w, x);
      if (j < kExtra) {
        const int r = j % 4;
        if constexpr (kKind == kFma) f[r] = _mm512_fmadd_ps(f[r], k, k);
        else if constexpr (kKind == kMul) f[r] = _mm512_mul_ps(f[r], k);
        else if constexpr (kKind == kAdd) f[r] = _mm512_add_ps(f[r], k);
        else if constexpr (kKind == kCvt) f[r] = _mm512_cvtepi32_ps(e[r]);
        else if constexpr (kKind == kUnpack) e[r] = _mm512_unpacklo_epi8(e[r], m);
        else if constexpr (kKind == kTernlog) e[r] = _mm512_ternarylogic_epi32(e[r], m, c, 0xEA);
        else if constexpr (kKind == kShift) e[r] = _mm512_srli_epi16(e[r], 1);
        else if constexpr (kKind == kVnni) e[r] = _mm512_dpbusd_epi32(e[r], m, c);
      }
    }
    asm volatile("" : "+v"(w), "+v"(wi));  // keep the loop
  }
  __m512 t = _mm512_setzero_ps();
  __m512i ti = _mm512_setzero_si512();
  for (int i = 0; i < 16; ++i) t = _mm512_add_ps(t, acc[i]), ti = _mm512_add_epi32(ti, iacc[i]);
  for (int i = 0; i < 4; ++i) t = _mm512_add_ps(t, f[i]), ti = _mm512_add_epi32(ti, e[i]);
  return _mm512_reduce_add_ps(t) + static_cast<float>(_mm512_reduce_add_epi32(ti));
}

// nanoseconds per 16 dot products (median of 5), on `threads` threads at once
template <bool kInt8, Kind kKind, int kExtra>
double ns_per_16(int threads) {
  const long iters = g_iters;
  std::vector<double> per_thread(threads);
  std::vector<std::thread> pool;
  volatile float sink = 0;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      std::vector<double> runs;
      run<kInt8, kKind, kExtra>(iters / 10);
      for (int r = 0; r < 5; ++r) {
        const auto start = std::chrono::steady_clock::now();
        sink = run<kInt8, kKind, kExtra>(iters);
        runs.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count());
      }
      std::sort(runs.begin(), runs.end());
      per_thread[t] = runs[2] / iters;
    });
  }
  for (auto& th : pool) th.join();
  double worst = 0;
  for (double v : per_thread) worst = std::max(worst, v);
  return worst;
}

template <Kind kKind>
void extra_row(double base) {
  const double with = ns_per_16<false, kKind, 8>(1);
  std::printf("| %s | %.2f | %+.2f |\n", kNames[kKind], with, (with - base) / (base / 16) / 8);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  if (argc > 2) g_iters = std::atol(argv[2]);
  std::printf("| threads | vdpbf16ps zmm (ns each) | bf16 GFLOPS | vpdpbusd zmm (ns each) | int8 GOPS |\n|---:|---:|---:|---:|---:|\n");
  for (int t = 1; t <= threads; ++t) {
    const double bf = ns_per_16<false, kNone, 0>(t) / 16, i8 = ns_per_16<true, kNone, 0>(t) / 16;
    std::printf("| %d | %.3f | %.0f | %.3f | %.0f |\n", t, bf, t * 64 / bf, i8, t * 128 / i8);
  }
  const double base = ns_per_16<false, kNone, 0>(1);
  std::printf("\n| beside 16 vdpbf16ps, 8 of (1 thread) | ns per 16 | dot-product slots each |\n|---|---:|---:|\n");
  std::printf("| (none) | %.2f | |\n", base);
  extra_row<kFma>(base);
  extra_row<kMul>(base);
  extra_row<kVnni>(base);
  extra_row<kAdd>(base);
  extra_row<kCvt>(base);
  extra_row<kUnpack>(base);
  extra_row<kTernlog>(base);
  extra_row<kShift>(base);
  return 0;
}
