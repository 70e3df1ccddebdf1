// The small float32 ops of a decode step (Llama and GLM), each one call instead of several torch ops (a one-token step
// spends more time dispatching ops on tensors of a few hundred floats than computing them):
//   rms_norm            x * rsqrt(mean(x^2) + eps) * w
//   silu_mul            silu(gate) * up, from the fused gate/up output
//   rope_store_attend   rotary on q and k, k and v into the paged pool, each query head over its row's blocks
// AVX2 + FMA (every CPU the matmul kernels run on), with a polynomial exp (Cephes' expf: relative error ~1e-7).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#define AVX2 __attribute__((target("avx2,fma")))

namespace {

AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats, x clamped to [-87.3, 88.3] (Cephes expf: x = n ln2 + r, exp(r) by a polynomial).
AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

AVX2 float dot(const float* a, const float* b, int64_t n) {  // n % 8 == 0
  __m256 s = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
  return hsum(s);
}

AVX2 void rms_norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  const float scale = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s), _mm256_loadu_ps(w + i)));
}

AVX2 void silu_mul_row(const float* gate, const float* up, int64_t n, float* y) {
  const __m256 one = _mm256_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 sigmoid = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
  }
}

// Rotary. `pairs` 0: the halves layout over all d dims (Llama): out = x * cos + concat(-x2, x1) * sin, cos and
// sin [d]. `pairs` > 0: interleaved pairs (x[2i], x[2i+1]) over the first 2 * pairs dims, the rest passed through
// (GLM), cos and sin [2 * pairs] with entries 2i and 2i+1 equal.
AVX2 void rotate(const float* x, const float* cos, const float* sin, int64_t d, int64_t pairs, float* out) {
  if (pairs > 0) {
    for (int64_t i = 0; i < pairs; ++i) {
      const float a = x[2 * i], b = x[2 * i + 1];
      out[2 * i] = a * cos[2 * i] - b * sin[2 * i];
      out[2 * i + 1] = b * cos[2 * i + 1] + a * sin[2 * i + 1];
    }
    std::copy(x + 2 * pairs, x + d, out + 2 * pairs);
    return;
  }
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; i += 8) {
    const __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
    _mm256_storeu_ps(out + i,
                     _mm256_fnmadd_ps(x2, _mm256_loadu_ps(sin + i), _mm256_mul_ps(x1, _mm256_loadu_ps(cos + i))));
    _mm256_storeu_ps(out + half + i, _mm256_fmadd_ps(x1, _mm256_loadu_ps(sin + half + i),
                                                     _mm256_mul_ps(x2, _mm256_loadu_ps(cos + half + i))));
  }
}

// Query heads q [group, d] against the first `length` positions of a row's blocks: position t is at offset
// t % bs of block `blocks[t / bs]`, whose keys start at keys + blocks[..] * block_stride (values likewise) with
// rows of d floats -> out [group, d].
AVX2 void attend_group(const float* q, int64_t group, const float* keys, const float* values, const int64_t* blocks,
                       int64_t block_stride, int64_t bs, int64_t length, int64_t d, float scale, float* scores,
                       float* out) {
  for (int64_t g = 0; g < group; ++g) {
    const float* qg = q + g * d;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t start = 0, b = 0; start < length; start += bs, ++b) {
      const float* kb = keys + blocks[b] * block_stride;
      const int64_t n = std::min(bs, length - start);
      for (int64_t t = 0; t < n; ++t) {
        scores[start + t] = dot(qg, kb + t * d, d) * scale;
        top = std::max(top, scores[start + t]);
      }
    }
    __m256 total = _mm256_setzero_ps();
    int64_t t = 0;
    for (; t + 8 <= length; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + t), _mm256_set1_ps(top)));
      _mm256_storeu_ps(scores + t, e);
      total = _mm256_add_ps(total, e);
    }
    float sum = hsum(total);
    for (; t < length; ++t) {
      scores[t] = std::exp(scores[t] - top);
      sum += scores[t];
    }
    float* o = out + g * d;
    for (int64_t i = 0; i < d; i += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t start = 0, b = 0; start < length; start += bs, ++b) {
        const float* vb = values + blocks[b] * block_stride + i;
        const int64_t n = std::min(bs, length - start);
        for (int64_t s = 0; s < n; ++s)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[start + s]), _mm256_loadu_ps(vb + s * d), acc);
      }
      _mm256_storeu_ps(o + i, _mm256_mul_ps(acc, _mm256_set1_ps(1.f / sum)));
    }
  }
}

void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.device().is_cpu() && t.is_contiguous(), name,
              " must be contiguous float32 on the CPU");
}

}  // namespace

// x [R, C] -> [R, C]; C % 8 == 0.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_float(x, "x");
  check_float(weight, "weight");
  const int64_t cols = x.size(-1), rows = x.numel() / cols;
  TORCH_CHECK(cols % 8 == 0 && weight.numel() == cols, "rms_norm: width ", cols);
  auto y = torch::empty_like(x);
  const float *in = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(in + r * cols, w, static_cast<float>(eps), cols, out + r * cols);
  return y;
}

// gate_up [R, 2F] (gate then up) -> silu(gate) * up [R, F]; F % 8 == 0.
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  check_float(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  TORCH_CHECK(width % 8 == 0, "silu_mul: width ", width);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = width;
  auto y = torch::empty(sizes, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* out = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r)
    silu_mul_row(in + r * 2 * width, in + r * 2 * width + width, width, out + r * width);
  return y;
}

// One-token rows' attention in one layer, after its qkv matmul, over the paged KV pool. Rows may be tokens of one
// sequence (the same table, successive positions): each sees the keys the rows before it wrote in this call.
//   qkv [B, (H + 2 Hkv) D]; cos, sin [B, D] (at each row's position; [B, R] for `pairs` = R / 2 > 0, see
//   `rotate`); cache [2, NB, Hkv, BS, D] (this layer's keys and values, contiguous); tables [B, M] int64 (each
//   row's block table, padded with any valid block); positions [B] int64.
// Each row's k and v go to its position (block tables[b][p / BS], offset p % BS), all rows' first; then each
// query head attends to positions 0..position of its row. Returns [B, H D]. D % 16 == 0.
torch::Tensor rope_store_attend(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                                torch::Tensor& cache, const torch::Tensor& tables, const torch::Tensor& positions,
                                int64_t heads, double scale, int64_t pairs) {
  check_float(qkv, "qkv");
  check_float(cos, "cos");
  check_float(sin, "sin");
  check_float(cache, "cache");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2, "cache must be [2, NB, Hkv, BS, D]");
  const int64_t blocks = cache.size(1), kv_heads = cache.size(2), bs = cache.size(3), d = cache.size(4);
  const int64_t rows = qkv.size(0);
  TORCH_CHECK(d % 16 == 0 && heads % kv_heads == 0 && qkv.size(1) == (heads + 2 * kv_heads) * d,
              "rope_store_attend: qkv width ", qkv.size(1), " for ", heads, " heads of ", d);
  const int64_t table = pairs > 0 ? 2 * pairs : d;  // cos/sin entries per row
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == rows && positions.numel() == rows && cos.size(0) == rows &&
                  cos.size(1) == table && sin.sizes() == cos.sizes() && table <= d,
              "rope_store_attend: one block table, position and cos/sin row (", table, " entries) per row");
  auto table_ids = tables.to(torch::kLong).contiguous();
  auto position = positions.to(torch::kLong).contiguous();
  const int64_t* tb = table_ids.data_ptr<int64_t>();
  const int64_t* pos = position.data_ptr<int64_t>();
  const int64_t width_blocks = tables.size(1);
  int64_t longest = 0;
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(pos[b] >= 0 && pos[b] < width_blocks * bs, "position out of its block table");
    for (int64_t m = 0; m <= pos[b] / bs; ++m)
      TORCH_CHECK(tb[b * width_blocks + m] >= 0 && tb[b * width_blocks + m] < blocks, "block out of range");
    longest = std::max(longest, pos[b] + 1);
  }
  auto y = torch::empty({rows, heads * d}, qkv.options());
  const int64_t group = heads / kv_heads, width = qkv.size(1);
  const int64_t block_stride = kv_heads * bs * d;  // one block of one head to the next block
  const int64_t plane = blocks * block_stride;  // keys to values
  const float *in = qkv.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  float *kv = cache.data_ptr<float>(), *out = y.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // First every row's key and value go to their positions, then every row attends: rows may be tokens of one
  // sequence's prompt chunk, each seeing the keys of the tokens before it. One task per (row, kv head).
  at::parallel_for(0, rows * kv_heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const float* row = in + b * width;
      float* keys = kv + h * bs * d;  // head h of block 0; block k at + k * block_stride
      const int64_t at = tb[b * width_blocks + pos[b] / bs] * block_stride + (pos[b] % bs) * d;
      rotate(row + (heads + h) * d, c + b * table, s + b * table, d, pairs, keys + at);
      std::copy(row + (heads + kv_heads + h) * d, row + (heads + kv_heads + h + 1) * d, keys + plane + at);
    }
  });
  const int64_t grain = std::max<int64_t>(1, 16384 / (longest * group * d / 8 + 1));
  at::parallel_for(0, rows * kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest), q(group * d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const float* row = in + b * width;
      const float* keys = kv + h * bs * d;
      const float *cb = c + b * table, *sb = s + b * table;
      for (int64_t g = 0; g < group; ++g) rotate(row + (h * group + g) * d, cb, sb, d, pairs, q.data() + g * d);
      attend_group(q.data(), group, keys, keys + plane, tb + b * width_blocks, block_stride, bs, pos[b] + 1, d, sc,
                   scores.data(), out + b * heads * d + h * group * d);
    }
  });
  return y;
}

void register_decode_ops(pybind11::module& m) {
  m.def("rms_norm", &rms_norm);
  m.def("silu_mul", &silu_mul);
  m.def("rope_store_attend", &rope_store_attend);
}
