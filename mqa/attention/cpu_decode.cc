// Grouped attention over a KV cache on the CPU, reading each K/V head's keys and values
// once for all the query heads that share it (mqa/attention/cpu_decode.py).
//
//   q     float32 [B, K, R, D]   R = T * G query rows per K/V head: query position t, head g
//   k, v  float32 [B, K, S, D]   the cache as it lies ("bksd"; an MQA cache "bsd" is K = 1)
//   mask  bool    [M, T, S]      M = 1 or B: which keys each query position sees
//   out   float32 [B, K, R, D]   softmax(q k^T * scale, masked) v
//
// One task per (b, k): keys in blocks of BLOCK positions, the block's scores for all R rows
// at once, then an online softmax (running max and sum per row, FlashAttention's
// rescaling) and the values accumulated in R x D registers' worth of memory. Tasks run on
// XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <latch>
#include <immintrin.h>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Shapes {
  int64_t B, K, R, S, D, T, G, M;
};

typedef float f16 __attribute__((vector_size(64)));

// ROWS rows' weighted sums of the values, out [ROWS, D] = weights [ROWS, S] @ values [S, D],
// weight (r, s) at weights[r * row_stride + s * step], accumulated in registers (16-float
// vectors) over all S positions: each value row read once.
template <int D, int ROWS>
void values_tile(const float* weights, int64_t row_stride, int64_t step, int64_t S,
                 const float* values, float* out) {
  constexpr int V = D / 16;
  f16 acc[ROWS][V] = {};
  for (int64_t s = 0; s < S; ++s) {
    f16 value[V];
    std::memcpy(value, values + s * D, sizeof(value));
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const float w = weights[r * row_stride + s * step];
#pragma GCC unroll 4
      for (int i = 0; i < V; ++i) acc[r][i] += w * value[i];
    }
  }
  std::memcpy(out, acc, sizeof(acc));
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight rows' dot products with one key, for D a multiple of 8: 8 partial vectors summed
// across lanes together (hadd tree), instead of one horizontal sum per row.
inline __m256 dot8(const float* q, const float* key, int64_t D) {
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 kd = _mm256_loadu_ps(key + d);
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), kd, acc[r]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));  // rows 0..7
}

// Eight rows (query heads of one K/V head, and query positions) at once, D = 16 or 32:
// scores kept position-major [S, 8], so that the 8 sums of a key leave in one store and
// the softmax runs down the positions with each row in its own lane; then the values, each
// read once, into 8 x D accumulators held in registers. mask: the 8 rows' query positions'
// rows of the mask (rows r and r' share one when r / G == r' / G).
template <int D>
void attend8(const float* q, const float* k, const float* v, const bool* const* visible,
             float* out, int64_t S, float scale, std::vector<float>& buffer) {
  buffer.resize(S * 8);
  float* p = buffer.data();
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY), scaled = _mm256_set1_ps(scale);
  __m256 row_max = minus_inf;
  alignas(32) float open[8];
  for (int64_t s = 0; s < S; ++s) {
    for (int r = 0; r < 8; ++r) open[r] = visible[r][s] ? 0.0f : -INFINITY;
    const __m256 scores = _mm256_add_ps(_mm256_mul_ps(dot8(q, k + s * D, D), scaled),
                                        _mm256_load_ps(open));
    _mm256_storeu_ps(p + s * 8, scores);
    row_max = _mm256_max_ps(row_max, scores);
  }
  alignas(32) float maxes[8], sums[8] = {};
  _mm256_store_ps(maxes, row_max);
  for (int r = 0; r < 8; ++r) maxes[r] = maxes[r] == -INFINITY ? 0.0f : maxes[r];
  for (int64_t s = 0; s < S; ++s) {
    for (int r = 0; r < 8; ++r) {
      p[s * 8 + r] = std::exp(p[s * 8 + r] - maxes[r]);
      sums[r] += p[s * 8 + r];
    }
  }
  values_tile<D, 8>(p, 1, 8, S, v, out);
  for (int r = 0; r < 8; ++r) {
    const float inverse = sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f;
    for (int d = 0; d < D; ++d) out[r * D + d] *= inverse;
  }
}
#endif

// One (b, k) task: all R rows' scores against the S keys [R, S], their masked softmax per
// row, then the values. D is a compile-time constant for the common head sizes (the inner
// loops then vectorize fully), 0 for any other.
template <int FIXED_D>
void attend_head(const float* q, const float* k, const float* v, const bool* mask, float* out,
                 const Shapes& n, float scale, std::vector<float>& scores) {
  const int64_t D = FIXED_D ? FIXED_D : n.D;
  const int64_t R = n.R, S = n.S;
  int64_t first = 0;  // rows done
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (FIXED_D == 16 || FIXED_D == 32) {
    for (; first + 8 <= R; first += 8) {
      const bool* visible[8];
      for (int r = 0; r < 8; ++r) visible[r] = mask + ((first + r) / n.G) * S;
      attend8<FIXED_D>(q + first * D, k, v, visible, out + first * D, S, scale, scores);
    }
  }
#endif
  if (first == R) return;
  scores.resize(R * S);
  float* p = scores.data();
  for (int64_t s = 0; s < S && first < R; ++s) {  // scores: each key read once for all rows
    const float* key = k + s * D;
    int64_t r = first;
    for (; r < R; ++r) {
      const float* qr = q + r * D;
      float dot = 0.0f;
      for (int64_t d = 0; d < D; ++d) dot += qr[d] * key[d];
      p[r * S + s] = dot;
    }
  }
  std::vector<float> inverse(R);
  for (int64_t r = first; r < R; ++r) {  // masked softmax per row, vectorized over positions
    float* pr = p + r * S;
    const bool* visible = mask + (r / n.G) * S;
    float row_max = -INFINITY;
    for (int64_t s = 0; s < S; ++s) {
      pr[s] = visible[s] ? pr[s] * scale : -INFINITY;
      row_max = std::max(row_max, pr[s]);
    }
    if (row_max == -INFINITY) row_max = 0.0f;  // nothing visible: every weight 0
    float sum = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      pr[s] = std::exp(pr[s] - row_max);
      sum += pr[s];
    }
    inverse[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
  }
  int64_t r = first;
  if constexpr (FIXED_D > 0 && FIXED_D % 16 == 0 && FIXED_D <= 64) {
    for (; r + 4 <= R; r += 4) values_tile<FIXED_D, 4>(p + r * S, S, 1, S, v, out + r * D);
  }
  std::fill(out + r * D, out + R * D, 0.0f);
  for (int64_t s = 0; s < S; ++s) {  // the other rows: values read once for all of them
    const float* value = v + s * D;
    for (int64_t row = r; row < R; ++row) {
      const float w = p[row * S + s];
      float* o = out + row * D;
      for (int64_t d = 0; d < D; ++d) o[d] += w * value[d];
    }
  }
  for (int64_t row = first; row < R; ++row) {
    for (int64_t d = 0; d < D; ++d) out[row * D + d] *= inverse[row];
  }
}

void attend_task(int64_t task, const float* q, const float* k, const float* v, const bool* mask,
                 float* out, const Shapes& n, float scale, std::vector<float>& scores) {
  const int64_t b = task / n.K;
  const int64_t rows = n.R * n.D, keys = n.S * n.D;
  const float* qt = q + task * rows;
  const float* kt = k + task * keys;
  const float* vt = v + task * keys;
  const bool* mt = mask + (n.M == 1 ? 0 : b) * n.T * n.S;
  float* ot = out + task * rows;
  switch (n.D) {
    case 16: return attend_head<16>(qt, kt, vt, mt, ot, n, scale, scores);
    case 32: return attend_head<32>(qt, kt, vt, mt, ot, n, scale, scores);
    case 64: return attend_head<64>(qt, kt, vt, mt, ot, n, scale, scores);
    case 128: return attend_head<128>(qt, kt, vt, mt, ot, n, scale, scores);
    default: return attend_head<0>(qt, kt, vt, mt, ot, n, scale, scores);
  }
}

ffi::Error Attend(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask, float scale,
                  int64_t groups, ffi::ResultBuffer<ffi::F32> out) {
  // k and v come as the cache holds them (any rank: reshaping them here would make XLA copy
  // the cache): their elements are [B, K, S, D] in order, K and B from q.
  const auto qd = q.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || md.size() != 3) {
    return ffi::Error::InvalidArgument("cpu_decode: q must be 4-D and the mask 3-D");
  }
  Shapes n{qd[0], qd[1], qd[2], md[2], qd[3], md[1], groups, md[0]};
  if (k.element_count() != n.B * n.K * n.S * n.D || v.element_count() != k.element_count() ||
      n.T * n.G != n.R || (n.M != 1 && n.M != n.B)) {
    return ffi::Error::InvalidArgument("cpu_decode: inconsistent shapes");
  }
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const int64_t tasks = n.B * n.K;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), tasks));
  if (workers == 1) {
    std::vector<float> scores;
    for (int64_t t = 0; t < tasks; ++t) attend_task(t, qp, kp, vp, mp, op, n, scale, scores);
    return ffi::Error::Success();
  }
  std::atomic<int64_t> next{0};
  std::latch done(workers);
  auto work = [&] {
    std::vector<float> scores;  // [R, S], reused across this worker's tasks
    for (int64_t t = next++; t < tasks; t = next++) attend_task(t, qp, kp, vp, mp, op, n, scale, scores);
    done.count_down();
  };
  for (int64_t w = 1; w < workers; ++w) pool.Schedule([&work] { work(); });
  work();
  done.wait();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MqaCpuDecodeAttend, Attend,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("groups")
                                  .Ret<ffi::Buffer<ffi::F32>>());
