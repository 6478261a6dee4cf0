// Grouped attention over a KV cache on the CPU, reading each K/V head's keys and values
// once for all the query heads that share it (mqa/attention/cpu_decode.py).
//
//   q       float32 [B, K, R, Dq]  R = T * G query rows per K/V head: query position t, head g;
//                                  they meet each key's first Dq <= D numbers (tied attention's
//                                  tied state: its first half; the rest of the row is value)
//   k, v    float32 or int8 [B, K, S, D], the cache as it lies ("bksd"; MQA's "bsd" is K = 1)
//   scales  float32 [B, K, S] each (int8 only): vector (b, k, s) is its int8 values x scale
//   mask    bool    [M, T, S]      M = 1 or B: which keys each query position sees
//   out     float32 [B, K, R, Dv]  softmax(q k^T * scale, masked) v[:, :Dv]: the values' first
//                                  Dv <= D numbers (latent attention's rows end in a rotary key)
//
// One task per (b, k), on XLA's intra-op thread pool: all R rows' scores against the S keys,
// each key read once; the masked softmax of each row over the whole row (kept in cache);
// then the values, each read once, accumulated in registers. An int8 cache is read as
// stored, its scales applied to the sums (keys) and to the weights (values), so the bytes
// read are the int8 ones. Keys that are also the values (one buffer) go in chunks that stay
// in the processor's cache for both passes (`attend_chunked`): read from memory once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <latch>
#include <tuple>
#include <type_traits>
#include <utility>
#include <immintrin.h>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shapes {
  int64_t B, K, R, S, D, T, G, M;
  int64_t mask_ld;  // the mask's row length: S, or the whole cache's for a chunk of it
  int64_t Dv;       // numbers of each value row summed (its first), out's row length
  int64_t Dq;       // numbers of each key row met by the queries (its first), q's row length
};

// A second part of every key, for tied attention (GTA): a rotary key per position shared by
// all K/V heads, k [S, D] (this row's), met by the queries' rotary parts q [R, D]; the key
// of head k at s is then [the first buffer's key, this one] and the first buffer is also
// the value. k == nullptr: none.
template <typename E>
struct SharedKey {
  const float* q = nullptr;
  const E* k = nullptr;
  const float* scales = nullptr;
  int64_t D = 0;
};

typedef float f16 __attribute__((vector_size(64)));
typedef int8_t i16 __attribute__((vector_size(16)));
typedef uint8_t u16 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// 16 elements of a cache row as floats.
inline f16 load16(const float* x) {
  f16 v;
  std::memcpy(&v, x, sizeof(v));
  return v;
}
inline f16 load16(const int8_t* x) {
  i16 v;
  std::memcpy(&v, x, sizeof(v));
  return __builtin_convertvector(v, f16);
}

// A row of scores scaled, the positions it does not see set to -inf, 16 at a time (as one
// loop GCC keeps it scalar, a comparison and a branch per score); returns its maximum.
inline float mask_and_scale(float* scores, const bool* seen, int64_t S, float scale) {
  f16 row_max = f16{} - INFINITY;
  int64_t s = 0;
  for (; s + 16 <= S; s += 16) {
    u16 visible;
    std::memcpy(&visible, seen + s, sizeof(visible));
    const f16 x = __builtin_convertvector(visible, i32x16) != 0 ? load16(scores + s) * scale : f16{} - INFINITY;
    std::memcpy(scores + s, &x, sizeof(x));
    row_max = x > row_max ? x : row_max;
  }
  float most = -INFINITY;
  for (int i = 0; i < 16; ++i) most = row_max[i] > most ? row_max[i] : most;
  for (; s < S; ++s) {
    scores[s] = seen[s] ? scores[s] * scale : -INFINITY;
    most = scores[s] > most ? scores[s] : most;
  }
  return most;
}

// The cache streams through each task once, far ahead of what the hardware prefetchers
// fetch on their own: a row's cache lines PREFETCH_BYTES ahead are asked for as it is read
// (on a 2-core Xeon, MQA's attention at 476 rows: 1.6-2x faster 8-64 KB ahead than without).
constexpr int64_t PREFETCH_BYTES = 16384;
inline void prefetch_ahead(const void* row, int64_t bytes) {
  const char* at = static_cast<const char*>(row) + PREFETCH_BYTES;
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(at + i);
}

// The scale of cache vector s: 1 for a float cache.
inline float scale_of(const float* scales, int64_t s) { return scales ? scales[s] : 1.0f; }

// ROWS rows' weighted sums of D columns of the values, out [ROWS, D] = weights [ROWS, S] @
// values [S, D] (times each value row's scale), weight (r, s) at weights[r * row_stride +
// s * step], value row s at values + s * ld, out row r at out + r * out_ld, accumulated in
// registers (16-float vectors) over all S positions: each value row read once.
template <int D, int ROWS, typename E>
void values_tile(const float* weights, int64_t row_stride, int64_t step, int64_t S,
                 const E* values, int64_t ld, const float* scales, float* out, int64_t out_ld) {
  constexpr int V = D / 16;
  f16 acc[ROWS][V] = {};
  for (int64_t s = 0; s < S; ++s) {
    prefetch_ahead(values + s * ld, D * sizeof(E));
    f16 value[V];
    for (int i = 0; i < V; ++i) value[i] = load16(values + s * ld + 16 * i);
    const float scale = scale_of(scales, s);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float w = weights[r * row_stride + s * step] * scale;
#pragma GCC unroll 4
      for (int i = 0; i < V; ++i) acc[r][i] += w * value[i];
    }
  }
  for (int r = 0; r < ROWS; ++r) std::memcpy(out + r * out_ld, acc[r], sizeof(acc[r]));
}

#if defined(__AVX2__) && defined(__FMA__)
// 8 elements of a cache row as floats.
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const int8_t* x) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x))));
}

typedef float f8 __attribute__((vector_size(32)));
typedef float f4 __attribute__((vector_size(16)));

// ROWS (4 or 8) rows' dot products with one key, for D a multiple of 8, as one vector of
// ROWS lanes: the rows' partial vectors summed across lanes together (a hadd tree), instead
// of one horizontal sum per row. q2, key2, D2 (if q2): a second part of the key, met by a
// second part of the rows (tied attention's shared rotary key), summed in the same tree.
template <int ROWS, typename E>
inline auto dot_rows(const float* q, const E* key, int64_t D, const float* q2 = nullptr,
                     const E* key2 = nullptr, int64_t D2 = 0) {
  __m256 acc[ROWS];
#if defined(__AVX512F__)
  if (D % 16 == 0 && D >= 64) {  // half the multiplications, 16 lanes each; each row's halves then added
    __m512 wide[ROWS];
    for (int r = 0; r < ROWS; ++r) wide[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 kd = (__m512)load16(key + d);
      for (int r = 0; r < ROWS; ++r) wide[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + d), kd, wide[r]);
    }
    for (int r = 0; r < ROWS; ++r)
      acc[r] = _mm256_add_ps(_mm512_castps512_ps256(wide[r]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide[r]), 1)));
  } else
#endif
  {
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kd = load8(key + d);
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), kd, acc[r]);
    }
  }
  for (int64_t d = 0; q2 && d < D2; d += 8) {
    const __m256 kd = load8(key2 + d);
    for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + r * D2 + d), kd, acc[r]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  if constexpr (ROWS == 8) {
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return reinterpret_cast<f8>(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                              _mm256_permute2f128_ps(u0, u1, 0x31)));
  } else {
    const __m256 u = _mm256_hadd_ps(t0, t1);
    return reinterpret_cast<f4>(_mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
  }
}

// ROWS (4 or 8) rows (query heads of one K/V head, and query positions) at once, D = 16, 32,
// 64, 128 or 256 (FIXED_D; 0: width, any multiple of 16): scores kept position-major [S, ROWS],
// so that the sums of a key leave in one store and the softmax runs down the positions with
// each row in its own lane; then the values, each read once, into ROWS x 64 accumulators
// held in registers (wider rows: 64 columns at a time, each column block of the values read
// once). visible: the rows' query positions' rows of the mask (rows r and r' share one when
// r / G == r' / G). stats (if not null): each row's [score maximum, sum of its exp] [ROWS, 2].
template <int FIXED_D, int ROWS, typename E>
void attend_rows(const float* q, const E* k, const E* v, const float* k_scales, const float* v_scales,
                 const SharedKey<E>& shared, const bool* const* visible, float* out, int64_t S,
                 int64_t width, int64_t Dq, int64_t Dv, float scale, std::vector<float>& buffer,
                 float* stats) {
  const int64_t D = FIXED_D ? FIXED_D : width;
  using Lanes = std::conditional_t<ROWS == 8, f8, f4>;
  buffer.resize(S * ROWS);
  float* p = buffer.data();
  Lanes row_max = Lanes{} - INFINITY;
  // one row of the mask for all ROWS (decoding: each K/V head's query heads at one
  // position) is one byte a position, not ROWS bytes each inserted into a lane
  bool one_mask_row = true;
  for (int r = 1; r < ROWS; ++r) one_mask_row &= visible[r] == visible[0];
  for (int64_t s = 0; s < S; ++s) {
    prefetch_ahead(k + s * D, D * sizeof(E));
    Lanes open = Lanes{};
    if (one_mask_row) {
      if (!visible[0][s]) open -= INFINITY;
    } else {
      for (int r = 0; r < ROWS; ++r) open[r] = visible[r][s] ? 0.0f : -INFINITY;
    }
    Lanes scores;
    if (shared.k && !k_scales && !shared.scales) {  // float: both parts of the key in one sum
      scores = dot_rows<ROWS>(q, k + s * D, Dq, shared.q, shared.k + s * shared.D, shared.D) * scale + open;
    } else {
      scores = dot_rows<ROWS>(q, k + s * D, Dq) * (scale * scale_of(k_scales, s)) + open;
      if (shared.k) {
        scores += dot_rows<ROWS>(shared.q, shared.k + s * shared.D, shared.D) *
                  (scale * scale_of(shared.scales, s));
      }
    }
    std::memcpy(p + s * ROWS, &scores, sizeof(scores));
    row_max = scores > row_max ? scores : row_max;
  }
  float maxes[ROWS], sums[ROWS] = {};
  for (int r = 0; r < ROWS; ++r) maxes[r] = row_max[r] == -INFINITY ? 0.0f : row_max[r];
  for (int64_t s = 0; s < S; ++s) {
    for (int r = 0; r < ROWS; ++r) {
      p[s * ROWS + r] = std::exp(p[s * ROWS + r] - maxes[r]);
      sums[r] += p[s * ROWS + r];
    }
  }
  int64_t c = 0;  // the values' columns: 64 at a time, then the 16, 32 or 48 left in one tile
  for (; c + 64 <= Dv; c += 64) values_tile<64, ROWS>(p, 1, ROWS, S, v + c, D, v_scales, out + c, Dv);
  switch (Dv - c) {
    case 16: values_tile<16, ROWS>(p, 1, ROWS, S, v + c, D, v_scales, out + c, Dv); break;
    case 32: values_tile<32, ROWS>(p, 1, ROWS, S, v + c, D, v_scales, out + c, Dv); break;
    case 48: values_tile<48, ROWS>(p, 1, ROWS, S, v + c, D, v_scales, out + c, Dv); break;
  }
  for (int r = 0; r < ROWS; ++r) {
    if (stats) stats[2 * r] = maxes[r], stats[2 * r + 1] = sums[r];
    const float inverse = sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f;
    for (int64_t d = 0; d < Dv; ++d) out[r * Dv + d] *= inverse;
  }
}
#endif

// One (b, k) task: all R rows' scores against the S keys [R, S], their masked softmax per
// row, then the values (q [R, Dq]; out [R, Dv], normalised; stats, if not null, each row's
// [score maximum, sum of its exp] [R, 2]). D is a compile-time constant for the common head sizes
// (the inner loops then vectorize fully), 0 for any other. in_cache: the keys and values lie
// in the processor's cache (a chunk of one buffer, `attend_chunked`), so that a second pass
// over them costs no memory traffic.
template <int FIXED_D, typename E>
void attend_head(const float* q, const E* k, const E* v, const float* k_scales,
                 const float* v_scales, const SharedKey<E>& shared, const bool* mask, float* out,
                 const Shapes& n, float scale, std::vector<float>& scores, float* stats = nullptr,
                 bool in_cache = false) {
  const int64_t D = FIXED_D ? FIXED_D : n.D;
  const int64_t R = n.R, S = n.S, Dq = n.Dq, Dv = n.Dv;
  int64_t first = 0;  // rows done
#if defined(__AVX2__) && defined(__FMA__)
  if (FIXED_D || D % 16 == 0) {
    // rows: std::integral_constant<int, 4 or 8>; q, q_shared: their queries; out, st: theirs.
    auto block = [&](auto rows, const float* q_rows, const float* q_shared, float* o, float* st, int64_t live) {
      constexpr int ROWS = decltype(rows)::value;
      const bool* visible[ROWS];
      for (int r = 0; r < ROWS; ++r) visible[r] = mask + ((first + std::min<int64_t>(r, live - 1)) / n.G) * n.mask_ld;
      SharedKey<E> part = shared;
      part.q = q_shared;
      attend_rows<FIXED_D, ROWS>(q_rows, k, v, k_scales, v_scales, part, visible, o, S, D, Dq, Dv, scale, scores,
                                 st);
    };
    auto shared_q = [&] { return shared.q ? shared.q + first * shared.D : nullptr; };
    auto stats_of = [&] { return stats ? stats + 2 * first : nullptr; };
    // Blocks of 8 and 4 rows, and 3 rows left padded to 4 (SmolLM2's 9 query heads on 3
    // K/V heads); 1 or 2 rows left take the plain loop, which reads the cache again, so for
    // rows of 128 or more numbers (where the plain loop is close) only when no row is left
    // or the keys and values lie in the processor's cache.
    const bool covered = R % 4 == 0 || R % 4 == 3 || in_cache;
    const bool blocks = shared.D % 8 == 0 && Dq % 8 == 0 && Dv % 16 == 0 && ((FIXED_D && FIXED_D <= 64) || covered);
    for (; blocks && first + 8 <= R; first += 8)
      block(std::integral_constant<int, 8>{}, q + first * Dq, shared_q(), out + first * Dv, stats_of(), 8);
    for (; blocks && first + 4 <= R; first += 4)
      block(std::integral_constant<int, 4>{}, q + first * Dq, shared_q(), out + first * Dv, stats_of(), 4);
    if (blocks && first + 3 == R) {  // a 4-row block, the missing row's query 0
      const int64_t live = R - first;
      thread_local std::vector<float> pad;  // this worker's, reused across tasks
      pad.assign(4 * (Dq + Dv + shared.D + 2), 0.0f);
      float *q_pad = pad.data(), *out_pad = q_pad + 4 * Dq, *shared_pad = out_pad + 4 * Dv,
            *stats_pad = shared_pad + 4 * shared.D;
      std::memcpy(q_pad, q + first * Dq, live * Dq * sizeof(float));
      if (shared.q) std::memcpy(shared_pad, shared_q(), live * shared.D * sizeof(float));
      block(std::integral_constant<int, 4>{}, q_pad, shared.q ? shared_pad : nullptr, out_pad, stats_pad, live);
      std::memcpy(out + first * Dv, out_pad, live * Dv * sizeof(float));
      if (stats) std::memcpy(stats_of(), stats_pad, live * 2 * sizeof(float));
      first = R;
    }
  }
#endif
  if (first == R) return;
  scores.resize(R * S);
  float* p = scores.data();
  for (int64_t s = 0; s < S && first < R; ++s) {  // scores: each key read once for all rows
    const E* key = k + s * D;
    prefetch_ahead(key, D * sizeof(E));
    const float key_scale = scale_of(k_scales, s);
    for (int64_t r = first; r < R; ++r) {
      const float* qr = q + r * Dq;
      float dot = 0.0f;
      for (int64_t d = 0; d < Dq; ++d) dot += qr[d] * static_cast<float>(key[d]);
      p[r * S + s] = dot * key_scale;
      if (shared.k) {
        float extra = 0.0f;
        for (int64_t d = 0; d < shared.D; ++d)
          extra += shared.q[r * shared.D + d] * static_cast<float>(shared.k[s * shared.D + d]);
        p[r * S + s] += extra * scale_of(shared.scales, s);
      }
    }
  }
  std::vector<float> inverse(R);
  for (int64_t r = first; r < R; ++r) {  // masked softmax per row, vectorized over positions
    float* pr = p + r * S;
    float row_max = mask_and_scale(pr, mask + (r / n.G) * n.mask_ld, S, scale);
    if (row_max == -INFINITY) row_max = 0.0f;  // nothing visible: every weight 0
    float sum = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      pr[s] = std::exp(pr[s] - row_max);
      sum += pr[s];
    }
    inverse[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
    if (stats) stats[2 * r] = row_max, stats[2 * r + 1] = sum;
  }
  int64_t r = first;
  if constexpr (FIXED_D > 0 && FIXED_D % 16 == 0 && FIXED_D <= 64) {
    for (; r + 4 <= R && Dv == D; r += 4) values_tile<FIXED_D, 4>(p + r * S, S, 1, S, v, D, v_scales, out + r * Dv, Dv);
  }
  std::fill(out + r * Dv, out + R * Dv, 0.0f);
  for (int64_t s = 0; s < S; ++s) {  // the other rows: values read once for all of them
    const E* value = v + s * D;
    prefetch_ahead(value, D * sizeof(E));
    const float value_scale = scale_of(v_scales, s);
    for (int64_t row = r; row < R; ++row) {
      const float w = p[row * S + s] * value_scale;
      float* o = out + row * Dv;
      for (int64_t d = 0; d < Dv; ++d) o[d] += w * static_cast<float>(value[d]);
    }
  }
  for (int64_t row = first; row < R; ++row) {
    for (int64_t d = 0; d < Dv; ++d) out[row * Dv + d] *= inverse[row];
  }
}

// attend_head for this D.
template <typename E>
void attend_any(const float* q, const E* k, const E* v, const float* k_scales, const float* v_scales,
                const SharedKey<E>& shared, const bool* mask, float* out, const Shapes& n, float scale,
                std::vector<float>& scores, float* stats = nullptr, bool in_cache = false) {
  switch (n.D) {
    case 16: return attend_head<16>(q, k, v, k_scales, v_scales, shared, mask, out, n, scale, scores, stats, in_cache);
    case 32: return attend_head<32>(q, k, v, k_scales, v_scales, shared, mask, out, n, scale, scores, stats, in_cache);
    case 64: return attend_head<64>(q, k, v, k_scales, v_scales, shared, mask, out, n, scale, scores, stats, in_cache);
    case 128: return attend_head<128>(q, k, v, k_scales, v_scales, shared, mask, out, n, scale, scores, stats, in_cache);
    case 256: return attend_head<256>(q, k, v, k_scales, v_scales, shared, mask, out, n, scale, scores, stats, in_cache);
    default: return attend_head<0>(q, k, v, k_scales, v_scales, shared, mask, out, n, scale, scores, stats, in_cache);
  }
}

// Keys that are also the values, one buffer (latent attention's cached rows, tied
// attention's tied state), read from memory once: the positions in chunks of chunk_bytes,
// each chunk's scores and then its values computed while it lies in the processor's cache,
// and the chunks' results merged by their rows' softmax statistics (score maximum m, sum of
// exp l: out = sum_c e^(m_c - m) l_c out_c / sum_c e^(m_c - m) l_c, as flash-decoding merges
// its splits). Two passes over the whole buffer read it twice from memory.
std::atomic<int64_t> chunk_bytes{262144};  // `MqaCpuDecodeSetChunkBytes`; 256 KB: an eighth of a Xeon core's L2
std::atomic<int64_t> chunked_tasks{0};  // tasks that took this path, for the tests

template <typename E>
void attend_chunked(const float* q, const E* kv, const float* kv_scales, const SharedKey<E>& shared,
                    const bool* mask, float* out, const Shapes& n, float scale,
                    std::vector<float>& scores, int64_t chunk) {
  const int64_t R = n.R, D = n.D, Dv = n.Dv;
  thread_local std::vector<float> work;  // a chunk's out [R, Dv] and stats [R, 2]; the running stats
  work.assign(R * Dv + 4 * R, 0.0f);
  float *chunk_out = work.data(), *chunk_stats = chunk_out + R * Dv, *stats = chunk_stats + 2 * R;
  for (int64_t s0 = 0; s0 < n.S; s0 += chunk) {
    Shapes part = n;
    part.S = std::min(chunk, n.S - s0);
    SharedKey<E> shared_part = shared;
    if (shared.k) {
      shared_part.k += s0 * shared.D;
      if (shared.scales) shared_part.scales += s0;
    }
    const E* rows = kv + s0 * D;
    const float* row_scales = kv_scales ? kv_scales + s0 : nullptr;
    const bool first = s0 == 0;
    attend_any(q, rows, rows, row_scales, row_scales, shared_part, mask + s0, first ? out : chunk_out,
               part, scale, scores, first ? stats : chunk_stats, true);
    if (first) continue;
    for (int64_t r = 0; r < R; ++r) {
      float &m = stats[2 * r], &l = stats[2 * r + 1];
      const float m_c = chunk_stats[2 * r], l_c = chunk_stats[2 * r + 1];
      if (l_c == 0.0f) continue;  // the row sees nothing in this chunk
      const float top = std::max(m, m_c);
      const float a = l == 0.0f ? 0.0f : l * std::exp(m - top), b = l_c * std::exp(m_c - top);
      const float wa = a / (a + b), wb = b / (a + b);
      for (int64_t d = 0; d < Dv; ++d) out[r * Dv + d] = wa * out[r * Dv + d] + wb * chunk_out[r * Dv + d];
      m = top;
      l = a + b;
    }
  }
}

template <typename E>
void attend_task(int64_t task, const float* q, const E* k, const E* v, const float* k_scales,
                 const float* v_scales, const SharedKey<E>& shared, const bool* mask, float* out,
                 const Shapes& n, float scale, std::vector<float>& scores) {
  const int64_t b = task / n.K;
  const int64_t keys = n.S * n.D;
  const float* qt = q + task * n.R * n.Dq;
  const E* kt = k + task * keys;
  const E* vt = v + task * keys;
  const float* kst = k_scales ? k_scales + task * n.S : nullptr;
  const float* vst = v_scales ? v_scales + task * n.S : nullptr;
  const bool* mt = mask + (n.M == 1 ? 0 : b) * n.T * n.S;
  float* ot = out + task * n.R * n.Dv;
  SharedKey<E> st = shared;  // this task's queries, and this row's shared keys
  if (shared.k) {
    st.q = shared.q + task * n.R * shared.D;
    st.k = shared.k + b * n.S * shared.D;
    st.scales = shared.scales ? shared.scales + b * n.S : nullptr;
  }
  const int64_t chunk = std::max<int64_t>(16, chunk_bytes.load(std::memory_order_relaxed) / (n.D * sizeof(E)) / 16 * 16);
  if (kt == vt && kst == vst && n.S > chunk) {
    chunked_tasks.fetch_add(1, std::memory_order_relaxed);
    return attend_chunked(qt, kt, kst, st, mt, ot, n, scale, scores, chunk);
  }
  attend_any(qt, kt, vt, kst, vst, st, mt, ot, n, scale, scores);
}

// Runs task(t, scores) for t in [0, tasks) on XLA's intra-op threads, each worker taking
// the next task as it finishes one, with its own scores buffer reused across its tasks.
template <typename Task>
void run_tasks(ffi::ThreadPool& pool, int64_t tasks, const Task& task) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), tasks));
  std::atomic<int64_t> next{0};
  std::latch done(workers);
  auto work = [&] {
    std::vector<float> scores;
    for (int64_t t = next++; t < tasks; t = next++) task(t, scores);
    done.count_down();
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([&work] { work(); });
  work();
  done.wait();
}

// Both handlers: k and v come as the cache holds them (any rank: reshaping them here would
// make XLA copy the cache): their elements are [B, K, S, D] in order, K and B from q; out
// [B, K, R, Dv] says how many of each value row's first numbers are summed.
template <typename E>
ffi::Error Attend(ffi::ThreadPool& pool, const float* q, ffi::Span<const int64_t> qd,
                  const E* k, const E* v, int64_t k_count, int64_t v_count, const float* k_scales,
                  const float* v_scales, const bool* mask, ffi::Span<const int64_t> md, float scale,
                  int64_t groups, float* out, ffi::Span<const int64_t> od, SharedKey<E> shared = {}) {
  if (qd.size() != 4 || md.size() != 3 || od.size() != 4) {
    return ffi::Error::InvalidArgument("cpu_decode: q and out must be 4-D and the mask 3-D");
  }
  const int64_t vectors = qd[0] * qd[1] * md[2];  // B * K * S: D, each row's length, from k
  Shapes n{qd[0], qd[1], qd[2], md[2], vectors ? k_count / vectors : 0, md[1], groups, md[0], md[2], od[3], qd[3]};
  if (k_count != n.B * n.K * n.S * n.D || v_count != k_count || n.T * n.G != n.R ||
      (n.M != 1 && n.M != n.B) || od[0] != n.B || od[1] != n.K || od[2] != n.R || n.Dv < 1 ||
      n.Dv > n.D || n.Dq < 1 || n.Dq > n.D) {
    return ffi::Error::InvalidArgument("cpu_decode: inconsistent shapes");
  }
  run_tasks(pool, n.B * n.K, [&](int64_t t, std::vector<float>& scores) {
    attend_task(t, q, k, v, k_scales, v_scales, shared, mask, out, n, scale, scores);
  });
  return ffi::Error::Success();
}

ffi::Error AttendF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                     int64_t groups, ffi::ResultBuffer<ffi::F32> out) {
  return Attend(pool, q.typed_data(), q.dimensions(), k.typed_data(), v.typed_data(),
                k.element_count(), v.element_count(), nullptr, nullptr, mask.typed_data(),
                mask.dimensions(), scale, groups, out->typed_data(), out->dimensions());
}

ffi::Error AttendInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S8> k,
                      ffi::Buffer<ffi::S8> v, ffi::Buffer<ffi::F32> k_scales,
                      ffi::Buffer<ffi::F32> v_scales, ffi::Buffer<ffi::PRED> mask, float scale,
                      int64_t groups, ffi::ResultBuffer<ffi::F32> out) {
  if (k_scales.element_count() != q.dimensions()[0] * q.dimensions()[1] * mask.dimensions()[2] ||
      v_scales.element_count() != k_scales.element_count()) {
    return ffi::Error::InvalidArgument("cpu_decode: one scale per cached vector");
  }
  return Attend(pool, q.typed_data(), q.dimensions(), k.typed_data(), v.typed_data(),
                k.element_count(), v.element_count(), k_scales.typed_data(), v_scales.typed_data(),
                mask.typed_data(), mask.dimensions(), scale, groups, out->typed_data(), out->dimensions());
}

// Tied attention (GTA): the tied state's first Dq numbers are the first part of each key (q
// [B, K, R, Dq]: the queries' unrotated part, `tied.attend_tied`) and the whole state the
// value; q_rope [B, K, R, Dr] meets the shared rotary key rope [B, S, Dr].
template <typename E>
ffi::Error AttendTied(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& q_rope,
                      const E* tied, int64_t tied_count, const E* rope, int64_t rope_count,
                      const float* tied_scales, const float* rope_scales, ffi::Buffer<ffi::PRED>& mask,
                      float scale, int64_t groups, ffi::ResultBuffer<ffi::F32>& out) {
  const auto qd = q.dimensions(), rd = q_rope.dimensions();
  if (rd.size() != 4 || qd.size() != 4 || rd[0] != qd[0] || rd[1] != qd[1] || rd[2] != qd[2] ||
      rope_count != qd[0] * mask.dimensions()[2] * rd[3]) {
    return ffi::Error::InvalidArgument("cpu_decode: inconsistent rotary shapes");
  }
  SharedKey<E> shared{q_rope.typed_data(), rope, rope_scales, rd[3]};
  return Attend(pool, q.typed_data(), qd, tied, tied, tied_count, tied_count, tied_scales,
                tied_scales, mask.typed_data(), mask.dimensions(), scale, groups, out->typed_data(),
                out->dimensions(), shared);
}

ffi::Error AttendTiedF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> q_rope,
                         ffi::Buffer<ffi::F32> tied, ffi::Buffer<ffi::F32> rope,
                         ffi::Buffer<ffi::PRED> mask, float scale, int64_t groups,
                         ffi::ResultBuffer<ffi::F32> out) {
  return AttendTied(pool, q, q_rope, tied.typed_data(), tied.element_count(), rope.typed_data(),
                    rope.element_count(), nullptr, nullptr, mask, scale, groups, out);
}

ffi::Error AttendTiedInt8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> q_rope,
                          ffi::Buffer<ffi::S8> tied, ffi::Buffer<ffi::S8> rope,
                          ffi::Buffer<ffi::F32> tied_scales, ffi::Buffer<ffi::F32> rope_scales,
                          ffi::Buffer<ffi::PRED> mask, float scale, int64_t groups,
                          ffi::ResultBuffer<ffi::F32> out) {
  return AttendTied(pool, q, q_rope, tied.typed_data(), tied.element_count(), rope.typed_data(),
                    rope.element_count(), tied_scales.typed_data(), rope_scales.typed_data(), mask,
                    scale, groups, out);
}

// ----------------------------------------------------------------------------- int4
// A KIVI int4 cache (mqa/kv_int4.py) read as stored, for head sizes D of 32, 64, 128 or 256
// and value groups of channels that are multiples of 32 (16 bytes of a row: 32 numbers, the even-indexed ones
// in the low nibbles, the odd-indexed in the high ones, all in one group of channels):
//   k        uint8   [B, K, S, D/2]     levels 0..15, two to a byte
//   k_scale  float16 [B, K, S/Gk, D]    per channel and group of Gk positions; and k_min
//   residual float32 [B, K, Gk, D]      the exact keys of the group at residual_start
//   v        uint8   [B, K, S, D/2]
//   v_scale  float16 [B, K, S, D/Gv]    per position and group of Gv channels; and v_min
// A key is levels * scale + min per channel, so q.key = (q * scale).levels + q.min: the
// queries are scaled once per group of positions, and each packed key is met as it lies.
// A value likewise: sum_s p (levels * scale + min) = sum_s (p * scale) levels + sum_s p min.
// The even and odd channels are kept apart until the output is written.
typedef _Float16 h16 __attribute__((vector_size(32)));

struct Int4 {
  const uint8_t *k, *v;
  const _Float16 *k_scale, *k_min, *v_scale, *v_min;
  const float* residual;
  int64_t key_group, value_group, residual_start;
};


// 32 numbers of a packed row as (even-indexed, odd-indexed) float vectors (through int32:
// GCC converts bytes straight to floats one lane at a time).
inline std::pair<f16, f16> unpack32(const uint8_t* x) {
  u16 b;
  std::memcpy(&b, x, sizeof(b));
  return {__builtin_convertvector(__builtin_convertvector(b & 15, i32x16), f16),
          __builtin_convertvector(__builtin_convertvector(b >> 4, i32x16), f16)};
}

// 32 numbers in two vectors as (even-indexed, odd-indexed) ones.
inline std::pair<f16, f16> even_odd(f16 a, f16 b) {
  return {__builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
          __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31)};
}

// 32 float16 numbers as (even-indexed, odd-indexed) float vectors.
inline std::pair<f16, f16> halves32(const _Float16* x) {
  h16 lo, hi;
  std::memcpy(&lo, x, sizeof(lo));
  std::memcpy(&hi, x + 16, sizeof(hi));
  return even_odd(__builtin_convertvector(lo, f16), __builtin_convertvector(hi, f16));
}

inline float sum16(f16 x) {
  typedef float f8v __attribute__((vector_size(32)));
  typedef float f4v __attribute__((vector_size(16)));
  const f8v a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
  const f4v b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return b[0] + b[1] + b[2] + b[3];
}

// 16 vectors' lane sums as one vector, sums[i] = the sum of x[i]'s lanes: four rounds of
// adding two vectors' halves side by side (15 additions, where 16 separate sums take 60+).
inline f16 sum_lanes16(const f16* x) {
  f16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}


// The values for B rows (live of them real; the rest repeat the last and are dropped) of
// an int4 task: weights p [R, S] (normalised by `inverse` at the end), each value row
// unpacked once per B rows, its sums kept in registers. out [R, D].
template <int C, int B>
void int4_values(const float* p, int64_t first, int64_t live, const Int4& c, const uint8_t* visible,
                 const int* group_of, int64_t groups, const float* inverse, float* out, const Shapes& n) {
  constexpr int D = 32 * C;
  const int64_t S = n.S;
  const float* weights[B];
  for (int b = 0; b < B; ++b) weights[b] = p + (first + std::min<int64_t>(b, live - 1)) * S;
  f16 even[B][C] = {}, odd[B][C] = {};
  float low[B][C] = {};  // sum_s p v_min per group of channels (groups <= C)
  for (int64_t s = 0; s < S; ++s) {
    if (!visible[s]) continue;
    prefetch_ahead(c.v + s * (D / 2), D / 2);
    std::pair<f16, f16> value[C];
    float scale[C], minimum[C];
    for (int j = 0; j < C; ++j) {
      value[j] = unpack32(c.v + s * (D / 2) + 16 * j);
      scale[j] = static_cast<float>(c.v_scale[s * groups + group_of[j]]);
    }
    for (int64_t g = 0; g < groups; ++g) minimum[g] = static_cast<float>(c.v_min[s * groups + g]);
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) {
      const float w = weights[b][s];
      for (int j = 0; j < C; ++j) {
        even[b][j] += (w * scale[j]) * value[j].first;
        odd[b][j] += (w * scale[j]) * value[j].second;
      }
      for (int64_t g = 0; g < groups; ++g) low[b][g] += w * minimum[g];
    }
  }
  for (int b = 0; b < live; ++b) {
    float* o = out + (first + b) * D;
    const float norm = inverse[first + b];
    for (int j = 0; j < C; ++j) {
      const float shift = low[b][group_of[j]];
      for (int i = 0; i < 16; ++i) {
        o[32 * j + 2 * i] = (even[b][j][i] + shift) * norm;
        o[32 * j + 2 * i + 1] = (odd[b][j][i] + shift) * norm;
      }
    }
  }
}

// One (b, k) task of an int4 cache: the R rows' scores [R, S], their masked softmax, the
// values. C = D / 32 chunks per row; positions 16 at a time, their keys unpacked once for
// all rows and their R x 16 dot products summed across lanes together.
template <int D>
void attend_head_int4(const float* q, const Int4& c, const bool* mask, float* out, const Shapes& n,
                      float scale, std::vector<float>& scores) {
  constexpr int C = D / 32;
  const int64_t R = n.R, S = n.S, Gk = c.key_group, Gv = c.value_group, groups = D / Gv;
  thread_local std::vector<f16> work;  // this worker's: queries split, and scaled per key group
  work.assign(4 * R * C, f16{});
  f16 *q_even = work.data(), *q_odd = q_even + R * C, *scaled_even = q_odd + R * C,
      *scaled_odd = scaled_even + R * C;
  for (int64_t r = 0; r < R; ++r) {
    for (int j = 0; j < C; ++j) {
      std::tie(q_even[r * C + j], q_odd[r * C + j]) =
          even_odd(load16(q + r * D + 32 * j), load16(q + r * D + 32 * j + 16));
    }
  }
  // positions any row sees: one row of the mask per query position
  thread_local std::vector<uint8_t> visible;
  visible.assign(S, 0);
  for (int64_t t = 0; t < n.T; ++t)
    for (int64_t s = 0; s < S; ++s) visible[s] |= mask[t * S + s];
  scores.resize(R * S);
  float* p = scores.data();
  std::vector<float> offset(R);
  for (int64_t first = 0; first < S; first += Gk) {  // scores, one group of Gk positions at a time
    const int64_t last = std::min(first + Gk, S);
    if (std::find(visible.begin() + first, visible.begin() + last, 1) == visible.begin() + last) {
      for (int64_t r = 0; r < R; ++r) std::fill(p + r * S + first, p + r * S + last, -INFINITY);
      continue;
    }
    if (first == c.residual_start) {  // this group's keys wait exact, unquantized
      for (int64_t s = first; s < last; ++s) {
        const float* key = c.residual + (s - first) * D;
        for (int64_t r = 0; r < R; ++r) {
          f16 acc{};
          for (int j = 0; j < 2 * C; ++j) acc += load16(q + r * D + 16 * j) * load16(key + 16 * j);
          p[r * S + s] = sum16(acc);
        }
      }
      continue;
    }
    const _Float16 *group_scale = c.k_scale + (first / Gk) * D, *group_min = c.k_min + (first / Gk) * D;
    std::fill(offset.begin(), offset.end(), 0.0f);
    for (int j = 0; j < C; ++j) {  // q.key = (q * scale).levels + q.min
      auto [scale_even, scale_odd] = halves32(group_scale + 32 * j);
      auto [min_even, min_odd] = halves32(group_min + 32 * j);
      for (int64_t r = 0; r < R; ++r) {
        scaled_even[r * C + j] = q_even[r * C + j] * scale_even;
        scaled_odd[r * C + j] = q_odd[r * C + j] * scale_odd;
        offset[r] += sum16(q_even[r * C + j] * min_even + q_odd[r * C + j] * min_odd);
      }
    }
    int64_t s = first;
    for (; s + 16 <= last; s += 16) {
      prefetch_ahead(c.k + s * (D / 2), 16 * (D / 2));
      std::pair<f16, f16> keys[16][C];
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < C; ++j) keys[i][j] = unpack32(c.k + (s + i) * (D / 2) + 16 * j);
      for (int64_t r = 0; r < R; ++r) {
        f16 dots[16];
        for (int i = 0; i < 16; ++i) {
          f16 acc{};
          for (int j = 0; j < C; ++j)
            acc += scaled_even[r * C + j] * keys[i][j].first + scaled_odd[r * C + j] * keys[i][j].second;
          dots[i] = acc;
        }
        const f16 sums = sum_lanes16(dots) + offset[r];
        std::memcpy(p + r * S + s, &sums, sizeof(sums));
      }
    }
    for (; s < last; ++s) {  // a group of positions not a multiple of 16
      for (int64_t r = 0; r < R; ++r) {
        f16 acc{};
        for (int j = 0; j < C; ++j) {
          const auto [even, odd] = unpack32(c.k + s * (D / 2) + 16 * j);
          acc += scaled_even[r * C + j] * even + scaled_odd[r * C + j] * odd;
        }
        p[r * S + s] = sum16(acc) + offset[r];
      }
    }
  }
  std::vector<float> inverse(R);
  for (int64_t r = 0; r < R; ++r) {  // masked softmax per row
    float* pr = p + r * S;
    float row_max = mask_and_scale(pr, mask + (r / n.G) * S, S, scale);
    if (row_max == -INFINITY) row_max = 0.0f;
    float sum = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      pr[s] = std::exp(pr[s] - row_max);
      sum += pr[s];
    }
    inverse[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  int group_of[C];  // each chunk's group of channels
  for (int j = 0; j < C; ++j) group_of[j] = static_cast<int>(32 * j / Gv);
  // Rows at a time: up to 16 vectors of sums in registers (2 * C per row), and no more rows
  // than are left, rounded up to a power of two (3 rows: 4, one of them repeated).
  constexpr int most = C <= 8 ? 8 / C : 1;
  for (int64_t r = 0; r < R;) {
    const int64_t left = R - r;
    const int rows = left >= most ? most : left > 2 ? 4 : static_cast<int>(left);
    auto values = [&](auto block) {
      int4_values<C, decltype(block)::value>(p, r, std::min<int64_t>(block, left), c, visible.data(),
                                              group_of, groups, inverse.data(), out, n);
    };
    if (rows >= 8) values(std::integral_constant<int, std::min(8, most)>{});
    else if (rows >= 4) values(std::integral_constant<int, std::min(4, most)>{});
    else if (rows == 2) values(std::integral_constant<int, std::min(2, most)>{});
    else values(std::integral_constant<int, 1>{});
    r += std::min<int64_t>(rows, left);
  }
}

ffi::Error AttendInt4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::U8> k,
                      ffi::Buffer<ffi::F16> k_scale, ffi::Buffer<ffi::F16> k_min,
                      ffi::Buffer<ffi::F32> residual, ffi::Buffer<ffi::U8> v,
                      ffi::Buffer<ffi::F16> v_scale, ffi::Buffer<ffi::F16> v_min,
                      ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> residual_start, float scale,
                      int64_t groups, int64_t key_group, int64_t value_group,
                      ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || md.size() != 3) {
    return ffi::Error::InvalidArgument("cpu_decode: q must be 4-D and the mask 3-D");
  }
  Shapes n{qd[0], qd[1], qd[2], md[2], qd[3], md[1], groups, md[0], md[2], qd[3], qd[3]};
  const int64_t heads = n.B * n.K, numbers = heads * n.S * n.D;
  if ((n.D != 32 && n.D != 64 && n.D != 128 && n.D != 256) || value_group % 32 || n.D % value_group || key_group < 1 || n.S % key_group ||
      n.T * n.G != n.R || n.M != 1 || 2 * k.element_count() != numbers ||
      v.element_count() != k.element_count() || k_scale.element_count() * key_group != numbers ||
      k_min.element_count() != k_scale.element_count() ||
      residual.element_count() != heads * key_group * n.D ||
      v_scale.element_count() * value_group != numbers || v_min.element_count() != v_scale.element_count()) {
    return ffi::Error::InvalidArgument("cpu_decode: inconsistent int4 shapes");
  }
  const auto half = [](auto& buffer) { return reinterpret_cast<const _Float16*>(buffer.typed_data()); };
  const Int4 cache{k.typed_data(), v.typed_data(), half(k_scale), half(k_min), half(v_scale), half(v_min),
                   residual.typed_data(), key_group, value_group, residual_start.typed_data()[0]};
  run_tasks(pool, heads, [&](int64_t t, std::vector<float>& scores) {
    const int64_t numbers_per_head = n.S * n.D;
    Int4 c = cache;  // this head's buffers
    c.k += t * numbers_per_head / 2;
    c.v += t * numbers_per_head / 2;
    c.k_scale += t * numbers_per_head / key_group;
    c.k_min += t * numbers_per_head / key_group;
    c.v_scale += t * numbers_per_head / value_group;
    c.v_min += t * numbers_per_head / value_group;
    c.residual += t * key_group * n.D;
    const float* qt = q.typed_data() + t * n.R * n.D;
    float* ot = out->typed_data() + t * n.R * n.D;
    switch (n.D) {
      case 32: attend_head_int4<32>(qt, c, mask.typed_data(), ot, n, scale, scores); break;
      case 64: attend_head_int4<64>(qt, c, mask.typed_data(), ot, n, scale, scores); break;
      case 128: attend_head_int4<128>(qt, c, mask.typed_data(), ot, n, scale, scores); break;
      default: attend_head_int4<256>(qt, c, mask.typed_data(), ot, n, scale, scores); break;
    }
  });
  return ffi::Error::Success();
}

// The bindings: the thread pool and q, then the cache's buffers, then what both share.
auto with_queries() { return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>(); }

template <typename Binding>
auto with_mask_and_attributes(Binding binding) {
  return std::move(binding).template Arg<ffi::Buffer<ffi::PRED>>()
      .template Attr<float>("scale")
      .template Attr<int64_t>("groups")
      .template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MqaCpuDecodeAttend, AttendF32,
                              with_mask_and_attributes(with_queries()
                                                           .Arg<ffi::Buffer<ffi::F32>>()
                                                           .Arg<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MqaCpuDecodeAttendInt8, AttendInt8,
                              with_mask_and_attributes(with_queries()
                                                           .Arg<ffi::Buffer<ffi::S8>>()
                                                           .Arg<ffi::Buffer<ffi::S8>>()
                                                           .Arg<ffi::Buffer<ffi::F32>>()
                                                           .Arg<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MqaCpuDecodeAttendTied, AttendTiedF32,
                              with_mask_and_attributes(with_queries()
                                                           .Arg<ffi::Buffer<ffi::F32>>()
                                                           .Arg<ffi::Buffer<ffi::F32>>()
                                                           .Arg<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MqaCpuDecodeAttendTiedInt8, AttendTiedInt8,
                              with_mask_and_attributes(with_queries()
                                                           .Arg<ffi::Buffer<ffi::F32>>()
                                                           .Arg<ffi::Buffer<ffi::S8>>()
                                                           .Arg<ffi::Buffer<ffi::S8>>()
                                                           .Arg<ffi::Buffer<ffi::F32>>()
                                                           .Arg<ffi::Buffer<ffi::F32>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MqaCpuDecodeAttendInt4, AttendInt4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q
                                  .Arg<ffi::Buffer<ffi::U8>>()     // k
                                  .Arg<ffi::Buffer<ffi::F16>>()    // k_scale
                                  .Arg<ffi::Buffer<ffi::F16>>()    // k_min
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k_residual
                                  .Arg<ffi::Buffer<ffi::U8>>()     // v
                                  .Arg<ffi::Buffer<ffi::F16>>()    // v_scale
                                  .Arg<ffi::Buffer<ffi::F16>>()    // v_min
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // mask
                                  .Arg<ffi::Buffer<ffi::S32>>()    // residual_start
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("key_group")
                                  .Attr<int64_t>("value_group")
                                  .Ret<ffi::Buffer<ffi::F32>>());

// How many (row, K/V head) tasks have read keys that are also the values in chunks, once.
extern "C" int64_t MqaCpuDecodeChunkedTasks() { return chunked_tasks.load(); }

// Sets the chunks' size in bytes (at least 16 positions; the default 256 KB), returns the old.
extern "C" int64_t MqaCpuDecodeSetChunkBytes(int64_t bytes) { return chunk_bytes.exchange(bytes); }
