// Weight-only 4-bit and 8-bit matmuls for the few rows of a decode step, much as llama.cpp does them: each row of
// the input is quantized per group of 32 inputs (to two int8 parts, about 16 bits: see `quantize_rows`), and the
// weights are multiplied as integers (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`), then scaled per group in
// float32. Torch's own int4 CPU kernel widens every weight to float instead; this is 1.5-2x faster at one row.
//
// Weights are laid out for the kernels (`pack_q4`, `pack_q8`): blocks of 16 output rows, one 32-bit lane of a
// 512-bit vector each, so that a block's 16 outputs accumulate in one register with no horizontal sums.
//   q4: bytes [N/16, K/8, 64]: byte 4r+j of chunk c holds row r's input 8c+j (low nibble) and 8c+4+j (high);
//       scales [N/16, K/32, 2, 16] float16: d and m of W = d*q + m (q in 0..15) per 32 inputs, row r in lane r.
//   q8: bytes [N/16, K/4, 64]: byte 4r+j of chunk c is row r's input 4c+j (int8, -127..127);
//       scales [N/16, K/32, 16] float16: W = d*q.
// Shapes: M input rows, K inputs, N outputs; K % 32 == 0 and N % 16 == 0 (the Python side checks).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kRows = 16;   // output rows per block
constexpr int64_t kGroup = 32;  // inputs per scale group (and per activation scale)
constexpr int64_t kTile = 4;    // input rows computed together (each weight chunk is unpacked once per tile)
// Bytes ahead the weight stream is prefetched (16 chunks): 164 against 194 ms for ChatGLM2-6B's int4 matmuls at
// one row, 2-core Xeon.
constexpr int64_t kPrefetch = 1024;

// Each input row is quantized per group of 32 to two int8 parts, x ~ d (q + r / 256) with d = max|x| / 127,
// q = round(x / d) and r = round(256 (x / d - q)): about 16 bits, so the rounding of the inputs costs nothing
// measurable (one int8 part, as llama.cpp's Q8_1, put SmolLM2's perplexity up 1 % and tipped its answer to "What is
// the capital of France?" off Paris when prompts ran on these kernels). Each weight chunk is unpacked once and
// multiplied with both parts. For 4-bit weights W = d_w q_w + m (q_w in 0..15) the dot product is taken centred,
// W = d_w (q_w - 8) + z with z = m + 8 d_w:
//   sum(W x) ~ d_w d (sum(q_w q) + sum(q_w r) / 256 - c) + z s,   c = 8 (sum(q) + sum(r) / 256), s = sum(x),
// every integer sum exact, and the group's offset z meets the inputs' exact float sum.
struct Activations {
  torch::Tensor q;  // int8 [M, K]
  torch::Tensor r;  // int8 [M, K]: the remainder, in 256ths of q's step
  torch::Tensor d;  // float [M, K/32]
  torch::Tensor s;  // float [M, K/32]: sum(x)
  torch::Tensor c;  // float [M, K/32]: 8 (sum(q) + sum(r) / 256), exact
};

Activations quantize_rows(const torch::Tensor& x) {
  const int64_t rows = x.size(0), k = x.size(1), groups = k / kGroup;
  const auto options = torch::TensorOptions().dtype(torch::kFloat);
  Activations a{torch::empty({rows, k}, torch::kInt8), torch::empty({rows, k}, torch::kInt8),
                torch::empty({rows, groups}, options), torch::empty({rows, groups}, options),
                torch::empty({rows, groups}, options)};
  const float* src = x.data_ptr<float>();
  int8_t *q = a.q.data_ptr<int8_t>(), *r = a.r.data_ptr<int8_t>();
  float *d = a.d.data_ptr<float>(), *s = a.s.data_ptr<float>(), *c = a.c.data_ptr<float>();
  for (int64_t g = 0; g < rows * groups; ++g) {
    const float* in = src + g * kGroup;
    float top = 0.f, sum = 0.f;
    for (int i = 0; i < kGroup; ++i) {
      top = std::max(top, std::fabs(in[i]));
      sum += in[i];
    }
    const float inverse = top > 0.f ? 127.f / top : 0.f;
    int whole = 0, part = 0;
    for (int i = 0; i < kGroup; ++i) {
      const float scaled = in[i] * inverse;
      const float rounded = std::nearbyint(scaled);
      const int rest = static_cast<int>(std::nearbyint((scaled - rounded) * 256.f));
      q[g * kGroup + i] = static_cast<int8_t>(rounded);
      r[g * kGroup + i] = static_cast<int8_t>(std::min(127, std::max(-127, rest)));
      whole += static_cast<int>(rounded);
      part += r[g * kGroup + i];
    }
    d[g] = top / 127.f;
    s[g] = sum;
    c[g] = 8.f * (static_cast<float>(whole) + static_cast<float>(part) / 256.f);
  }
  return a;
}

// Four consecutive input bytes as one 32-bit value, to broadcast against every lane's four weights.
inline int32_t four(const int8_t* bytes) {
  int32_t value;
  std::memcpy(&value, bytes, 4);
  return value;
}

// ---- AVX-512 VNNI ----------------------------------------------------------------------------------

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

template <int T>
AVX512 void q4_tile_avx512(const uint8_t* w, const uint16_t* sc, const int8_t* xq, const int8_t* xr,
                           const float* xd, const float* xs, const float* xc, int64_t k, float* y, int64_t ldy) {
  const int64_t groups = k / kGroup;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint16_t* pair = sc + g * 32;  // this group's d and m
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair)));
    const __m512 z = _mm512_fmadd_ps(_mm512_set1_ps(8.f), d, _mm512_cvtph_ps(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(pair + 16))));  // the centre: m + 8 d
    __m512i sum[T], rest[T];
    for (int t = 0; t < T; ++t) sum[t] = rest[t] = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (g * 4 + c) * 64 + kPrefetch), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + (g * 4 + c) * 64);
      const __m512i lo = _mm512_and_si512(v, low);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int t = 0; t < T; ++t) {
        const int64_t at = t * k + g * kGroup + c * 8;
        sum[t] = _mm512_dpbusd_epi32(sum[t], lo, _mm512_set1_epi32(four(xq + at)));
        sum[t] = _mm512_dpbusd_epi32(sum[t], hi, _mm512_set1_epi32(four(xq + at + 4)));
        rest[t] = _mm512_dpbusd_epi32(rest[t], lo, _mm512_set1_epi32(four(xr + at)));
        rest[t] = _mm512_dpbusd_epi32(rest[t], hi, _mm512_set1_epi32(four(xr + at + 4)));
      }
    }
    for (int t = 0; t < T; ++t) {
      const int64_t at = t * groups + g;
      const __m512 whole = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rest[t]), _mm512_set1_ps(1.f / 256.f),
                                           _mm512_cvtepi32_ps(sum[t]));
      const __m512 centred = _mm512_sub_ps(whole, _mm512_set1_ps(xc[at]));  // exact
      acc[t] = _mm512_fmadd_ps(centred, _mm512_mul_ps(d, _mm512_set1_ps(xd[at])), acc[t]);
      acc[t] = _mm512_fmadd_ps(z, _mm512_set1_ps(xs[at]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

template <int T>
AVX512 void q8_tile_avx512(const int8_t* w, const uint16_t* sc, const int8_t* xq, const int8_t* xr, const float* xd,
                           int64_t k, float* y, int64_t ldy) {
  const int64_t groups = k / kGroup;
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + g * 16)));
    __m512i sum[T], rest[T];
    for (int t = 0; t < T; ++t) sum[t] = rest[t] = _mm512_setzero_si512();
    for (int c = 0; c < 8; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (g * 8 + c) * 64 + kPrefetch), _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(w + (g * 8 + c) * 64);
      const __m512i magnitude = _mm512_abs_epi8(v);  // vpdpbusd multiplies unsigned by signed bytes:
      const __mmask64 negative = _mm512_movepi8_mask(v);  // |w| times x with w's sign
      for (int t = 0; t < T; ++t) {
        const int64_t at = t * k + g * kGroup + c * 4;
        const __m512i x = _mm512_set1_epi32(four(xq + at)), r = _mm512_set1_epi32(four(xr + at));
        sum[t] = _mm512_dpbusd_epi32(sum[t], magnitude, _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x));
        rest[t] = _mm512_dpbusd_epi32(rest[t], magnitude, _mm512_mask_sub_epi8(r, negative, _mm512_setzero_si512(), r));
      }
    }
    for (int t = 0; t < T; ++t) {
      const __m512 whole = _mm512_fmadd_ps(_mm512_cvtepi32_ps(rest[t]), _mm512_set1_ps(1.f / 256.f),
                                           _mm512_cvtepi32_ps(sum[t]));
      acc[t] = _mm512_fmadd_ps(whole, _mm512_mul_ps(d, _mm512_set1_ps(xd[t * groups + g])), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(y + t * ldy, acc[t]);
}

// ---- AVX2 (the same layout: a 512-bit chunk is two 256-bit halves, rows 0-7 and 8-15) ------------------

#define AVX2 __attribute__((target("avx2,f16c,fma")))

AVX2 inline __m256i dot4_avx2(__m256i unsigned_bytes, __m256i signed_bytes) {
  // u8 x s8 pairs summed to int16 (no saturation here: |products| <= 255 * 127 * 2 would, so callers keep the
  // unsigned side <= 127), then pairs of int16 summed to int32: 4 products per 32-bit lane
  return _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned_bytes, signed_bytes), _mm256_set1_epi16(1));
}

template <int T>
AVX2 void q4_tile_avx2(const uint8_t* w, const uint16_t* sc, const int8_t* xq, const int8_t* xr,
                       const float* xd, const float* xs, const float* xc, int64_t k, float* y, int64_t ldy) {
  const int64_t groups = k / kGroup;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* pair = sc + g * 32 + h * 8;
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pair)));
      const __m256 z = _mm256_fmadd_ps(_mm256_set1_ps(8.f), d, _mm256_cvtph_ps(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(pair + 16))));  // the centre: m + 8 d
      __m256i sum[T], rest[T];
      for (int t = 0; t < T; ++t) sum[t] = rest[t] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (g * 4 + c) * 64 + kPrefetch), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (g * 4 + c) * 64 + h * 32));
        const __m256i lo = _mm256_and_si256(v, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        for (int t = 0; t < T; ++t) {
          const int64_t at = t * k + g * kGroup + c * 8;
          sum[t] = _mm256_add_epi32(sum[t], dot4_avx2(lo, _mm256_set1_epi32(four(xq + at))));
          sum[t] = _mm256_add_epi32(sum[t], dot4_avx2(hi, _mm256_set1_epi32(four(xq + at + 4))));
          rest[t] = _mm256_add_epi32(rest[t], dot4_avx2(lo, _mm256_set1_epi32(four(xr + at))));
          rest[t] = _mm256_add_epi32(rest[t], dot4_avx2(hi, _mm256_set1_epi32(four(xr + at + 4))));
        }
      }
      for (int t = 0; t < T; ++t) {
        const int64_t at = t * groups + g;
        const __m256 whole = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rest[t]), _mm256_set1_ps(1.f / 256.f),
                                             _mm256_cvtepi32_ps(sum[t]));
        const __m256 centred = _mm256_sub_ps(whole, _mm256_set1_ps(xc[at]));  // exact
        acc[t] = _mm256_fmadd_ps(centred, _mm256_mul_ps(d, _mm256_set1_ps(xd[at])), acc[t]);
        acc[t] = _mm256_fmadd_ps(z, _mm256_set1_ps(xs[at]), acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) _mm256_storeu_ps(y + t * ldy + h * 8, acc[t]);
  }
}

template <int T>
AVX2 void q8_tile_avx2(const int8_t* w, const uint16_t* sc, const int8_t* xq, const int8_t* xr, const float* xd,
                       int64_t k, float* y, int64_t ldy) {
  const int64_t groups = k / kGroup;
  for (int h = 0; h < 2; ++h) {
    __m256 acc[T];
    for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + g * 16 + h * 8)));
      __m256i sum[T], rest[T];
      for (int t = 0; t < T; ++t) sum[t] = rest[t] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (g * 8 + c) * 64 + kPrefetch), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (g * 8 + c) * 64 + h * 32));
        const __m256i magnitude = _mm256_sign_epi8(v, v);  // |w| (w >= -127), and x takes w's sign
        for (int t = 0; t < T; ++t) {
          const int64_t at = t * k + g * kGroup + c * 4;
          const __m256i x = _mm256_set1_epi32(four(xq + at)), r = _mm256_set1_epi32(four(xr + at));
          sum[t] = _mm256_add_epi32(sum[t], dot4_avx2(magnitude, _mm256_sign_epi8(x, v)));
          rest[t] = _mm256_add_epi32(rest[t], dot4_avx2(magnitude, _mm256_sign_epi8(r, v)));
        }
      }
      for (int t = 0; t < T; ++t) {
        const __m256 whole = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rest[t]), _mm256_set1_ps(1.f / 256.f),
                                             _mm256_cvtepi32_ps(sum[t]));
        acc[t] = _mm256_fmadd_ps(whole, _mm256_mul_ps(d, _mm256_set1_ps(xd[t * groups + g])), acc[t]);
      }
    }
    for (int t = 0; t < T; ++t) _mm256_storeu_ps(y + t * ldy + h * 8, acc[t]);
  }
}

// ---- dispatch -------------------------------------------------------------------------------------------

enum class Isa { kNone, kAvx2, kAvx512 };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
  return Isa::kNone;
}

const Isa kDetected = detect();
Isa g_isa = kDetected;  // what runs: the best this CPU has, unless `use_isa` asked for less (tests, benchmarks)

template <int T>
void q4_tile(const uint8_t* w, const uint16_t* sc, const int8_t* xq, const int8_t* xr, const float* xd,
             const float* xs, const float* xc, int64_t k, float* y, int64_t ldy) {
  if (g_isa == Isa::kAvx512)
    q4_tile_avx512<T>(w, sc, xq, xr, xd, xs, xc, k, y, ldy);
  else
    q4_tile_avx2<T>(w, sc, xq, xr, xd, xs, xc, k, y, ldy);
}

template <int T>
void q8_tile(const int8_t* w, const uint16_t* sc, const int8_t* xq, const int8_t* xr, const float* xd, int64_t k,
             float* y, int64_t ldy) {
  if (g_isa == Isa::kAvx512)
    q8_tile_avx512<T>(w, sc, xq, xr, xd, k, y, ldy);
  else
    q8_tile_avx2<T>(w, sc, xq, xr, xd, k, y, ldy);
}

// Calls tile(T, first input row, output block) over every tile of rows and block of outputs, the blocks split
// among torch's threads.
template <typename Tile>
void for_each_tile(int64_t rows, int64_t blocks, const Tile& tile) {
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t r = 0;
      for (; r + kTile <= rows; r += kTile) tile(kTile, r, b);
      if (r < rows) tile(rows - r, r, b);
    }
  });
}

void check_input(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "input must be [rows, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "input must be contiguous float32 on the CPU");
}

}  // namespace

// The instruction set the kernels run with: 0 none (no AVX2), 1 AVX2, 2 AVX-512 VNNI.
int64_t isa() { return static_cast<int64_t>(g_isa); }

// Run with at most `wanted` (0..2) of what this CPU has; returns what runs now.
int64_t use_isa(int64_t wanted) {
  g_isa = static_cast<Isa>(std::min<int64_t>(std::max<int64_t>(wanted, 1), static_cast<int64_t>(kDetected)));
  return isa();
}

// x [M, K] float32 -> [M, N] float32 through q4 weights `packed` [N/16, K/8, 64] and `scales` [N/16, K/32, 2, 16].
torch::Tensor q4_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales) {
  TORCH_CHECK(g_isa != Isa::kNone, "no AVX2 on this CPU");
  const int64_t blocks = packed.size(0), k = packed.size(1) * 8, n = blocks * kRows, rows = x.size(0);
  check_input(x, k);
  const Activations a = quantize_rows(x);
  auto y = torch::empty({rows, n}, torch::kFloat);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const int8_t *xq = a.q.data_ptr<int8_t>(), *xrest = a.r.data_ptr<int8_t>();
  const float *xd = a.d.data_ptr<float>(), *xs = a.s.data_ptr<float>(), *xc = a.c.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t groups = k / kGroup;
  TORCH_CHECK(scales.dim() == 4 && scales.size(1) == groups,
              "scales must be [N/16, K/32, 2, 16], got ", scales.sizes());
  for_each_tile(rows, blocks, [&](int64_t t, int64_t r, int64_t b) {
    const uint8_t* wb = w + b * (k / 8) * 64;
    const uint16_t* sb = sc + b * groups * 32;
    float* yb = out + r * n + b * kRows;
    const int8_t *qr = xq + r * k, *rr = xrest + r * k;
    const float *dr = xd + r * groups, *sr = xs + r * groups, *cr = xc + r * groups;
    switch (t) {
      case 4: q4_tile<4>(wb, sb, qr, rr, dr, sr, cr, k, yb, n); break;
      case 3: q4_tile<3>(wb, sb, qr, rr, dr, sr, cr, k, yb, n); break;
      case 2: q4_tile<2>(wb, sb, qr, rr, dr, sr, cr, k, yb, n); break;
      default: q4_tile<1>(wb, sb, qr, rr, dr, sr, cr, k, yb, n); break;
    }
  });
  return y;
}

// x [M, K] float32 -> [M, N] float32 through q8 weights `packed` [N/16, K/4, 64] and `scales` [N/16, K/32, 16].
torch::Tensor q8_matmul(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales) {
  TORCH_CHECK(g_isa != Isa::kNone, "no AVX2 on this CPU");
  const int64_t blocks = packed.size(0), k = packed.size(1) * 4, n = blocks * kRows, rows = x.size(0);
  check_input(x, k);
  const Activations a = quantize_rows(x);
  auto y = torch::empty({rows, n}, torch::kFloat);
  const int8_t* w = packed.data_ptr<int8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const int8_t *xq = a.q.data_ptr<int8_t>(), *xrest = a.r.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t groups = k / kGroup;
  for_each_tile(rows, blocks, [&](int64_t t, int64_t r, int64_t b) {
    const int8_t* wb = w + b * (k / 4) * 64;
    const uint16_t* sb = sc + b * groups * 16;
    float* yb = out + r * n + b * kRows;
    const int8_t *qr = xq + r * k, *rr = xrest + r * k;
    const float* dr = xd + r * groups;
    switch (t) {
      case 4: q8_tile<4>(wb, sb, qr, rr, dr, k, yb, n); break;
      case 3: q8_tile<3>(wb, sb, qr, rr, dr, k, yb, n); break;
      case 2: q8_tile<2>(wb, sb, qr, rr, dr, k, yb, n); break;
      default: q8_tile<1>(wb, sb, qr, rr, dr, k, yb, n); break;
    }
  });
  return y;
}

void register_decode_ops(pybind11::module& m);  // decode_ops.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_decode_ops(m);
  m.def("isa", &isa);
  m.def("use_isa", &use_isa);
  m.def("q4_matmul", &q4_matmul);
  m.def("q8_matmul", &q8_matmul);
}
