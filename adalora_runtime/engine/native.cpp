// CPU kernels of the lean decode path (float32, AVX2 + FMA), bound to Python with pybind11 (the end of the file).
//
// skinny_linear(x, w, bias) = x @ w.T + bias for the few rows of a decode step. oneDNN and MKL tile for large
// batches; at 1-16 rows a step only has to stream each weight once, and this kernel does that from the weight's
// own row-major layout (no reordered copy): each thread walks its own rows of w in order, prefetching ahead,
// and multiplies each weight row with up to 8 rows of x at once, the partial sums in registers.
//
// bf16_linear(x, w, bias) = x @ float32(w).T + bias over bfloat16 weights (llama.cpp's bf16 GGUF on a CPU without
// bfloat16 arithmetic does the same): half of float32's bytes, each 8 weights widened exactly in registers.
//
// Segments(groups, A[], BT[], offsets[], columns[]) holds one batch's adapters of one input, checked once, and
// segment_lora_add_(y, x, segments) adds each token's own adapter in place, for each part p (several adapted layers
// of one input, as the lean path's fused q/k/v projection has):
//     y[i, c:c + out] += (x[i] @ A[r0:r1].T) @ BT[r0:r1]
// with A, BT, offsets = A[p], BT[p], offsets[p], c = columns[p], out = BT[p].size(1), g = groups[i], r0 =
// offsets[g], r1 = offsets[g + 1] (tokens with g < 0 add nothing). Every group's factors are stacked once
// (A (R, in), BT (R, out)), so a token multiplies only its own ranks, with nothing padded and one call per input.
// Neighbouring tokens of one group (a prefill's prompt; a decode batch of one adapter, where a thread holds several
// of its tokens) run up to 8 at a time, each factor row read once for all of them.
// A part's factors may be bfloat16 (half the bytes; widened exactly, float32 arithmetic). The two linear kernels
// take the same Segments and add them to their output before returning: one call per projection of a decode step,
// where a call's fixed cost (the dispatch and the checks, ~8 us) is as large as its adapters' work.
//
// rms_norm(x, w, eps) and rope_(qk, cos, sin, head_dim): a decode step's RMSNorm and rotary embedding, one call each
// instead of the 6-9 small PyTorch ops (each a dispatch, some an OpenMP region) that transformers' modules run.
// silu_mul(x, I): a Llama MLP's silu(gate) * up from the fused gate/up output, with a vectorized exp.
// decode_attention(q, keys, values, lengths, scale, new_keys, new_values): a decode step's cache write and attention
// (one query per row over its own cached tokens), where PyTorch's CPU flash attention spends ~100 us a call on its
// setup at these sizes and the cache write by index ~30 us a layer.
//
// engine/native.py builds this file with torch.utils.cpp_extension and checks every result against the
// reference (tests/test_engine_native.py).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <pybind11/stl.h>
#include <torch/python.h>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int kRows = 8;  // rows of x per pass over a weight row (8 accumulators, each weight loaded once); also the
                          // longest run of one adapter's tokens that the segment kernel takes at once
constexpr int64_t kPrefetch = 1024;  // floats (4 KiB) ahead of the weights being read, prefetched into L1

// y[m * ldy] = the sum of acc[m]'s lanes + b, for each of the MT rows.
template <int MT>
inline void store_sums(const __m256* acc, float* y, int64_t ldy, float b) {
  if constexpr (MT == 8) {  // the 8 sums in one vector: sum[m] = the lanes of acc[m]
    const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);  // halves of sums 0-3, 4-7
    const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_add_ps(sum, _mm256_set1_ps(b)));
    for (int m = 0; m < 8; ++m) y[m * ldy] = out[m];
  } else {
    for (int m = 0; m < MT; ++m) y[m * ldy] = hsum(acc[m]) + b;
  }
}

// y[m * ldy] = dot(x[m * K : + K], w[0 : K]) (+ *bias) for the MT rows of x against one row of w.
template <int MT>
inline void tile(const float* __restrict x, const float* __restrict w, int64_t K, float* __restrict y, int64_t ldy,
                 const float* __restrict bias) {
  __m256 acc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);  // past the row: the next rows
    const __m256 wv = _mm256_loadu_ps(w + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m]);
  }
  if (k < K) {  // the last K % 8 columns, through a mask (masked lanes are never read)
    alignas(32) int32_t lanes[8];
    for (int i = 0; i < 8; ++i) lanes[i] = k + i < K ? -1 : 0;
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    const __m256 wv = _mm256_maskload_ps(w + k, mask);
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(_mm256_maskload_ps(x + m * K + k, mask), wv, acc[m]);
  }
  store_sums<MT>(acc, y, ldy, bias ? *bias : 0.f);
}

// f.template operator()<R>(m) for the one run of R = rest rows of x from row m (1 <= rest < 8).
template <int R, class F>
inline void last_rows(int64_t rest, int64_t m, F& f) {
  if constexpr (R > 0) {
    if (rest == R) return f.template operator()<R>(m);
    last_rows<R - 1>(rest, m, f);
  }
}

// f.template operator()<R>(m) over the M rows of x in runs of R = 8 from row m, then the last M % 8 rows as one
// run of their own height: every tile kernel's walk down x.
template <class F>
inline void by_rows(int64_t M, F&& f) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) f.template operator()<kRows>(m);
  if (m < M) last_rows<kRows - 1>(M - m, m, f);
}

void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// bias's data, checked to be (N,) float32 on the CPU; nullptr when there is none.
const float* bias_data(const std::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  check_float_cpu(*bias, op, "bias");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(), op, ": bias must be (N,)");
  return bias->data_ptr<float>();
}

// 8 bfloat16 weights at w as float32 (exact: a bfloat16 is the top half of a float32).
inline __m256 widen_bf16(const uint16_t* w) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}

inline float bf16_value(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// y[m * ldy] = dot(x[m * K : + K], float32(w[0 : K])) (+ *bias) for MT rows of x and one bfloat16 row of w.
template <int MT>
inline void tile_bf16(const float* __restrict x, const uint16_t* __restrict w, int64_t K, float* __restrict y,
                      int64_t ldy, const float* __restrict bias) {
  __m256 acc[MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + 2 * kPrefetch), _MM_HINT_T0);  // the same bytes ahead
    const __m256 wv = widen_bf16(w + k);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m]);
  }
  float tail[MT];
  for (int m = 0; m < MT; ++m) tail[m] = 0.f;
  for (; k < K; ++k)
    for (int m = 0; m < MT; ++m) tail[m] += x[m * K + k] * bf16_value(w[k]);
  for (int m = 0; m < MT; ++m) y[m * ldy] = hsum(acc[m]) + tail[m] + (bias ? *bias : 0.f);
}

// 8 factors at p as float32: float32 as is, bfloat16 (stored as uint16_t) widened exactly.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return widen_bf16(p); }
inline float value(float v) { return v; }
inline float value(uint16_t h) { return bf16_value(h); }

// The factor rows a single-token kernel reads after its own: `bytes` bytes from `at` (none: nullptr, 0).
struct Next {
  const char* at = nullptr;
  int64_t bytes = 0;
};

// Prefetches into L1 the 32 factors (one 64-byte line of bfloat16, two of float32) at block + at, where the rows
// four on from the four being read are, at the rate these are read; past the block's `end`, the same distance into
// `next`, the rows the thread reads after these. A token's factors are short streams (a row of bfloat16 A is 1152
// bytes on SmolLM2), which the hardware prefetcher barely starts on; no address outside the two is formed.
template <class T>
inline void prefetch_ahead(const T* block, int64_t at, int64_t end, Next next) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t o = at; o < at + 32; o += line) {
    if (o < end)
      _mm_prefetch(reinterpret_cast<const char*>(block + o), _MM_HINT_T0);
    else if ((o - end) * static_cast<int64_t>(sizeof(T)) < next.bytes)
      _mm_prefetch(next.at + (o - end) * static_cast<int64_t>(sizeof(T)), _MM_HINT_T0);
  }
}

// h[j] = dot(x[0:K], A[j * K : + K]) for j < r: four rows of A at a time against one load of x (four independent
// accumulators, so the sums do not wait on one FMA chain), then the last r % 4 rows one at a time.
template <class T>
inline void dot_rows(const float* __restrict x, const T* __restrict A, int64_t K, int64_t r, float* __restrict h,
                     Next next) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {
    const T* a = A + j * K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      prefetch_ahead(a, 4 * K + 4 * k, (r - j) * K, next);
      const __m256 xv = _mm256_loadu_ps(x + k);
#pragma GCC unroll 4
      for (int t = 0; t < 4; ++t) acc[t] = _mm256_fmadd_ps(xv, load8(a + t * K + k), acc[t]);
    }
    for (int t = 0; t < 4; ++t) {
      float sum = hsum(acc[t]);
      for (int64_t kk = k; kk < K; ++kk) sum += x[kk] * value(a[t * K + kk]);
      h[j + t] = sum;
    }
  }
  for (; j < r; ++j) {
    const T* a = A + j * K;
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(a + k), acc);
    float sum = hsum(acc);
    for (; k < K; ++k) sum += x[k] * value(a[k]);
    h[j] = sum;
  }
}

// y[0:n] += sum over j < r of h[j] * BT[j * n : + n], four rows of BT per pass over y.
template <class T>
inline void add_rows(float* __restrict y, const float* __restrict h, const T* __restrict BT, int64_t r, int64_t n,
                     Next next) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {
    const T* b = BT + j * n;
    const __m256 h0 = _mm256_set1_ps(h[j]), h1 = _mm256_set1_ps(h[j + 1]);
    const __m256 h2 = _mm256_set1_ps(h[j + 2]), h3 = _mm256_set1_ps(h[j + 3]);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      prefetch_ahead(b, 4 * n + 4 * c, (r - j) * n, next);
      __m256 v = _mm256_fmadd_ps(h0, load8(b + c), _mm256_loadu_ps(y + c));
      v = _mm256_fmadd_ps(h1, load8(b + n + c), v);
      v = _mm256_fmadd_ps(h2, load8(b + 2 * n + c), v);
      _mm256_storeu_ps(y + c, _mm256_fmadd_ps(h3, load8(b + 3 * n + c), v));
    }
    for (; c < n; ++c)
      y[c] += h[j] * value(b[c]) + h[j + 1] * value(b[n + c]) + h[j + 2] * value(b[2 * n + c]) +
              h[j + 3] * value(b[3 * n + c]);
  }
  for (; j < r; ++j) {
    const __m256 hv = _mm256_set1_ps(h[j]);
    const T* b = BT + j * n;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(y + c, _mm256_fmadd_ps(hv, load8(b + c), _mm256_loadu_ps(y + c)));
    for (; c < n; ++c) y[c] += h[j] * value(b[c]);
  }
}

// One part's delta for token row x into y: h = x @ A[r0:r0 + r].T, y += h @ BT[r0:r0 + r]; `next`: the A rows
// the thread reads after these (prefetched as the BT rows end).
template <class T>
inline void segment_row(const float* x, const T* A, const T* BT, int64_t in, int64_t out, int64_t r0, int64_t r,
                        float* h, float* y, Next next) {
  const T* bt = BT + r0 * out;
  dot_rows(x, A + r0 * in, in, r, h, {reinterpret_cast<const char*>(bt), r * out * static_cast<int64_t>(sizeof(T))});
  add_rows(y, h, bt, r, out, next);
}

// y[m * ldy : + n] += sum over j < r of h[m * r + j] * BT[j * n : + n] for the MT rows m: each four rows of BT
// loaded once for all MT rows of y, summed over j in add_rows' order. (h itself comes from the tiles, whose sums run
// in another order than dot_rows', so a token's delta can differ in its last bits with the length of its run, as a
// linear kernel's rows do with M.)
template <int MT, class T>
inline void add_rows_to(float* __restrict y, int64_t ldy, const float* __restrict h, const T* __restrict BT,
                        int64_t r, int64_t n) {
  int64_t j = 0;
  for (; j + 4 <= r; j += 4) {
    const T* b = BT + j * n;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      const __m256 b0 = load8(b + c), b1 = load8(b + n + c), b2 = load8(b + 2 * n + c), b3 = load8(b + 3 * n + c);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        const float* hm = h + m * r + j;
        float* ym = y + m * ldy + c;
        __m256 v = _mm256_fmadd_ps(_mm256_set1_ps(hm[0]), b0, _mm256_loadu_ps(ym));
        v = _mm256_fmadd_ps(_mm256_set1_ps(hm[1]), b1, v);
        v = _mm256_fmadd_ps(_mm256_set1_ps(hm[2]), b2, v);
        _mm256_storeu_ps(ym, _mm256_fmadd_ps(_mm256_set1_ps(hm[3]), b3, v));
      }
    }
    for (; c < n; ++c)
      for (int m = 0; m < MT; ++m) {
        const float* hm = h + m * r + j;
        y[m * ldy + c] += hm[0] * value(b[c]) + hm[1] * value(b[n + c]) + hm[2] * value(b[2 * n + c]) +
                          hm[3] * value(b[3 * n + c]);
      }
  }
  for (; j < r; ++j) {
    const T* b = BT + j * n;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
      const __m256 bv = load8(b + c);
      for (int m = 0; m < MT; ++m) {
        float* ym = y + m * ldy + c;
        _mm256_storeu_ps(ym, _mm256_fmadd_ps(_mm256_set1_ps(h[m * r + j]), bv, _mm256_loadu_ps(ym)));
      }
    }
    for (; c < n; ++c)
      for (int m = 0; m < MT; ++m) y[m * ldy + c] += h[m * r + j] * value(b[c]);
  }
}

// h[j * ldh] = dot(x[m], factor row j) for the MT rows m of x, one factor row of either dtype (the linear
// kernels' tiles: each factor loaded once for all MT rows).
template <int MT>
inline void factor_tile(const float* x, const float* a, int64_t K, float* h, int64_t ldh) {
  tile<MT>(x, a, K, h, ldh, nullptr);
}
template <int MT>
inline void factor_tile(const float* x, const uint16_t* a, int64_t K, float* h, int64_t ldh) {
  tile_bf16<MT>(x, a, K, h, ldh, nullptr);
}

// One part's delta for MT token rows of one group (x's rows `in` apart, y's `ldy`): h (MT, r) = x @ A[r0:r0 + r].T,
// each row of A loaded once for all MT rows, then y += h @ BT[r0:r0 + r].
template <int MT, class T>
inline void segment_rows(const float* x, const T* A, const T* BT, int64_t in, int64_t out, int64_t r0, int64_t r,
                         float* h, float* y, int64_t ldy) {
  for (int64_t j = 0; j < r; ++j) factor_tile<MT>(x, A + (r0 + j) * in, in, h + j, r);
  add_rows_to<MT>(y, ldy, h, BT + r0 * out, r, out);
}

// One batch's adapters of one input (the file's header): checked once when built, so that each call checks only
// its x and y against them. Holds its tensors, so the factors it points into live as long as it does.
struct Segments {
  struct Part {
    const void* a;
    const void* b;
    bool bf16;  // the factors' dtype: float32, or bfloat16 widened in the kernel
    const int64_t* off;
    int64_t out, column;
  };
  std::vector<at::Tensor> held;  // groups, then each part's A, BT and offsets
  std::vector<Part> parts;
  const int64_t* groups = nullptr;
  int64_t tokens = 0, in = -1, width = 0, max_rank = 0;

  Segments(at::Tensor groups_, std::vector<at::Tensor> A, std::vector<at::Tensor> BT,
           std::vector<at::Tensor> offsets, std::vector<int64_t> columns) {
    const char* op = "Segments";
    TORCH_CHECK(groups_.device().is_cpu() && groups_.scalar_type() == at::kLong && groups_.is_contiguous() &&
                groups_.dim() == 1, op, ": groups must be a contiguous (N,) long CPU tensor");
    const size_t P = A.size();
    TORCH_CHECK(P >= 1 && BT.size() == P && offsets.size() == P && columns.size() == P, op,
                ": A, BT, offsets and columns must have one entry per part, at least one");
    held.push_back(groups_.clone());  // a copy: a later in-place edit of the caller's cannot skip the checks below
    groups = held.back().data_ptr<int64_t>();
    tokens = groups_.numel();
    for (size_t p = 0; p < P; ++p) {
      const bool bf16 = A[p].scalar_type() == at::kBFloat16;
      TORCH_CHECK(A[p].device().is_cpu() && BT[p].device().is_cpu() && BT[p].scalar_type() == A[p].scalar_type() &&
                  (bf16 || A[p].scalar_type() == at::kFloat), op,
                  ": A and BT must be CPU tensors, both float32 or both bfloat16, got ", A[p].scalar_type(), " and ",
                  BT[p].scalar_type());
      TORCH_CHECK(A[p].dim() == 2 && A[p].is_contiguous() && (p == 0 || A[p].size(1) == in), op,
                  ": A must be a contiguous (R, in), one in for every part");
      in = A[p].size(1);
      TORCH_CHECK(BT[p].dim() == 2 && BT[p].is_contiguous() && BT[p].size(0) == A[p].size(0), op,
                  ": BT must be a contiguous (R, out)");
      TORCH_CHECK(columns[p] >= 0 && columns[p] <= std::numeric_limits<int64_t>::max() - BT[p].size(1), op,
                  ": part ", p, "'s first column ", columns[p], " is negative or past any width");
      const at::Tensor o = offsets[p].clone();  // a copy, as groups
      TORCH_CHECK(o.device().is_cpu() && o.scalar_type() == at::kLong && o.is_contiguous() && o.dim() == 1 &&
                  o.numel() >= 1, op, ": offsets must be a contiguous (G + 1,) long CPU tensor");
      const int64_t G = o.numel() - 1, R = A[p].size(0);
      const int64_t* off = o.data_ptr<int64_t>();
      for (int64_t g = 0; g < G; ++g) {
        TORCH_CHECK(0 <= off[g] && off[g] <= off[g + 1] && off[g + 1] <= R, op, ": offsets must rise within [0, R]");
        max_rank = std::max(max_rank, off[g + 1] - off[g]);
      }
      for (int64_t i = 0; i < tokens; ++i)
        TORCH_CHECK(groups[i] < G, op, ": group ", groups[i], " of token ", i, " >= G = ", G);
      held.insert(held.end(), {A[p], BT[p], o});
      parts.push_back({A[p].data_ptr(), BT[p].data_ptr(), bf16, off, BT[p].size(1), columns[p]});
      width = std::max(width, columns[p] + BT[p].size(1));
    }
  }

  // x (N, in) and y (N, >= width) fit these segments, and y's rows can be written by threads apart.
  void check(const at::Tensor& y, const at::Tensor& x, const char* op) const {
    check_float_cpu(x, op, "x");
    check_float_cpu(y, op, "y");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) == tokens && x.size(1) == in, op,
                ": x must be a contiguous (", tokens, ", ", in, ") tensor for these segments, got ", x.sizes());
    TORCH_CHECK(y.dim() == 2 && y.size(0) == tokens && y.stride(1) == 1, op,
                ": y must be (N, out) with unit column stride, got ", y.sizes(), " strides ", y.strides());
    TORCH_CHECK(width <= y.size(1), op, ": the parts' columns end at ", width, ", past y's ", y.size(1));
    at::assert_no_internal_overlap(y);  // rows that share memory would race between threads
    at::assert_no_partial_overlap(y, x);
  }

  // y[i] += token i's delta for every part, x and y checked first.
  void add_to(const at::Tensor& y, const at::Tensor& x, const char* op) const {
    check(y, x, op);
    add(y.data_ptr<float>(), y.stride(0), x.data_ptr<float>());
  }

  // f(i, e, g) for each run [i, e) of up to kRows neighbouring tokens of one group g >= 0 within [i0, i1): a
  // prefill's prompt, or a decode step's rows of one adapter, whose factors are read once per run.
  template <class F>
  void runs(int64_t i0, int64_t i1, F&& f) const {
    for (int64_t i = i0, e; i < i1; i = e) {
      const int64_t g = groups[i];
      for (e = i + 1; e < i1 && e - i < kRows && groups[e] == g;) ++e;
      if (g >= 0) f(i, e, g);
    }
  }

  // Group g's A rows of a part (Next's form: what a single-token kernel prefetches before it reads them).
  Next a_rows(const Part& part, int64_t g) const {
    const int64_t size = part.bf16 ? 2 : 4, r0 = part.off[g];
    return {static_cast<const char*>(part.a) + r0 * in * size, (part.off[g + 1] - r0) * in * size};
  }

  // One part's delta for a run of M (1 <= M <= kRows) tokens of one group; `next`: the A rows read after it.
  template <class T>
  void add_run(int64_t M, const float* x, const T* A, const T* BT, int64_t out, int64_t r0, int64_t r, float* h,
               float* y, int64_t ldy, Next next) const {
    if (M == 1) return segment_row(x, A, BT, in, out, r0, r, h, y, next);
    by_rows(M, [&]<int R>(int64_t m) {
      segment_rows<R>(x + m * in, A, BT, in, out, r0, r, h, y + m * ldy, ldy);
    });
  }

  // y[i] += token i's delta for every part (after check(y, x)).
  void add(float* y, int64_t ldy, const float* x) const {
    // one token is enough work to split on (r * (in + out) FMAs over its own factors): a decode step's few tokens
    // run on every thread, each thread reading only its tokens' adapters, run by run (a run of one token takes the
    // single-row kernels; with as many threads as tokens, every run is one token)
    at::parallel_for(0, tokens, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> h(kRows * max_rank);
      runs(i0, i1, [&](int64_t i, int64_t e, int64_t g) {
        int64_t after = e;  // the thread's next adapted token: its first part's A rows follow this run's last part
        while (after < i1 && groups[after] < 0) ++after;
        for (size_t p = 0; p < parts.size(); ++p) {
          const Part& part = parts[p];
          const int64_t r0 = part.off[g], r = part.off[g + 1] - r0;
          const Next next = p + 1 < parts.size() ? a_rows(parts[p + 1], g)
                                                 : after < i1 ? a_rows(parts[0], groups[after]) : Next{};
          float* yi = y + i * ldy + part.column;
          if (part.bf16)
            add_run(e - i, x + i * in, static_cast<const uint16_t*>(part.a), static_cast<const uint16_t*>(part.b),
                    part.out, r0, r, h.data(), yi, ldy, next);
          else
            add_run(e - i, x + i * in, static_cast<const float*>(part.a), static_cast<const float*>(part.b),
                    part.out, r0, r, h.data(), yi, ldy, next);
        }
      });
    });
  }
};

using Lora = const Segments*;  // none: nullptr

// tile.template operator()<R>(m, n, bias of row n or nullptr) for every row n of a weight (N rows) against the M
// rows of x in runs of R (by_rows): the walk of both linear kernels. Threads split the weight's rows, so each weight
// row is read from memory once (M <= 8) and streams sequentially.
template <class Tile>
void over_weight_rows(int64_t M, int64_t N, const float* bias, Tile&& tile) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float* bn = bias ? bias + n : nullptr;
      by_rows(M, [&]<int R>(int64_t m) { tile.template operator()<R>(m, n, bn); });
    }
  });
}

void segment_lora_add_(at::Tensor y, const at::Tensor& x, const Segments& segments) {
  RECORD_FUNCTION("adalora_native::segment_lora_add_", c10::ArrayRef<const c10::IValue>{});
  segments.add_to(y, x, "segment_lora_add_");
}

// A linear kernel's output y (M, N) plus its adapters, when it has any (`lora` of the two kernels below).
at::Tensor with_lora(at::Tensor y, const at::Tensor& x, Lora lora, const char* op) {
  if (lora != nullptr) lora->add_to(y, x, op);
  return y;
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         Lora lora) {
  RECORD_FUNCTION("adalora_native::skinny_linear", c10::ArrayRef<const c10::IValue>{});
  check_float_cpu(x, "skinny_linear", "x");
  check_float_cpu(w, "skinny_linear", "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "skinny_linear: x (M, K) and w (N, K), got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), "skinny_linear: w must be contiguous");
  const at::Tensor xc = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* b = bias_data(bias, N, "skinny_linear");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_weight_rows(M, N, b, [&]<int R>(int64_t m, int64_t n, const float* bn) {
    tile<R>(xp + m * K, wp + n * K, K, yp + m * N + n, N, bn);
  });
  return with_lora(y, xc, lora, "skinny_linear");
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       Lora lora) {
  RECORD_FUNCTION("adalora_native::bf16_linear", c10::ArrayRef<const c10::IValue>{});
  const char* op = "bf16_linear";
  check_float_cpu(x, op, "x");
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(), op,
              ": w must be a contiguous (N, K) bfloat16 CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), op, ": x (M, K) and w (N, K), got ", x.sizes(), " and ",
              w.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* b = bias_data(bias, N, op);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  over_weight_rows(M, N, b, [&]<int R>(int64_t m, int64_t n, const float* bn) {
    tile_bf16<R>(xp + m * K, wp + n * K, K, yp + m * N + n, N, bn);
  });
  return with_lora(y, xc, lora, op);
}

// y[m] = x[m] * rsqrt(mean(x[m]^2) + eps) * w for each row m of x (M, H): the RMSNorm of Llama-family models, in
// the order of transformers' LlamaRMSNorm (normalize, then scale). Rows are independent: split across threads.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  RECORD_FUNCTION("adalora_native::rms_norm", c10::ArrayRef<const c10::IValue>{});
  const char* op = "rms_norm";
  check_float_cpu(x, op, "x");
  check_float_cpu(w, op, "w");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": x must be (M, H) with unit column stride, got ", x.sizes());
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(), op, ": w must be a contiguous (H,)");
  const int64_t M = x.size(0), H = x.size(1), ldx = x.stride(0);
  at::Tensor y = at::empty({M, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = xp + m * ldx;
      float* yr = yp + m * H;
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= H; k += 8) {
        const __m256 v = _mm256_loadu_ps(xr + k);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float sum = hsum(acc);
      for (; k < H; ++k) sum += xr[k] * xr[k];
      const float r = 1.f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps));
      for (int64_t c = 0; c < H; ++c) yr[c] = wp[c] * (xr[c] * r);
    }
  });
  return y;
}

// In place, for each token t and each head h of qk (T, heads * D) (rows any stride apart): the rotary embedding
// x * cos[t] + rotate_half(x) * sin[t] of x = qk[t, h * D : + D], rotate_half(x) = (-x[D/2:], x[:D/2]), with
// cos, sin (T, D): transformers' apply_rotary_pos_emb.
void rope_(at::Tensor qk, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  RECORD_FUNCTION("adalora_native::rope_", c10::ArrayRef<const c10::IValue>{});
  const char* op = "rope_";
  check_float_cpu(qk, op, "qk");
  check_float_cpu(cos, op, "cos");
  check_float_cpu(sin, op, "sin");
  const int64_t D = head_dim, T = qk.size(0);
  TORCH_CHECK(D > 0 && D % 2 == 0, op, ": head_dim must be even and positive, got ", D);
  TORCH_CHECK(qk.dim() == 2 && qk.stride(1) == 1 && qk.size(1) % D == 0, op,
              ": qk must be (T, heads * head_dim) with unit column stride, got ", qk.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.sizes() == cos.sizes() && sin.is_contiguous() &&
              cos.size(0) == T && cos.size(1) == D, op, ": cos and sin must be contiguous (T, head_dim)");
  at::assert_no_internal_overlap(qk);
  const int64_t heads = qk.size(1) / D, half = D / 2, ld = qk.stride(0);
  float* qp = qk.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      for (int64_t h = 0; h < heads; ++h) {
        float* x = qp + t * ld + h * D;
        for (int64_t j = 0; j < half; ++j) {
          const float a = x[j], b = x[j + half];
          x[j] = a * c[j] + (-b) * s[j];
          x[j + half] = b * c[j + half] + a * s[j + half];
        }
      }
    }
  });
}

// exp(x) for 8 floats, within ~2 ulp of the correctly rounded value: Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2,
// a degree-6 polynomial for exp(r), times 2^n built in the exponent bits); x is clamped to [-87.3, 88.376] first,
// where n stays within [-126, 127] and so 2^n a normal float (an underflowing exp only ever meets 1 + exp(-x)).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3762626647949f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: x - n ln 2 exactly
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// y[m] = silu(x[m, :I]) * x[m, I:2I] with silu(g) = g / (1 + exp(-g)) (transformers' SiLU gate of a Llama MLP), for
// x (M, 2I) with unit column stride -> (M, I) contiguous: one call instead of a split and two ops over the rows.
at::Tensor silu_mul(const at::Tensor& x, int64_t I) {
  RECORD_FUNCTION("adalora_native::silu_mul", c10::ArrayRef<const c10::IValue>{});
  const char* op = "silu_mul";
  check_float_cpu(x, op, "x");
  TORCH_CHECK(I > 0 && x.dim() == 2 && x.size(1) == 2 * I && x.stride(1) == 1, op,
              ": x must be (M, 2 * I) with unit column stride for I = ", I, ", got ", x.sizes());
  const int64_t M = x.size(0), ldx = x.stride(0);
  at::Tensor y = at::empty({M, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // a decode step's few rows run inline (a few us of work, less than a thread's fork and join); a prefill's split
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* g = xp + m * ldx;
      const float* u = g + I;
      float* out = yp + m * I;
      int64_t k = 0;
      for (; k + 8 <= I; k += 8) {
        const __m256 gv = _mm256_loadu_ps(g + k);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
        _mm256_storeu_ps(out + k, _mm256_mul_ps(silu, _mm256_loadu_ps(u + k)));
      }
      for (; k < I; ++k) out[k] = g[k] / (1.f + std::exp(-g[k])) * u[k];
    }
  });
  return y;
}

// out[b, h] = softmax(q[b, h] . keys[b, g, j] * scale over j < lengths[b]) @ values[b, g, :lengths[b]] with
// g = h / (H / Hkv) (grouped-query heads): a decode step's attention, one query token per row over that row's own
// cached tokens. q (B, H, D), keys and values (>= B, Hkv, W, D) with unit stride on D (the cache's rows of one
// layer), lengths (B,) long in [1, W]. Given new_keys and new_values (B, Hkv, D), each row's new token is first
// written to its column lengths[b] - 1 (the step's cache write, in the same call). Each (row, head) is
// independent: split across threads, each with one buffer of scores.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& lengths, double scale, const std::optional<at::Tensor>& new_keys,
                            const std::optional<at::Tensor>& new_values) {
  RECORD_FUNCTION("adalora_native::decode_attention", c10::ArrayRef<const c10::IValue>{});
  const char* op = "decode_attention";
  check_float_cpu(q, op, "q");
  check_float_cpu(keys, op, "keys");
  check_float_cpu(values, op, "values");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, op, ": q must be (B, H, D) with unit stride on D, got ", q.sizes());
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes() && keys.stride(3) == 1 && values.stride(3) == 1, op,
              ": keys and values must be (B, Hkv, W, D) alike, with unit stride on D");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = keys.size(1), W = keys.size(2);
  TORCH_CHECK(keys.size(0) >= B && keys.size(3) == D && Hkv > 0 && H % Hkv == 0, op, ": q ", q.sizes(),
              " does not match keys ", keys.sizes(), " (rows, head_dim, or heads a multiple of kv heads)");
  TORCH_CHECK(lengths.device().is_cpu() && lengths.scalar_type() == at::kLong && lengths.dim() == 1 &&
              lengths.numel() == B && lengths.is_contiguous(), op, ": lengths must be a contiguous (B,) long CPU tensor");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(1 <= len[b] && len[b] <= W, op, ": length ", len[b], " of row ", b, " is outside [1, ", W, "]");
  TORCH_CHECK(new_keys.has_value() == new_values.has_value(), op, ": give both new_keys and new_values, or neither");
  if (new_keys.has_value()) {
    const at::Tensor& nk = *new_keys;
    const at::Tensor& nv = *new_values;
    check_float_cpu(nk, op, "new_keys");
    check_float_cpu(nv, op, "new_values");
    TORCH_CHECK(nk.dim() == 3 && nk.size(0) == B && nk.size(1) == Hkv && nk.size(2) == D && nk.stride(2) == 1 &&
                nv.sizes() == nk.sizes() && nv.stride(2) == 1, op, ": new_keys and new_values must be (", B, ", ",
                Hkv, ", ", D, ") with unit stride on D, got ", nk.sizes(), " and ", nv.sizes());
    at::assert_no_internal_overlap(keys);  // rows or columns that share memory would take several writes
    at::assert_no_internal_overlap(values);
    for (const at::Tensor* cache : {&keys, &values}) {
      at::assert_no_partial_overlap(*cache, nk);
      at::assert_no_partial_overlap(*cache, nv);
    }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t column = len[b] - 1;
        std::memcpy(keys.data_ptr<float>() + b * keys.stride(0) + g * keys.stride(1) + column * keys.stride(2),
                    nk.data_ptr<float>() + b * nk.stride(0) + g * nk.stride(1), D * sizeof(float));
        std::memcpy(values.data_ptr<float>() + b * values.stride(0) + g * values.stride(1) + column * values.stride(2),
                    nv.data_ptr<float>() + b * nv.stride(0) + g * nv.stride(1), D * sizeof(float));
      }
  }
  at::Tensor out = at::empty({B, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const float* vp = values.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const int64_t group = H / Hkv;
  const int64_t qb = q.stride(0), qh = q.stride(1);
  const int64_t kb = keys.stride(0), kh = keys.stride(1), kw = keys.stride(2);
  const int64_t vb = values.stride(0), vh = values.stride(1), vw = values.stride(2);
  const float s = static_cast<float>(scale);
  at::parallel_for(0, B * H, 8, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(*std::max_element(len, len + B));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / group, n = len[b];
      const float* qv = qp + b * qb + h * qh;
      const float* k = kp + b * kb + g * kh;
      const float* v = vp + b * vb + g * vh;
      float top = -INFINITY;
      for (int64_t j = 0; j < n; ++j) {
        const float* kj = k + j * kw;
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), _mm256_loadu_ps(kj + d), acc);
        float dot = hsum(acc);
        for (; d < D; ++d) dot += qv[d] * kj[d];
        p[j] = dot * s;
        top = std::max(top, p[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        p[j] = std::exp(p[j] - top);
        total += p[j];
      }
      float* o = op_ + i * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t j = 0; j < n; ++j) {
        const float w = p[j] / total;
        const float* vj = v + j * vw;
        for (int64_t d = 0; d < D; ++d) o[d] += w * vj[d];
      }
    }
  });
  return out;
}

}  // namespace

// Python bindings (pybind11, not torch.ops: a decode step makes ~400 of these calls, and a torch.ops call costs
// ~2 us more than a pybind11 one). The GIL is released where a call does a step's real work, so the server's other
// threads run meanwhile; the names stay in the profiler through RECORD_FUNCTION.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<Segments>(m, "Segments")
      .def(py::init<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<int64_t>>(), py::arg("groups"), py::arg("A"), py::arg("BT"), py::arg("offsets"),
           py::arg("columns"));
  m.def("skinny_linear", &skinny_linear, release(), py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("lora") = nullptr);
  m.def("bf16_linear", &bf16_linear, release(), py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("lora") = nullptr);
  m.def("segment_lora_add_", &segment_lora_add_, release(), py::arg("y"), py::arg("x"), py::arg("segments"));
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("w"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, py::arg("x"), py::arg("intermediate"));
  m.def("rope_", &rope_, py::arg("qk"), py::arg("cos"), py::arg("sin"), py::arg("head_dim"));
  m.def("decode_attention", &decode_attention, release(), py::arg("q"), py::arg("keys"), py::arg("values"),
        py::arg("lengths"), py::arg("scale"), py::arg("new_keys") = py::none(), py::arg("new_values") = py::none());
}
