// meProp's sparse backward on the CPU: top-k selection and the row-sparse products.
//
// Sun et al., "meProp" (ICML 2017). For z = x W^T + b with x (M, in), W (n, in) and the output
// gradient g (M, n), backward keeps the k largest |g| of each row (per example) or the k
// columns with the largest sum of |g| (unified) and computes, from that selection only,
//
//     dx = g~ W  (M, in)        dW = g~^T x  (n, in), non-zero in the selected rows only
//
// at k/n of the dense cost. Built on first use by meprop/kernels/native.py
// (g++ -O3 -march=native -fopenmp) and called through ctypes; every entry point has a float
// (_f32) and a double (_f64) version. All arrays are C-contiguous; "nt" is the number of
// OpenMP threads to use (1: no parallel region). OpenMP is libgomp, the runtime torch loads,
// so both share one thread pool; built without OpenMP, the pragmas are ignored (serial).
//
// Selection keys: the float's bits with the sign cleared, read as an unsigned integer. For
// IEEE floats this orders every number by magnitude, then inf, then NaN: NaN and inf count as
// the largest magnitudes, as in torch.topk. Among equal keys the lower columns win.

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MEPROP_SFENCE() _mm_sfence()
#else
#define MEPROP_SFENCE() ((void)0)
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <unistd.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using i64 = int64_t;

template <class F>
struct Key;
template <>
struct Key<float> {
  using U = uint32_t;
  static constexpr U mask = 0x7fffffffu;
  static constexpr U span = U(32) << 23;  // 32 binary exponents (see kth_largest)
};
template <>
struct Key<double> {
  using U = uint64_t;
  static constexpr U mask = 0x7fffffffffffffffull;
  static constexpr U span = U(32) << 52;
};

// One vector register of the build's target: 64 bytes with AVX-512, 32 with AVX/AVX2, 16
// otherwise (SSE2, NEON). GCC's generic vectors wider than the target's registers are split
// into several narrower operations with poor code (a 64-byte vector on an AVX2-only target
// ran the products at a sixth of the speed of 32-byte ones), so the width follows -march.
#if defined(__AVX512F__)
constexpr i64 kVecBytes = 64;
#elif defined(__AVX__)
constexpr i64 kVecBytes = 32;
#else
constexpr i64 kVecBytes = 16;
#endif

template <class T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr i64 lanes = kVecBytes / sizeof(T);
};

template <class T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class T>
inline void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof v);
}

inline int threads_for(int nt, i64 tasks) { return int(std::max<i64>(1, std::min<i64>(nt, tasks))); }

// ------------------------------------------------------------------------------------------
// Selection

// The need-th largest of keys[0:nc] (1 <= need <= nc) and how many keys are larger.
// Radix selection: each level histograms the keys into up to 256 bins spanning [lo, hi], finds
// the bin holding the need-th largest and keeps only that bin's keys. Keys more than ``span``
// below the maximum share bin 0, so the first level resolves the top exponents finely even
// beside zeros or tiny values. keys is scratch (overwritten); hist holds 4 * 256 entries.
template <class U>
U kth_largest(U* keys, i64 nc, i64 need, U span, i64* hist, i64* n_above) {
  U lo = keys[0], hi = keys[0];
  for (i64 t = 1; t < nc; t++) {
    lo = std::min(lo, keys[t]);
    hi = std::max(hi, keys[t]);
  }
  i64 gt = 0;
  while (hi > lo && nc > need) {
    if (nc <= 16) {  // a few left: insertion sort, descending
      for (i64 t = 1; t < nc; t++) {
        U v = keys[t];
        i64 s = t;
        for (; s > 0 && keys[s - 1] < v; s--) keys[s] = keys[s - 1];
        keys[s] = v;
      }
      U thr = keys[need - 1];
      for (i64 t = 0; t < need - 1; t++) gt += keys[t] > thr;
      *n_above = gt;
      return thr;
    }
    U base = hi - lo > span ? hi - span : lo;  // keys below base go to bin 0
    i64 top = 15;                              // about one bin per key (16..256)
    while (top < nc && top < 255) top = 2 * top + 1;
    int shift = 0;
    while (((hi - base) >> shift) > U(top)) shift++;
    i64 b = i64((hi - base) >> shift);  // the highest bin
    // Four interleaved histograms: runs of keys in one bin (all of bin 0, often) would
    // otherwise wait on each other's increments.
    for (i64 t = 0; t < 4 * (b + 1); t++) hist[t] = 0;
    i64 t = 0;
    for (; t + 4 <= nc; t += 4) {
      for (i64 q = 0; q < 4; q++) hist[4 * i64((std::max(keys[t + q], base) - base) >> shift) + q]++;
    }
    for (; t < nc; t++) hist[4 * i64((std::max(keys[t], base) - base) >> shift)]++;
    for (i64 u = 0; u <= b; u++) hist[u] = hist[4 * u] + hist[4 * u + 1] + hist[4 * u + 2] + hist[4 * u + 3];
    i64 above = 0;
    while (above + hist[b] < need) above += hist[b--];
    gt += above;
    need -= above;
    U bot = base + (U(b) << shift);           // bin b's smallest key (bin 0: and all below)
    U last = bot + ((U(1) << shift) - 1);     // bin b's largest key (no overflow: keys < 2^63)
    i64 nc2 = 0;
    U lo2 = hi, hi2 = 0;
    U floor = b == 0 ? 0 : bot;
    for (i64 t = 0; t < nc; t++) {  // branch-free: keep bin b's keys
      U v = keys[t];
      bool in = v <= last && v >= floor;
      keys[nc2] = v;
      nc2 += in;
      lo2 = in ? std::min(lo2, v) : lo2;
      hi2 = in ? std::max(hi2, v) : hi2;
    }
    nc = nc2;
    lo = lo2;
    hi = hi2;
  }
  // All remaining keys equal, or all are needed: the smallest of them is the threshold.
  for (i64 t = 0; t < nc; t++) gt += keys[t] > lo;
  *n_above = gt;
  return lo;
}

// kth_largest for a few keys (nc <= 8 vectors): count, for every key i, the keys >= it (all
// nc^2 comparisons, vectorised over i); the threshold is the largest key with count >= need.
// No histograms, no branches on the data. keys is scratch (padded with zeros to NV vectors).
template <class U, int NV>
U kth_small(U* keys, i64 nc, i64 need, i64* n_above) {
  using UV = typename Vec<U>::type;
  constexpr i64 L = Vec<U>::lanes;
  for (i64 t = nc; t < NV * L; t++) keys[t] = 0;  // (a zero never lowers the answer)
  UV kv[NV], cnt[NV];
  for (int v = 0; v < NV; v++) {
    kv[v] = vload(keys + v * L);
    cnt[v] = UV{};
  }
#if defined(__AVX512F__)
  if constexpr (sizeof(U) == 4) {  // compare into a mask register, masked add: 2 ops a vector
    __m512i kr[NV], cr[NV];
    for (int v = 0; v < NV; v++) {
      std::memcpy(&kr[v], &kv[v], 64);
      cr[v] = _mm512_setzero_si512();
    }
    const __m512i one = _mm512_set1_epi32(1);
    for (i64 j = 0; j < nc; j++) {
      __m512i b = _mm512_set1_epi32(int(keys[j]));
      for (int v = 0; v < NV; v++)
        cr[v] = _mm512_mask_add_epi32(cr[v], _mm512_cmpge_epu32_mask(b, kr[v]), cr[v], one);
    }
    for (int v = 0; v < NV; v++) std::memcpy(&cnt[v], &cr[v], 64);
  } else
#endif
  {
    for (i64 j = 0; j < nc; j++) {
      UV b = UV{} + keys[j];
      for (int v = 0; v < NV; v++) cnt[v] -= (UV)(b >= kv[v]);  // (a true compare is all ones)
    }
  }
  UV best = UV{};
  for (int v = 0; v < NV; v++) {
    UV ok = (UV)(cnt[v] >= U(need));
    UV cand = kv[v] & ok;
    best = best > cand ? best : cand;
  }
  U thr = 0;
  for (i64 t = 0; t < L; t++) thr = std::max(thr, U(best[t]));
  i64 gt = 0;
  for (i64 t = 0; t < nc; t++) gt += keys[t] > thr;
  *n_above = gt;
  return thr;
}

// The need-th largest of keys[0:nc] and how many keys are larger: the small version when it
// applies. keys is scratch with room for 8 vectors.
template <class U>
U kth(U* keys, i64 nc, i64 need, U span, i64* hist, i64* n_above) {
  constexpr i64 L = Vec<U>::lanes;
  switch ((nc + L - 1) / L) {
    case 1: return kth_small<U, 1>(keys, nc, need, n_above);
    case 2: return kth_small<U, 2>(keys, nc, need, n_above);
    case 3: return kth_small<U, 3>(keys, nc, need, n_above);
    case 4: return kth_small<U, 4>(keys, nc, need, n_above);
    case 5: return kth_small<U, 5>(keys, nc, need, n_above);
    case 6: return kth_small<U, 6>(keys, nc, need, n_above);
    default: return kth_largest<U>(keys, nc, need, span, hist, n_above);
  }
}

template <class F>
struct TopkScratch {
  using U = typename Key<F>::U;
  std::vector<U> ck, work, lanes;
  std::vector<i64> cj;
  i64 hist[4 * 256];
  TopkScratch(i64 n, i64 p) : ck(n), work(std::max<i64>(n, 8 * Vec<U>::lanes)), lanes(p), cj(n) {}
};

// Bit j of the result: keys[j] & mask >= thr, for the lanes of one vector (2 to 16 keys).
// Keys have the sign bit cleared, so signed compares order them correctly.
template <class U>
inline uint32_t ge_mask(const U* keys, U mask, U thr) {
#if defined(__AVX512F__)
  if constexpr (sizeof(U) == 4) {
    __m512i v = _mm512_and_si512(_mm512_loadu_si512(keys), _mm512_set1_epi32(int(mask)));
    return _mm512_cmpge_epi32_mask(v, _mm512_set1_epi32(int(thr)));
  } else {
    __m512i v = _mm512_and_si512(_mm512_loadu_si512(keys), _mm512_set1_epi64((long long)mask));
    return _mm512_cmpge_epi64_mask(v, _mm512_set1_epi64((long long)thr));
  }
#elif defined(__AVX2__)
  // keys & mask and thr are below 2^31 (2^63): a signed compare with thr - 1 is >= thr.
  if constexpr (sizeof(U) == 4) {
    __m256i v = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys)),
                                 _mm256_set1_epi32(int(mask)));
    __m256i ge = _mm256_cmpgt_epi32(v, _mm256_set1_epi32(int(thr) - 1));
    return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(ge)));
  } else {
    __m256i v = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys)),
                                 _mm256_set1_epi64x((long long)mask));
    __m256i ge = _mm256_cmpgt_epi64(v, _mm256_set1_epi64x((long long)thr - 1));
    return uint32_t(_mm256_movemask_pd(_mm256_castsi256_pd(ge)));
  }
#else
  uint32_t m = 0;
  for (i64 t = 0; t < Vec<U>::lanes; t++) m |= uint32_t((keys[t] & mask) >= thr) << t;
  return m;
#endif
}

// out[0:k] = the columns of the k largest keys of row (n,) (unordered; ties: lower columns).
// For small k (8k <= n, roughly) a prefilter first: the maxima of p >= 2k strided lanes (lane
// j holds columns j, j + p, ...: a vectorised pass) give a threshold, their k-th largest, that
// at least k keys reach and, on most data, not many more; the exact selection then runs on
// those candidates only.
template <class F>
void topk_row(const typename Key<F>::U* row, i64 n, i64 k, i64* out, TopkScratch<F>& s) {
  using U = typename Key<F>::U;
  using UV = typename Vec<U>::type;
  constexpr i64 L = Vec<U>::lanes;
  constexpr U mask = Key<F>::mask;
  if (k >= n) {
    for (i64 t = 0; t < n; t++) out[t] = t;
    return;
  }
  i64 p = (2 * k + L - 1) / L * L;
  U* ck = s.ck.data();
  i64* cj = s.cj.data();
  i64 c = 0;
  if (4 * p <= n) {
    U* lanes = s.lanes.data();
    i64 full = n / p * p;  // the lanes' maxima over the whole chunks of p columns
    for (i64 j = 0; j < p; j += L) {
      UV a = vload(row + j) & mask;
      for (i64 j0 = p; j0 < full; j0 += p) {
        UV b = vload(row + j0 + j) & mask;
        a = a > b ? a : b;
      }
      vstore(lanes + j, a);
    }
    for (i64 j = 0; j < n - full; j++) lanes[j] = std::max(lanes[j], U(row[full + j] & mask));
    std::memcpy(s.work.data(), lanes, p * sizeof(U));
    i64 above;
    U thr = kth<U>(s.work.data(), p, k, Key<F>::span, s.hist, &above);
    i64 j = 0;
    for (; j + L <= n; j += L) {
      for (uint32_t m = ge_mask<U>(row + j, mask, thr); m; m &= m - 1) {
        i64 t = j + __builtin_ctz(m);
        ck[c] = row[t] & mask;
        cj[c++] = t;
      }
    }
    for (; j < n; j++) {
      U v = row[j] & mask;
      ck[c] = v;
      cj[c] = j;
      c += v >= thr;
    }
  } else {
    for (i64 j = 0; j < n; j++) {
      ck[j] = row[j] & mask;
      cj[j] = j;
    }
    c = n;
  }
  if (c == k) {
    std::memcpy(out, cj, k * sizeof(i64));
    return;
  }
  std::memcpy(s.work.data(), ck, c * sizeof(U));
  i64 above;
  U thr = kth<U>(s.work.data(), c, k, Key<F>::span, s.hist, &above);
  // All keys above thr (fewer than k: branch-free), then the first ones equal to it.
  i64 o = 0;
  for (i64 t = 0; t < c; t++) {
    out[o] = cj[t];  // (o <= above < k)
    o += ck[t] > thr;
  }
  for (i64 t = 0; o < k; t++) {
    if (ck[t] == thr) out[o++] = cj[t];
  }
}

template <class F>
void topk_rows(const F* g, i64 m, i64 n, i64 k, i64* idx, F* vals, int nt) {
  using U = typename Key<F>::U;
  constexpr i64 L = Vec<U>::lanes;
  nt = threads_for(nt, m);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    TopkScratch<F> s(n, (2 * k + L - 1) / L * L);
#pragma omp for schedule(static)
    for (i64 i = 0; i < m; i++) {
      const U* row = reinterpret_cast<const U*>(g + i * n);
      topk_row<F>(row, n, k, idx + i * k, s);
      for (i64 t = 0; t < k; t++) vals[i * k + t] = g[i * n + idx[i * k + t]];
    }
  }
}

// ------------------------------------------------------------------------------------------
// Products

template <class F>
inline void zero(F* o, i64 w) {
  std::memset(o, 0, w * sizeof(F));
}

// Store a vector at a vector-aligned address (callers check 64 bytes) bypassing the caches (no read for ownership):
// for rows of a large dW that nothing reads before the optimizer does.
template <class F>
inline void vstream(F* p, typename Vec<F>::type v) {
#if defined(__AVX512F__)
  if constexpr (sizeof(F) == 4) {
    __m512 x;
    std::memcpy(&x, &v, 64);
    _mm512_stream_ps(reinterpret_cast<float*>(p), x);
  } else {
    __m512d x;
    std::memcpy(&x, &v, 64);
    _mm512_stream_pd(reinterpret_cast<double*>(p), x);
  }
#elif defined(__AVX__)
  if constexpr (sizeof(F) == 4) {
    __m256 x;
    std::memcpy(&x, &v, 32);
    _mm256_stream_ps(reinterpret_cast<float*>(p), x);
  } else {
    __m256d x;
    std::memcpy(&x, &v, 32);
    _mm256_stream_pd(reinterpret_cast<double*>(p), x);
  }
#elif defined(__SSE2__)
  if constexpr (sizeof(F) == 4) {
    __m128 x;
    std::memcpy(&x, &v, 16);
    _mm_stream_ps(reinterpret_cast<float*>(p), x);
  } else {
    __m128d x;
    std::memcpy(&x, &v, 16);
    _mm_stream_pd(reinterpret_cast<double*>(p), x);
  }
#else
  vstore(p, v);
#endif
}

// Outputs from this many bytes on are written with streaming stores (see outer_rows).
constexpr i64 kStreamBytes = i64(4) << 20;

// Wide rows (>= this many bytes): stream whole rows, four at a time, into o (see gather_axpy).
constexpr i64 kSweepBytes = 4096;

// o[0:w] = sum_j v[j] * src[r[j] * ld + 0:w] over j < k, r[j] rows of src (all in range).
// Narrow rows: four vectors of columns per pass over the k rows, summed in registers. Wide
// rows: o (<= 16 KiB, in L1) += four rows of src at a time, each read front to back, which the
// hardware prefetcher follows (2-3x faster than hopping between k rows every 256 bytes once
// the rows come from L3 or memory).
// stream: o is a row of a large output that is written once (at most four rows of src, o
// 64-byte aligned): streaming stores.
template <class F>
inline void gather_axpy(F* o, i64 w, const i64* r, i64 rstride, const F* v, i64 vstride, i64 k,
                        const F* src, i64 ld, bool stream = false) {
  using FV = typename Vec<F>::type;
  constexpr i64 L = Vec<F>::lanes;
  if (stream && k >= 1 && k <= 4 && reinterpret_cast<uintptr_t>(o) % 64 == 0) {
    const F* s[4];
    F vv[4];
    for (i64 j = 0; j < 4; j++) {  // (rows past k are never read)
      s[j] = j < k ? src + r[j * rstride] * ld : src;
      vv[j] = j < k ? v[j * vstride] : F(0);
    }
    i64 c = 0;
    for (; c + L <= w; c += L) {
      FV a = vv[0] * vload(s[0] + c);
      if (k > 1) a += vv[1] * vload(s[1] + c);
      if (k > 2) a += vv[2] * vload(s[2] + c);
      if (k > 3) a += vv[3] * vload(s[3] + c);
      vstream(o + c, a);
    }
    for (; c < w; c++) {
      F a = 0;
      for (i64 j = 0; j < k; j++) a += vv[j] * s[j][c];
      o[c] = a;
    }
    return;
  }
  if (w * i64(sizeof(F)) >= kSweepBytes) {
    constexpr i64 B = 16384 / sizeof(F);
    for (i64 c0 = 0; c0 < w; c0 += B) {
      i64 wd = std::min(B, w - c0);
      F* oo = o + c0;
      i64 j = std::min<i64>(k, 4);  // the first rows are stored, not added: one pass over o
      const F* s0 = j > 0 ? src + r[0] * ld + c0 : nullptr;
      const F* s1 = j > 1 ? src + r[rstride] * ld + c0 : nullptr;
      const F* s2 = j > 2 ? src + r[2 * rstride] * ld + c0 : nullptr;
      const F* s3 = j > 3 ? src + r[3 * rstride] * ld + c0 : nullptr;
      switch (j) {
        case 0:
          zero(oo, wd);
          break;
        case 1:
          for (i64 c = 0; c < wd; c++) oo[c] = v[0] * s0[c];
          break;
        case 2:
          for (i64 c = 0; c < wd; c++) oo[c] = v[0] * s0[c] + v[vstride] * s1[c];
          break;
        case 3:
          for (i64 c = 0; c < wd; c++)
            oo[c] = (v[0] * s0[c] + v[vstride] * s1[c]) + v[2 * vstride] * s2[c];
          break;
        default: {
          F v0 = v[0], v1 = v[vstride], v2 = v[2 * vstride], v3 = v[3 * vstride];
          for (i64 c = 0; c < wd; c++)
            oo[c] = (v0 * s0[c] + v1 * s1[c]) + (v2 * s2[c] + v3 * s3[c]);
        }
      }
      for (; j + 4 <= k; j += 4) {
        const F* s0 = src + r[j * rstride] * ld + c0;
        const F* s1 = src + r[(j + 1) * rstride] * ld + c0;
        const F* s2 = src + r[(j + 2) * rstride] * ld + c0;
        const F* s3 = src + r[(j + 3) * rstride] * ld + c0;
        F v0 = v[j * vstride], v1 = v[(j + 1) * vstride];
        F v2 = v[(j + 2) * vstride], v3 = v[(j + 3) * vstride];
        i64 c = 0;
        for (; c + L <= wd; c += L)
          vstore(oo + c, vload(oo + c) + ((v0 * vload(s0 + c) + v1 * vload(s1 + c)) +
                                          (v2 * vload(s2 + c) + v3 * vload(s3 + c))));
        for (; c < wd; c++) oo[c] += (v0 * s0[c] + v1 * s1[c]) + (v2 * s2[c] + v3 * s3[c]);
      }
      for (; j < k; j++) {
        const F* s0 = src + r[j * rstride] * ld + c0;
        F v0 = v[j * vstride];
        for (i64 c = 0; c < wd; c++) oo[c] += v0 * s0[c];
      }
    }
    return;
  }
  i64 c = 0;
  for (; c + 4 * L <= w; c += 4 * L) {
    FV a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (i64 j = 0; j < k; j++) {
      const F* s = src + r[j * rstride] * ld + c;
      F vj = v[j * vstride];
      a0 += vj * vload(s);
      a1 += vj * vload(s + L);
      a2 += vj * vload(s + 2 * L);
      a3 += vj * vload(s + 3 * L);
    }
    vstore(o + c, a0);
    vstore(o + c + L, a1);
    vstore(o + c + 2 * L, a2);
    vstore(o + c + 3 * L, a3);
  }
  for (; c + L <= w; c += L) {
    FV a0 = {};
    for (i64 j = 0; j < k; j++) a0 += v[j * vstride] * vload(src + r[j * rstride] * ld + c);
    vstore(o + c, a0);
  }
  if (c < w) {
    F a[L] = {};
    i64 rem = w - c;
    for (i64 j = 0; j < k; j++) {
      const F* s = src + r[j * rstride] * ld + c;
      F vj = v[j * vstride];
      for (i64 t = 0; t < rem; t++) a[t] += vj * s[t];
    }
    for (i64 t = 0; t < rem; t++) o[c + t] = a[t];
  }
}

// This core's L2 cache in bytes: sysconf where the C library knows it (glibc reads CPUID),
// else 512 KiB (the smaller of the common sizes: 512 KiB on Zen 2/3, 1-2 MiB on Zen 4 and
// recent Xeons). Read once.
inline i64 l2_bytes() {
  static const i64 bytes = [] {
    long v = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v >= (i64(64) << 10) && v <= (i64(64) << 20) ? i64(v) : i64(512) << 10;
  }();
  return bytes;
}

// Source slices of half the L2 stay there while every output row takes its part (see
// column_block).
inline i64 tile_bytes() { return l2_bytes() / 2; }

// Column block of the row products, whose output rows each read rows of a source matrix (src_rows
// rows of d columns; reads row reads in all). Whole rows, unless
// - there are fewer rows than nt threads need tasks: blocks of >= 256 columns (a multiple of 64);
// - the source is larger than twice the L2 and each of its rows is read 16 times or more
//   (a parser's batch of 1000 examples x 2400 inputs, say): blocks whose slice of the source is
//   about half the L2, so that the reads after the first come from L2, not from L3 or memory
//   (tasks run block by block). A source read about once (a wide layer, few examples) gains
//   nothing from it and keeps whole rows.
inline i64 column_block(i64 rows, i64 d, int nt, i64 src_rows, i64 reads, i64 elem) {
  i64 block = std::max<i64>(d, 1);
  i64 tasks = 4 * i64(nt);
  if (!(nt <= 1 || rows >= tasks || d <= 256)) {
    i64 per = (d * rows + tasks - 1) / tasks;
    block = std::max<i64>(256, (per + 63) / 64 * 64);
  }
  if (src_rows * d * elem > 2 * l2_bytes() && reads >= 16 * src_rows) {
    i64 tile = std::max<i64>(64, tile_bytes() / (src_rows * elem) / 64 * 64);
    block = std::min(block, tile);
  }
  return block;
}

i64 count_bad(const i64* idx, i64 size, i64 n) {
  i64 bad = 0;
  for (i64 t = 0; t < size; t++) bad += idx[t] < 0 || idx[t] >= n;
  return bad;
}

// out (M, d) = sum_j vals[i, j] * w[idx[i, j]], w (n, d). idx_stride 0: every row uses idx[0, :].
// counts (M,), if not null: row i uses its first counts[i] <= k pairs only (adaptive k).
template <class F>
void rows_matmul(const i64* idx, i64 idx_stride, const F* vals, i64 m, i64 k, const F* w, i64 n,
                 i64 d, F* out, int nt, const i64* counts = nullptr) {
  i64 block = column_block(m, d, nt, n, m * k, sizeof(F));
  i64 nb = (d + block - 1) / block;
  nt = threads_for(nt, nb * m);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (i64 task = 0; task < nb * m; task++) {
    i64 b = task / m, i = task % m;
    i64 c0 = b * block, wd = std::min(block, d - c0);
    i64 ki = counts ? counts[i] : k;
    gather_axpy<F>(out + i * d + c0, wd, idx + i * idx_stride, 1, vals + i * k, 1, ki, w + c0, d);
  }
}

// The (i, j) pairs of idx (M, k) grouped by their row idx[i, j] in [0, n) (a counting sort):
// the pairs of row r are ex[start[r]:start[r + 1]] (example numbers, in order) with values vs.
// counts (M,), if not null: example i's first counts[i] pairs only (adaptive k).
template <class F>
struct Groups {
  std::vector<i64> start, ex;
  std::vector<F> vs;
  i64 rows = 0;  // rows with at least one pair
  i64 m = 0;     // examples (the rows of x that the pairs read)
  Groups(const i64* idx, const F* vals, i64 m, i64 k, i64 n, const i64* counts = nullptr)
      : start(n + 1, 0), ex(m * k), vs(m * k), m(m) {
    for (i64 i = 0; i < m; i++)
      for (i64 j = 0, kj = counts ? counts[i] : k; j < kj; j++) start[idx[i * k + j] + 1]++;
    for (i64 r = 0; r < n; r++) {
      rows += start[r + 1] > 0;
      start[r + 1] += start[r];
    }
    std::vector<i64> cur(start.begin(), start.end() - 1);
    for (i64 i = 0; i < m; i++)
      for (i64 j = 0, kj = counts ? counts[i] : k; j < kj; j++) {
        i64 p = cur[idx[i * k + j]]++;
        ex[p] = i;
        vs[p] = vals[i * k + j];
      }
  }
};

// dW rows from the groups: out row q = row rows[q] of g~^T x (zero where it has no pairs).
template <class F>
void outer_rows(const Groups<F>& gr, const i64* rows, i64 nrows, const F* x, i64 d, F* out,
                int nt) {
  // A large output (a row-compact dW at in = 4096, say) is not read again before the
  // optimizer: streaming stores where a row has few pairs.
  bool stream = nrows * d * i64(sizeof(F)) >= kStreamBytes;
  i64 block = column_block(nrows, d, nt, gr.m, i64(gr.ex.size()), sizeof(F));
  i64 nb = (d + block - 1) / block;
  nt = threads_for(nt, nb * nrows);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (i64 task = 0; task < nb * nrows; task++) {
    i64 b = task / nrows, q = task % nrows;
    i64 c0 = b * block, wd = std::min(block, d - c0);
    i64 r = rows ? rows[q] : q;
    i64 p0 = gr.start[r], np = gr.start[r + 1] - p0;
    F* o = out + q * d + c0;
    if (np == 0)
      zero(o, wd);
    else
      gather_axpy<F>(o, wd, gr.ex.data() + p0, 1, gr.vs.data() + p0, 1, np, x + c0, d, stream);
  }
  if (stream) MEPROP_SFENCE();
}

// Dense dW (n, d). zeroed: out is already zero, write the touched rows only (a fresh
// calloc'ed block whose untouched pages are never written, or a reused one), and list them in
// rows (if not null; sorted). Else write every row once. Returns the number of touched rows.
template <class F>
i64 outer_dense(const Groups<F>& gr, i64 n, const F* x, i64 d, F* out, bool zeroed, i64* rows,
                int nt) {
  if (!zeroed) {
    outer_rows<F>(gr, nullptr, n, x, d, out, nt);
    return gr.rows;
  }
  std::vector<i64> own(rows ? 0 : gr.rows);
  i64* list = rows ? rows : own.data();
  i64 nr = 0;
  for (i64 r = 0; r < n; r++)
    if (gr.start[r + 1] > gr.start[r]) list[nr++] = r;
  i64 block = column_block(nr, d, nt, gr.m, i64(gr.ex.size()), sizeof(F));
  i64 nb = (d + block - 1) / block;
  nt = threads_for(nt, nb * nr);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (i64 task = 0; task < nb * nr; task++) {
    i64 b = task / nr, q = task % nr;
    i64 c0 = b * block, wd = std::min(block, d - c0);
    i64 r = list[q], p0 = gr.start[r], np = gr.start[r + 1] - p0;
    gather_axpy<F>(out + r * d + c0, wd, gr.ex.data() + p0, 1, gr.vs.data() + p0, 1, np, x + c0, d,
                   true);
  }
  MEPROP_SFENCE();  // (streaming stores are weakly ordered)
  return nr;
}

// Zero the rows rows[0:nr] of out (n, d): the rows a reused dW buffer held last time. stream:
// with streaming stores where aligned (a large buffer, not read again soon).
template <class F>
void zero_rows(F* out, i64 d, const i64* rows, i64 nr, bool stream, int nt) {
  using FV = typename Vec<F>::type;
  constexpr i64 L = Vec<F>::lanes;
  nt = threads_for(nt, nr);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (i64 q = 0; q < nr; q++) {
    F* o = out + rows[q] * d;
    if (stream && reinterpret_cast<uintptr_t>(o) % 64 == 0 && d % L == 0) {
      for (i64 c = 0; c < d; c += L) vstream(o + c, FV{});
    } else {
      zero(o, d);
    }
  }
  if (stream) MEPROP_SFENCE();
}

// Adam's step (torch.optim.Adam's formula, L2 weight decay added to the gradient) on rows
// rows[0:nr] of p, m, v (each row d long; rows == nullptr: rows 0..nr-1), whose gradient rows
// are g (nr, d) in that order. The lazy optimizer (meprop.LazyAdam) calls it with the rows that
// meProp kept; a dense gradient is every row. Memory-bound: each entry is read and written once.
template <class F>
i64 row_adam(F* p, F* m, F* v, i64 n, i64 d, const i64* rows, i64 nr, const F* g, F lr, F b1,
             F b2, F eps, F wd, F bc1, F bc2_sqrt, int nt) {
  // rows must be strictly increasing and in [0, n) (a coalesced gradient's, as meProp writes
  // them): checked before anything is written; -1 where they are not (the caller coalesces)
  if (rows) {
    for (i64 q = 0; q < nr; q++)
      if (rows[q] < 0 || rows[q] >= n || (q && rows[q] <= rows[q - 1])) return -1;
  }
  // (one division per entry: the denominator's 1/bc2_sqrt as a product; torch's divides, a
  // difference of an ulp)
  const F step = lr / bc1, a1 = F(1) - b1, a2 = F(1) - b2, inv_bc2 = F(1) / bc2_sqrt;
  nt = threads_for(nt, nr);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (i64 q = 0; q < nr; q++) {
    const i64 off = (rows ? rows[q] : q) * d;
    F* pr = p + off;
    F* mr = m + off;
    F* vr = v + off;
    const F* gr = g + q * d;
#pragma omp simd
    for (i64 c = 0; c < d; c++) {
      const F gc = gr[c] + wd * pr[c];
      const F mc = mr[c] + a1 * (gc - mr[c]);  // torch: exp_avg.lerp_(grad, 1 - beta1)
      const F vc = b2 * vr[c] + a2 * gc * gc;
      mr[c] = mc;
      vr[c] = vc;
      pr[c] -= step * mc / (std::sqrt(vc) * inv_bc2 + eps);
    }
  }
  return nr;
}

// Row-compact dW: rows (R,) sorted, out (R, d); both sized >= R by the caller. Returns R.
template <class F>
i64 outer_compact(const Groups<F>& gr, i64 n, const F* x, i64 d, i64* rows, F* out, int nt) {
  i64 nr = 0;
  for (i64 r = 0; r < n; r++)
    if (gr.start[r + 1] > gr.start[r]) rows[nr++] = r;
  outer_rows<F>(gr, rows, nr, x, d, out, nt);
  return nr;
}

// db (n,) = column sums of g (M, n).
template <class F>
void column_sums(const F* g, i64 m, i64 n, F* db) {
  zero(db, n);
  for (i64 i = 0; i < m; i++)
    for (i64 c = 0; c < n; c++) db[c] += g[i * n + c];
}

// ------------------------------------------------------------------------------------------
// The whole per-example backward in one call: selection, then the products that are asked for.
// dw_mode: 0 none, 1 dense dW written in full, 2 dense dW zero but for its rows stale[:nstale]
// (a reused buffer: zeroed first; then the touched rows are written, and listed in rows if
// not null), 3 row-compact (rows, dw_rows sized min(n, M k)). Returns the number of touched
// rows R (0 for mode 0).
template <class F>
i64 per_example(const F* g, i64 m, i64 n, i64 k, const F* x, const F* w, i64 d, i64* idx,
                F* vals, F* dx, int dw_mode, F* dw, i64* rows, const i64* stale, i64 nstale,
                F* db, int nt, int nt_products) {
  if (nstale) zero_rows<F>(dw, d, stale, nstale, n * d * i64(sizeof(F)) >= kStreamBytes, 1);
  topk_rows<F>(g, m, n, k, idx, vals, nt);
  if (db) column_sums<F>(g, m, n, db);
  if (dx) rows_matmul<F>(idx, k, vals, m, k, w, n, d, dx, nt_products);
  if (dw_mode == 0) return 0;
  Groups<F> gr(idx, vals, m, k, n);
  if (dw_mode == 3) return outer_compact<F>(gr, n, x, d, rows, dw, nt_products);
  return outer_dense<F>(gr, n, x, d, dw, dw_mode == 2, rows, nt_products);
}

// Adaptive k's selection (meprop.adaptive): row i keeps ks_in[i] of its largest |g| (tinyprop:
// the k's come from the caller) or, with ks_in null (mass), the fewest of its kmax largest whose
// |g| (square: g^2) adds up to share of the row's total, at least min_k. idx, vals (M, kmax):
// row i's ks_out[i] kept pairs first (mass: in descending |g|), then padding (its first column,
// value 0).
template <class F>
void topk_rows_var(const F* g, i64 m, i64 n, i64 kmax, const i64* ks_in, i64 min_k, F share,
                   bool square, i64* idx, F* vals, i64* ks_out, int nt) {
  using U = typename Key<F>::U;
  constexpr i64 L = Vec<U>::lanes;
  constexpr U mask = Key<F>::mask;
  nt = threads_for(nt, m);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    TopkScratch<F> s(n, (2 * kmax + L - 1) / L * L);
    std::vector<std::pair<U, i64>> order(ks_in ? 0 : kmax);
#pragma omp for schedule(static)
    for (i64 i = 0; i < m; i++) {
      const F* gi = g + i * n;
      const U* row = reinterpret_cast<const U*>(gi);
      i64* out = idx + i * kmax;
      F* ov = vals + i * kmax;
      i64 k = ks_in ? std::max<i64>(1, std::min(ks_in[i], kmax)) : kmax;
      topk_row<F>(row, n, k, out, s);
      if (!ks_in) {
        // |g| orders like its bit pattern (the key); ties: the lower column first
        for (i64 t = 0; t < k; t++) order[t] = {U(row[out[t]] & mask), out[t]};
        std::sort(order.begin(), order.begin() + k, [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        F total = 0;
        for (i64 j = 0; j < n; j++) total += square ? gi[j] * gi[j] : std::abs(gi[j]);
        F target = share * total, cum = 0;
        i64 kk = k;
        for (i64 t = 0; t < k; t++) {
          out[t] = order[t].second;
          F v = std::abs(gi[out[t]]);
          cum += square ? v * v : v;
          if (kk == k && !(cum < target)) kk = t + 1;
        }
        k = std::min(kmax, std::max(kk, min_k));
      }
      for (i64 t = 0; t < k; t++) ov[t] = gi[out[t]];
      for (i64 t = k; t < kmax; t++) {
        out[t] = out[0];
        ov[t] = 0;
      }
      ks_out[i] = k;
    }
  }
}

// TinyProp's k's (meprop.adaptive): y_i = sum_j |g_ij|, y_max = max(*y_max, y_i) (written
// back), ks[i] = clamp(round(n (s_min + span y_i / y_max) damp), min_k, kmax), damp the
// layer's damping ** depth; rounding half to even, as torch.round.
template <class F>
void tinyprop_ks(const F* g, i64 m, i64 n, i64 kmax, i64 min_k, F s_min, F span, F damp,
                 F* y_max, i64* ks) {
  std::vector<F> y(m);
  F ym = *y_max;
  for (i64 i = 0; i < m; i++) {
    F t = 0;
    for (i64 j = 0; j < n; j++) t += std::abs(g[i * n + j]);
    y[i] = t;
    ym = std::max(ym, t);
  }
  *y_max = ym;
  for (i64 i = 0; i < m; i++) {
    F share = (s_min + span * (ym > 0 ? y[i] / ym : F(0))) * damp;
    F k = std::nearbyint(share * F(n));
    ks[i] = std::min(kmax, std::max(min_k, k >= F(kmax) ? kmax : i64(k)));
  }
}

// per_example with adaptive k's (topk_rows_var): the products read each row's kept pairs only.
// rule 1: mass (share, square); 2: tinyprop (tp: s_min, span, damp; y_max in and out).
template <class F>
i64 per_example_var(const F* g, i64 m, i64 n, i64 kmax, int rule, i64 min_k, F share,
                    bool square, const F* tp, F* y_max, const F* x, const F* w, i64 d,
                    i64* idx, F* vals, i64* ks_out, F* dx, int dw_mode, F* dw, i64* rows,
                    const i64* stale, i64 nstale, F* db, int nt, int nt_products) {
  if (nstale) zero_rows<F>(dw, d, stale, nstale, n * d * i64(sizeof(F)) >= kStreamBytes, 1);
  std::vector<i64> ks(rule == 2 ? m : 0);  // tinyprop's k's, before the selection
  if (rule == 2) tinyprop_ks<F>(g, m, n, kmax, min_k, tp[0], tp[1], tp[2], y_max, ks.data());
  topk_rows_var<F>(g, m, n, kmax, rule == 2 ? ks.data() : nullptr, min_k, share, square, idx,
                   vals, ks_out, nt);
  if (db) column_sums<F>(g, m, n, db);
  if (dx) rows_matmul<F>(idx, kmax, vals, m, kmax, w, n, d, dx, nt_products, ks_out);
  if (dw_mode == 0) return 0;
  Groups<F> gr(idx, vals, m, kmax, n, ks_out);
  if (dw_mode == 3) return outer_compact<F>(gr, n, x, d, rows, dw, nt_products);
  return outer_dense<F>(gr, n, x, d, dw, dw_mode == 2, rows, nt_products);
}

// Vectors of columns per register block of gemm_rows: 4 rows by 4 vectors (16 accumulators)
// fit AVX-512's 32 registers; with 16 registers (AVX2, SSE) 4 by 3 leaves room for the loaded
// vectors of B and the broadcast factor (4 by 4 spills there).
constexpr i64 kGemmVectors = kVecBytes == 64 ? 4 : 3;

// One register block of gemm_rows: 4 rows of out by NV vectors of columns from column c.
template <class F, int NV>
inline void gemm_block(i64 r0, i64 c, i64 K, i64 d, const F* A, i64 ars, i64 acs, const i64* bi,
                       const F* B, const i64* orow, F* out) {
  using FV = typename Vec<F>::type;
  constexpr i64 L = Vec<F>::lanes;
  FV acc[4][NV] = {};
  for (i64 t = 0; t < K; t++) {
    const F* b = B + bi[t] * d + c;
    FV bv[NV];
    for (int v = 0; v < NV; v++) bv[v] = vload(b + v * L);
    for (int q = 0; q < 4; q++) {
      F a = A[(r0 + q) * ars + t * acs];
      for (int v = 0; v < NV; v++) acc[q][v] += a * bv[v];
    }
  }
  for (int q = 0; q < 4; q++) {
    F* o = out + (orow ? orow[r0 + q] : r0 + q) * d + c;
    for (int v = 0; v < NV; v++) vstore(o + v * L, acc[q][v]);
  }
}

// out[orow[r]] = sum_t A[r, t] * B[bidx[t]] for r < R, t < K: a small GEMM whose right factor
// is a gather of rows (bidx, or all rows when null) and whose left factor has any strides
// (A[r, t] = A[r * ars + t * acs]); orow null: out row r. Register-blocked: 4 rows of out by
// up to kGemmVectors vectors of columns, so each loaded vector of B serves 4 multiply-adds (the unified
// mode's products, where every row uses the same k rows of W).
template <class F>
void gemm_rows(i64 R, i64 K, i64 d, const F* A, i64 ars, i64 acs, const i64* bidx, const F* B,
               const i64* orow, F* out, int nt) {
  constexpr i64 L = Vec<F>::lanes;
  constexpr i64 W = kGemmVectors * L;  // columns per register block
  i64 nrb = (R + 3) / 4, ncb = (d + W - 1) / W;
  nt = threads_for(nt, nrb * ncb);
  std::vector<i64> ident(bidx ? 0 : K);
  for (i64 t = 0; t < i64(ident.size()); t++) ident[t] = t;
  const i64* bi = bidx ? bidx : ident.data();
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (i64 task = 0; task < nrb * ncb; task++) {
    i64 rb = task / ncb, c = (task % ncb) * W;
    i64 r0 = 4 * rb, nr = std::min<i64>(4, R - r0);
    i64 wd = std::min(W, d - c), nv = nr == 4 ? wd / L : 0;
    switch (nv) {  // whole vectors, four rows at a time
      case 4: gemm_block<F, 4>(r0, c, K, d, A, ars, acs, bi, B, orow, out); break;
      case 3: gemm_block<F, 3>(r0, c, K, d, A, ars, acs, bi, B, orow, out); break;
      case 2: gemm_block<F, 2>(r0, c, K, d, A, ars, acs, bi, B, orow, out); break;
      case 1: gemm_block<F, 1>(r0, c, K, d, A, ars, acs, bi, B, orow, out); break;
      default: break;
    }
    i64 done = nv * L;  // the rest (last columns, or fewer than 4 rows): one row at a time
    if (done < wd) {
      for (i64 q = 0; q < nr; q++) {
        F* o = out + (orow ? orow[r0 + q] : r0 + q) * d + c + done;
        gather_axpy<F>(o, wd - done, bi, 1, A + (r0 + q) * ars, acs, K, B + c + done, d);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Per-position channel selection (SparseConv2d's per_position mode)

// channel_topk_mask for up to 32 channels: the rank of each channel j at each position,
// counted (C^2 compares a position, branch-free and vectorised over a block of positions: the
// channels before j that are >= it, and those after j that are >). Rank < k: kept.
template <class F>
void channel_topk_count(const F* g, i64 b, i64 c, i64 p, i64 k, uint8_t* keep, int nt) {
  using U = typename Key<F>::U;
  using S = std::make_signed_t<U>;  // (keys are below 2^31 / 2^63: signed compares order them)
  constexpr i64 kBlk = 256;
  const i64 blocks = (p + kBlk - 1) / kBlk;
  nt = threads_for(nt, b * blocks);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<S> keys(c * kBlk), rank(kBlk);
#pragma omp for schedule(static)
    for (i64 t = 0; t < b * blocks; t++) {
      const i64 e = t / blocks, p0 = (t % blocks) * kBlk, w = std::min(kBlk, p - p0);
      const U* ge = reinterpret_cast<const U*>(g + e * c * p) + p0;
      uint8_t* ke = keep + e * c * p + p0;
      for (i64 j = 0; j < c; j++)
        for (i64 q = 0; q < w; q++) keys[j * kBlk + q] = S(ge[j * p + q] & Key<F>::mask);
      for (i64 j = 0; j < c; j++) {
        const S* kj = keys.data() + j * kBlk;
        S* r = rank.data();
        for (i64 q = 0; q < w; q++) r[q] = 0;
        for (i64 i = 0; i < j; i++) {
          const S* ki = keys.data() + i * kBlk;
          for (i64 q = 0; q < w; q++) r[q] += S(ki[q] >= kj[q]);
        }
        for (i64 i = j + 1; i < c; i++) {
          const S* ki = keys.data() + i * kBlk;
          for (i64 q = 0; q < w; q++) r[q] += S(ki[q] > kj[q]);
        }
        for (i64 q = 0; q < w; q++) ke[j * p + q] = uint8_t(r[q] < S(k));
      }
    }
  }
}

// channel_topk_mask otherwise: each block of positions transposed into rows of C keys, then
// topk_row on each row.
template <class F>
void channel_topk_rows(const F* g, i64 b, i64 c, i64 p, i64 k, uint8_t* keep, int nt) {
  using U = typename Key<F>::U;
  constexpr i64 L = Vec<U>::lanes;
  constexpr i64 kBlk = 64;
  const i64 blocks = (p + kBlk - 1) / kBlk;
  nt = threads_for(nt, b * blocks);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<U> rows(kBlk * c);
    std::vector<i64> out(k);
    TopkScratch<F> s(c, (2 * k + L - 1) / L * L);
#pragma omp for schedule(static)
    for (i64 t = 0; t < b * blocks; t++) {
      const i64 e = t / blocks, p0 = (t % blocks) * kBlk, w = std::min(kBlk, p - p0);
      const U* ge = reinterpret_cast<const U*>(g + e * c * p) + p0;
      uint8_t* ke = keep + e * c * p + p0;
      for (i64 j = 0; j < c; j++) {
        const U* row = ge + j * p;
        for (i64 q = 0; q < w; q++) rows[q * c + j] = row[q];
        std::memset(ke + j * p, 0, w);
      }
      for (i64 q = 0; q < w; q++) {
        topk_row<F>(rows.data() + q * c, c, k, out.data(), s);
        for (i64 r = 0; r < k; r++) ke[out[r] * p + q] = 1;
      }
    }
  }
}

// SparseConv2d's per_position selection: keep (B, C, P) bytes = 1 where channel c is among the
// k of largest |g[b, :, p]| at position p of example b, for g (B, C, P) contiguous (NCHW, P =
// H' W'), 1 <= k < C; NaN highest, among equal magnitudes the lower channels win (as topk_rows).
// (Counting costs C compares an entry, the rows' top-k about 7 ns an entry on an AVX2 EPYC:
// they meet near 64 channels; counting was 2.3x faster at 16 channels, 15x at 6.)
constexpr i64 kCountChannels = 32;
template <class F>
void channel_topk_mask(const F* g, i64 b, i64 c, i64 p, i64 k, uint8_t* keep, int nt) {
  if (c <= kCountChannels)
    channel_topk_count<F>(g, b, c, p, k, keep, nt);
  else
    channel_topk_rows<F>(g, b, c, p, k, keep, nt);
}

// The unified backward: scores (n,) = sum over rows of |g|, cols (k,) = the k highest, sorted;
// gc = g[:, cols] (M, k); dx = gc W[cols] (M, d); dW[cols] = gc^T x (dw_mode and stale as
// per_example; 3: out (k, d) in the order of cols); db = column sums of g.
// cols (k,) = the k columns of g (M, n) with the largest sum of |g| (NaN highest), sorted.
template <class F>
void top_columns(const F* g, i64 m, i64 n, i64 k, i64* cols) {
  using U = typename Key<F>::U;
  constexpr i64 L = Vec<U>::lanes;
  std::vector<F> score(n, F(0));
  for (i64 i = 0; i < m; i++)
    for (i64 c = 0; c < n; c++) score[c] += std::abs(g[i * n + c]);  // NaN stays NaN
  TopkScratch<F> s(n, (2 * k + L - 1) / L * L);
  topk_row<F>(reinterpret_cast<const U*>(score.data()), n, k, cols, s);
  std::sort(cols, cols + k);
}

template <class F>
void unified(const F* g, i64 m, i64 n, i64 k, const F* x, const F* w, i64 d, i64* cols, F* gc,
             F* dx, int dw_mode, F* dw, const i64* stale, i64 nstale, F* db, int nt) {
  if (nstale) zero_rows<F>(dw, d, stale, nstale, n * d * i64(sizeof(F)) >= kStreamBytes, 1);
  top_columns<F>(g, m, n, k, cols);
  for (i64 i = 0; i < m; i++)
    for (i64 j = 0; j < k; j++) gc[i * k + j] = g[i * n + cols[j]];
  if (db) column_sums<F>(g, m, n, db);
  if (dx) gemm_rows<F>(m, k, d, gc, k, 1, cols, w, nullptr, dx, nt);
  if (dw_mode == 0) return;
  if (dw_mode == 1) {  // the unselected rows of the dense dW: zero
    for (i64 r = 0, j = 0; r < n; r++) {
      if (j < k && cols[j] == r)
        j++;
      else
        zero(dw + r * d, d);
    }
  }
  // dW[cols[j]] = sum_i gc[i, j] x[i]: A = gc^T (k, M), B = x (all M rows).
  gemm_rows<F>(k, m, d, gc, 1, k, nullptr, x, dw_mode == 3 ? nullptr : cols, dw, nt);
}

// ------------------------------------------------------------------------------------------
// Convolution backward on each example's kept channels (SparseConv2d's "direct" form)
//
// x (B, Ci, H, W), w (Co, Ci, KH, KW), g (B, Co, OH, OW), stride 1, dilation 1, groups 1,
// zero padding (ph, pw): OH = H + 2 ph - KH + 1, OW = W + 2 pw - KW + 1. Example b keeps the
// channels idx[b * bstride + j], j < K (bstride 0: the same K for every example, unified),
// keep (B, K) or null: slot j counts only where keep[b * K + j] (adaptive k). Computes
//
//     dx[b, i] = sum_j sum_(kh, kw) w[c_j, i, kh, kw] * g[b, c_j] shifted by (kh, kw)
//     dw[c, i, kh, kw] = sum over (b, j) with c_j = c of sum_p g[b, c, p] x[b, i, p + (kh, kw)]
//
// i.e. the dense backward of g masked to the kept channels, at K / Co of its work. Where the
// kept channels are few and the images small (LeNet's 5x5 layers: rows of 10-28 numbers),
// PyTorch's im2col GEMM spends most of its time building the patch matrix; here every product
// runs over a whole image as one flat vector: the input is laid out padded (Hp, Wp) and each
// kept gradient map copied to rows of Wp numbers, zero beyond OW, so tap (kh, kw) is the
// offset kh * Wp + kw in the flat image and the zeros cancel the positions that wrap into the
// next row. Each dw entry is a dot product of length OH * Wp, each dx tap an axpy.
// Threads split the examples; each sums its own dw, added up at the end.
template <class F>
i64 conv_rows(const F* x, const F* w, const F* g, const i64* idx, i64 bstride, const uint8_t* keep,
              i64 B, i64 Ci, i64 H, i64 W, i64 Co, i64 KH, i64 KW, i64 ph, i64 pw, i64 K, F* dx,
              F* dw, int nt) {
  using FV = typename Vec<F>::type;
  constexpr i64 Ln = Vec<F>::lanes;
  i64 bad = count_bad(idx, bstride ? B * K : K, Co);
  if (bad) return -bad;
  const i64 Hp = H + 2 * ph, Wp = W + 2 * pw, OH = Hp - KH + 1, OW = Wp - KW + 1;
  const i64 len = (OH * Wp + Ln - 1) / Ln * Ln;  // flat length of a product, whole vectors
  const i64 span = len + (KH - 1) * Wp + KW - 1 + Ln;  // a padded image and its reach
  const i64 taps = KH * KW, wsize = Co * Ci * taps;
  nt = threads_for(nt, B);
  std::vector<F> dw_parts(dw ? size_t(std::max(nt - 1, 0)) * wsize : 0);
  if (dw) zero(dw, wsize);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t = 0, tn = 1;
#if defined(_OPENMP)
    t = omp_get_thread_num();
    tn = omp_get_num_threads();
#endif
    F* dwt = !dw ? nullptr : t == 0 ? dw : dw_parts.data() + (t - 1) * wsize;
    if (dwt && t > 0) zero(dwt, wsize);
    std::vector<F> xp(dw ? Ci * span : 0), gp(K * len), dxp(dx ? Ci * span : 0);
    std::vector<i64> chans(K);
    for (i64 b = t; b < B; b += tn) {
      const i64* ib = idx + b * bstride;
      i64 nk = 0;  // the kept slots of example b, their gradient maps padded to rows of Wp
      for (i64 j = 0; j < K; j++) {
        if (keep && !keep[b * K + j]) continue;
        const F* src = g + (b * Co + ib[j]) * OH * OW;
        F* dst = gp.data() + nk * len;
        zero(dst, len);
        for (i64 r = 0; r < OH; r++) std::memcpy(dst + r * Wp, src + r * OW, OW * sizeof(F));
        chans[nk++] = ib[j];
      }
      if (dw) {
        zero(xp.data(), Ci * span);
        for (i64 i = 0; i < Ci; i++)
          for (i64 r = 0; r < H; r++)
            std::memcpy(xp.data() + i * span + (r + ph) * Wp + pw, x + ((b * Ci + i) * H + r) * W,
                        W * sizeof(F));
        for (i64 j = 0; j < nk; j++) {
          const F* gj = gp.data() + j * len;
          F* dwc = dwt + chans[j] * Ci * taps;
          for (i64 i = 0; i < Ci; i++)
            for (i64 kh = 0; kh < KH; kh++)
              for (i64 kw = 0; kw < KW; kw++) {
                const F* xs = xp.data() + i * span + kh * Wp + kw;
                FV a0 = FV{} , a1 = FV{};
                i64 p = 0;
                for (; p + 2 * Ln <= len; p += 2 * Ln) {
                  a0 += vload(gj + p) * vload(xs + p);
                  a1 += vload(gj + p + Ln) * vload(xs + p + Ln);
                }
                if (p < len) a0 += vload(gj + p) * vload(xs + p);
                a0 += a1;
                F sum = 0;
                for (i64 l = 0; l < Ln; l++) sum += a0[l];
                dwc[(i * KH + kh) * KW + kw] += sum;
              }
        }
      }
      if (dx) {
        zero(dxp.data(), Ci * span);
        for (i64 i = 0; i < Ci; i++) {
          F* di = dxp.data() + i * span;
          for (i64 j = 0; j < nk; j++) {
            const F* gj = gp.data() + j * len;
            const F* wj = w + (chans[j] * Ci + i) * taps;
            for (i64 kh = 0; kh < KH; kh++)
              for (i64 kw = 0; kw < KW; kw++) {
                const FV wv = FV{} + wj[kh * KW + kw];
                F* d = di + kh * Wp + kw;
                for (i64 p = 0; p < len; p += Ln) vstore(d + p, vload(d + p) + wv * vload(gj + p));
              }
          }
          for (i64 r = 0; r < H; r++)
            std::memcpy(dx + ((b * Ci + i) * H + r) * W, di + (r + ph) * Wp + pw, W * sizeof(F));
        }
      }
    }
  }
  for (int t = 1; t < nt && dw; t++) {
    const F* part = dw_parts.data() + (t - 1) * wsize;
    for (i64 e = 0; e < wsize; e++) dw[e] += part[e];
  }
  return 0;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// C entry points (ctypes). Index bounds are checked where indices come from the caller: those
// functions return -(number of bad indices) and compute nothing when there are any.

#define MEPROP_EXPORT extern "C" __attribute__((visibility("default")))

#define MEPROP_DEFINE(SUFFIX, F)                                                               \
  MEPROP_EXPORT void meprop_topk_rows_##SUFFIX(const F* g, i64 m, i64 n, i64 k, i64* idx,      \
                                               F* vals, int nt) {                              \
    topk_rows<F>(g, m, n, k, idx, vals, nt);                                                   \
  }                                                                                            \
  MEPROP_EXPORT i64 meprop_rows_matmul_##SUFFIX(const i64* idx, const F* vals, i64 m, i64 k,   \
                                                const F* w, i64 n, i64 d, F* out, int nt) {    \
    i64 bad = count_bad(idx, m * k, n);                                                        \
    if (bad) return -bad;                                                                      \
    rows_matmul<F>(idx, k, vals, m, k, w, n, d, out, nt);                                      \
    return 0;                                                                                  \
  }                                                                                            \
  MEPROP_EXPORT i64 meprop_rows_outer_##SUFFIX(const i64* idx, const F* vals, i64 m, i64 k,    \
                                               const F* x, i64 d, i64 n, int dw_mode, F* dw,   \
                                               i64* rows, int nt) {                            \
    i64 bad = count_bad(idx, m * k, n);                                                        \
    if (bad) return -bad;                                                                      \
    Groups<F> gr(idx, vals, m, k, n);                                                          \
    if (dw_mode == 3) return outer_compact<F>(gr, n, x, d, rows, dw, nt);                      \
    return outer_dense<F>(gr, n, x, d, dw, dw_mode == 2, rows, nt);                            \
  }                                                                                            \
  MEPROP_EXPORT i64 meprop_per_example_##SUFFIX(                                               \
      const F* g, i64 m, i64 n, i64 k, const F* x, const F* w, i64 d, i64* idx, F* vals, F* dx,  \
      int dw_mode, F* dw, i64* rows, const i64* stale, i64 nstale, F* db, int nt,              \
      int nt_products) {                                                                       \
    return per_example<F>(g, m, n, k, x, w, d, idx, vals, dx, dw_mode, dw, rows, stale,        \
                          nstale, db, nt, nt_products);                                        \
  }                                                                                            \
  MEPROP_EXPORT i64 meprop_per_example_var_##SUFFIX(                                           \
      const F* g, i64 m, i64 n, i64 kmax, int rule, i64 min_k, F share,                         \
      int square, const F* tp, F* y_max, const F* x, const F* w, i64 d, i64* idx, F* vals,       \
      i64* ks_out, F* dx, int dw_mode, F* dw, i64* rows, const i64* stale, i64 nstale, F* db,    \
      int nt, int nt_products) {                                                               \
    return per_example_var<F>(g, m, n, kmax, rule, min_k, share, square != 0, tp, y_max,         \
                              x, w, d, idx, vals, ks_out, dx, dw_mode, dw, rows, stale, nstale,  \
                              db, nt, nt_products);                                              \
  }                                                                                            \
  MEPROP_EXPORT void meprop_channel_topk_mask_##SUFFIX(const F* g, i64 b, i64 c, i64 p,      \
                                                      i64 k, uint8_t* keep, int nt) {          \
    channel_topk_mask<F>(g, b, c, p, k, keep, nt);                                             \
  }                                                                                            \
  MEPROP_EXPORT void meprop_top_columns_##SUFFIX(const F* g, i64 m, i64 n, i64 k, i64* cols) {  \
    top_columns<F>(g, m, n, k, cols);                                                          \
  }                                                                                            \
  MEPROP_EXPORT void meprop_zero_rows_##SUFFIX(F* out, i64 d, const i64* rows, i64 nr,       \
                                               int stream, int nt) {                           \
    zero_rows<F>(out, d, rows, nr, stream != 0, nt);                                           \
  }                                                                                            \
  MEPROP_EXPORT i64 meprop_row_adam_##SUFFIX(F* p, F* m, F* v, i64 n, i64 d, const i64* rows, \
                                             i64 nr, const F* g, F lr, F b1, F b2, F eps,     \
                                             F wd, F bc1, F bc2_sqrt, int nt) {               \
    return row_adam<F>(p, m, v, n, d, rows, nr, g, lr, b1, b2, eps, wd, bc1, bc2_sqrt, nt);    \
  }                                                                                            \
  MEPROP_EXPORT i64 meprop_conv_rows_##SUFFIX(                                                \
      const F* x, const F* w, const F* g, const i64* idx, i64 bstride, const uint8_t* keep,     \
      i64 b, i64 ci, i64 h, i64 wd, i64 co, i64 kh, i64 kw, i64 ph, i64 pw, i64 k, F* dx, F* dw, \
      int nt) {                                                                                \
    return conv_rows<F>(x, w, g, idx, bstride, keep, b, ci, h, wd, co, kh, kw, ph, pw, k, dx,  \
                        dw, nt);                                                               \
  }                                                                                            \
  MEPROP_EXPORT void meprop_unified_##SUFFIX(                                                  \
      const F* g, i64 m, i64 n, i64 k, const F* x, const F* w, i64 d, i64* cols, F* gc, F* dx,   \
      int dw_mode, F* dw, const i64* stale, i64 nstale, F* db, int nt) {                       \
    unified<F>(g, m, n, k, x, w, d, cols, gc, dx, dw_mode, dw, stale, nstale, db, nt);         \
  }

MEPROP_DEFINE(f32, float)
MEPROP_DEFINE(f64, double)

// What the build assumes: its vector width (follows -march) and the L2 size it blocks for.
MEPROP_EXPORT i64 meprop_vector_bytes() { return kVecBytes; }
MEPROP_EXPORT i64 meprop_l2_bytes() { return l2_bytes(); }
