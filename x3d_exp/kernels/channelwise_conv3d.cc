// Channelwise (depthwise) Conv3d for the CPU, as MindSpore Custom AOT kernels.
//
// Layout trick: each (sample, channel) volume is copied into a zero-padded
// buffer, split into stride phases (H and W strides become separate planes).
// In that buffer every output element, every input-gradient element and every
// weight-gradient term is a dot product of contiguous runs at fixed offsets,
// so one 1-D loop over the whole volume does the work with full-width vector
// loads, whatever the spatial size (5x5 planes included) or stride.
//
// Threads: the pool in common.h.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

#include "common.h"

namespace {

using namespace x3d;

// Output elements per inner block: enough accumulators to hide FMA latency,
// few enough to stay in registers.
constexpr int kBlockVecs = 4;
constexpr int64_t kBlock = kBlockVecs * kLanes;
// Taps per pass of the weight-gradient loop: one accumulator each, plus loads.
constexpr int kTapGroup = 9;

// Rows are often 5 to 40 floats: a masked vector beats a libc call per row.
inline void copy_row(float* dst, const float* src, int64_t n) {
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
  if (i < n) {
    __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_maskz_loadu_ps(m, src + i));
  }
#else
  std::memcpy(dst, src, sizeof(float) * n);
#endif
}

inline void zero_row(float* dst, int64_t n) {
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_setzero_ps());
  if (i < n) _mm512_mask_storeu_ps(dst + i, static_cast<__mmask16>((1u << (n - i)) - 1), _mm512_setzero_ps());
#else
  std::memset(dst, 0, sizeof(float) * n);
#endif
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------- geometry

struct Geometry {
  int64_t n, c, t, h, w;           // input
  int64_t kt, kh, kw;              // kernel
  int64_t st, sh, sw;              // stride
  int64_t pf, pk, pt, pb, pl, pr;  // padding: front, back, top, bottom, left, right
  int64_t to, ho, wo;              // output

  // Packed buffer: phases x frames x rows x cols, zero padded.
  int64_t tp, hq, wq, plane, phases, phase_size;
  int64_t out_len;   // packed-output positions that hold every real output
  int64_t margin;    // zeros before the packed output gradient (its reads go backwards)
  int64_t slack;       // room after any buffer: block rounding and tap offsets overrun
  int64_t tail_zeros;  // zeros after the packed input and output gradient, see make_geometry
  std::vector<int64_t> tap_offset;  // into the packed input, per (dt, dh, dw)
  std::vector<int64_t> tap_local;   // same, without the phase part
  std::vector<int64_t> tap_phase;
};

bool make_geometry(const int64_t* xs, const int64_t* ws, const int64_t* g, const int64_t* ys, Geometry* out) {
  Geometry& G = *out;
  G.n = xs[0]; G.c = xs[1]; G.t = xs[2]; G.h = xs[3]; G.w = xs[4];
  G.kt = ws[2]; G.kh = ws[3]; G.kw = ws[4];
  G.st = g[0]; G.sh = g[1]; G.sw = g[2];
  G.pf = g[3]; G.pk = g[4]; G.pt = g[5]; G.pb = g[6]; G.pl = g[7]; G.pr = g[8];
  if (ws[0] != G.c || ws[1] != 1 || G.st < 1 || G.sh < 1 || G.sw < 1) return false;
  for (int i = 3; i < 9; ++i)
    if (g[i] < 0) return false;
  int64_t tp = G.t + G.pf + G.pk, hp = G.h + G.pt + G.pb, wp = G.w + G.pl + G.pr;
  if (tp < G.kt || hp < G.kh || wp < G.kw) return false;
  G.to = (tp - G.kt) / G.st + 1;
  G.ho = (hp - G.kh) / G.sh + 1;
  G.wo = (wp - G.kw) / G.sw + 1;
  if (ys[0] != G.n || ys[1] != G.c || ys[2] != G.to || ys[3] != G.ho || ys[4] != G.wo) return false;
  G.tp = tp;
  G.hq = ceil_div(hp, G.sh);
  G.wq = ceil_div(wp, G.sw);
  G.plane = G.hq * G.wq;
  G.phases = G.sh * G.sw;
  G.phase_size = G.tp * G.plane;
  G.out_len = (G.to - 1) * G.st * G.plane + G.ho * G.wq;
  int64_t max_local = 0;
  for (int64_t dt = 0; dt < G.kt; ++dt)
    for (int64_t dh = 0; dh < G.kh; ++dh)
      for (int64_t dw = 0; dw < G.kw; ++dw) {
        int64_t local = dt * G.plane + (dh / G.sh) * G.wq + dw / G.sw;
        int64_t phase = (dh % G.sh) * G.sw + dw % G.sw;
        G.tap_local.push_back(local);
        G.tap_phase.push_back(phase);
        G.tap_offset.push_back(phase * G.phase_size + local);
        max_local = std::max(max_local, local);
      }
  G.margin = max_local + kBlock;
  G.slack = max_local + 2 * kBlock;
  // The weight gradient reads up to a vector past the end of the output
  // gradient (zeros there) against the packed input up to a row plus a
  // vector past its end: those must be finite (stale NaN * 0 = NaN). Other
  // overruns only feed positions that are discarded.
  G.tail_zeros = G.wq + kBlock;
  return true;
}

// ------------------------------------------------------------ inner loops

// out[i] = sum_k weight[k] * src[offset[k] + i] for i in [0, len), rounded up
// to whole blocks (the buffers carry slack for that).
void correlate(float* out, const float* src, const int64_t* offset, const float* weight, int64_t taps,
               int64_t len) {
  for (int64_t i = 0; i < len; i += kBlock) {
    Vec acc[kBlockVecs] = {};
    for (int64_t k = 0; k < taps; ++k) {
      const float* p = src + offset[k] + i;
      Vec wv = splat(weight[k]);
      for (int u = 0; u < kBlockVecs; ++u) acc[u] += wv * load(p + u * kLanes);
    }
    for (int u = 0; u < kBlockVecs; ++u) store(out + i + u * kLanes, acc[u]);
  }
}

// sums[k] += sum_i grad[i] * src[offset[k] + i] over [0, len) rounded up to vectors.
template <int Group>
void correlate_taps(double* sums, const float* grad, const float* src, const int64_t* offset, int64_t len) {
  Vec acc[Group] = {};
  for (int64_t i = 0; i < len; i += kLanes) {
    Vec gv = load(grad + i);
    for (int k = 0; k < Group; ++k) acc[k] += gv * load(src + offset[k] + i);
  }
  for (int k = 0; k < Group; ++k) sums[k] += hsum(acc[k]);
}

void weight_grad(double* sums, const float* grad, const float* src, const int64_t* offset, int64_t taps,
                 int64_t len) {
  int64_t k = 0;
  for (; k + kTapGroup <= taps; k += kTapGroup) correlate_taps<kTapGroup>(sums + k, grad, src, offset + k, len);
  for (; k < taps; ++k) correlate_taps<1>(sums + k, grad, src, offset + k, len);
}

// --------------------------------------------------------- pack / unpack

float* scratch(int slot, int64_t floats);

#if defined(__AVX512F__)
// Lanes i of row[start + i] with 0 <= start + i < n; zeros elsewhere.
inline __m512 load_window(const float* row, int64_t start, int64_t n) {
  int64_t lo = std::max<int64_t>(0, -start), hi = std::min<int64_t>(16, n - start);
  if (hi <= lo) return _mm512_setzero_ps();
  __mmask16 m = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  return _mm512_maskz_loadu_ps(m, row + start);
}

inline __mmask16 head_mask(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }
#endif

// Input row (w floats) -> its sw phase rows (wq floats each, phase_size apart)
// of the row padded by pl zeros on the left and zeros up to wq * sw on the right.
void split_row(const float* row, int64_t w, int64_t pl, float* dst, int64_t phase_size, int64_t wq, int64_t sw) {
  if (sw == 1) {
    zero_row(dst, pl);
    copy_row(dst + pl, row, w);
    zero_row(dst + pl + w, wq - pl - w);
    return;
  }
#if defined(__AVX512F__)
  if (sw == 2) {
    const __m512i even_index = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd_index = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int64_t j = 0; j < wq; j += 16) {
      __m512 lo = load_window(row, 2 * j - pl, w), hi = load_window(row, 2 * j - pl + 16, w);
      __mmask16 m = head_mask(wq - j);
      _mm512_mask_storeu_ps(dst + j, m, _mm512_permutex2var_ps(lo, even_index, hi));
      _mm512_mask_storeu_ps(dst + phase_size + j, m, _mm512_permutex2var_ps(lo, odd_index, hi));
    }
    return;
  }
#endif
  float* prow = scratch(3, wq * sw);
  zero_row(prow, pl);
  copy_row(prow + pl, row, w);
  zero_row(prow + pl + w, wq * sw - pl - w);
  for (int64_t b = 0; b < sw; ++b)
    for (int64_t j = 0; j < wq; ++j) dst[b * phase_size + j] = prow[j * sw + b];
}

// The inverse of split_row for the input gradient: w floats of the padded row from pl on.
void merge_row(const float* src, int64_t phase_size, int64_t wq, int64_t sw, int64_t pl, float* row, int64_t w) {
  if (sw == 1) {
    copy_row(row, src + pl, w);
    return;
  }
#if defined(__AVX512F__)
  if (sw == 2) {
    // Lane i of the output is padded column q + i: even columns come from
    // phase 0 (index < 16 below), odd ones from phase 1 (index >= 16).
    const __m512i from_even = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i from_odd = _mm512_set_epi32(8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16);
    for (int64_t i = 0; i < w; i += 16) {
      int64_t q = i + pl;
      __m512 even = _mm512_loadu_ps(src + q / 2), odd = _mm512_loadu_ps(src + phase_size + q / 2);
      __m512 v = _mm512_permutex2var_ps(even, q % 2 == 0 ? from_even : from_odd, odd);
      _mm512_mask_storeu_ps(row + i, head_mask(w - i), v);
    }
    return;
  }
#endif
  float* prow = scratch(3, wq * sw);
  for (int64_t b = 0; b < sw; ++b)
    for (int64_t j = 0; j < wq; ++j) prow[j * sw + b] = src[b * phase_size + j];
  copy_row(row, prow + pl, w);
}

// An affine map per channel, then an activation: a BatchNorm in its
// running-statistics form (and what follows it) folded into the kernel.
struct Affine {
  float scale, shift;
};

// Padded volume split into stride phases (see the top of the file). Writes
// every element once, padding included, so the buffer needs no clearing.
// With `In` = kRelu each input row goes through relu(x * scale + shift) on the
// way; the padding stays zero, as the convolution pads that result.
template <Act In = Act::kNone>
void pack_input(const Geometry& G, const float* x, float* packed, Affine in = {1.f, 0.f}) {
  for (int64_t a = 0; a < G.sh; ++a)
    for (int64_t f = 0; f < G.tp; ++f)
      for (int64_t yq = 0; yq < G.hq; ++yq) {
        float* dst = packed + a * G.sw * G.phase_size + f * G.plane + yq * G.wq;
        int64_t t = f - G.pf, h = yq * G.sh + a - G.pt;
        if (t < 0 || t >= G.t || h < 0 || h >= G.h) {
          for (int64_t b = 0; b < G.sw; ++b) zero_row(dst + b * G.phase_size, G.wq);
          continue;
        }
        const float* row = x + (t * G.h + h) * G.w;
        if constexpr (In != Act::kNone) {
          float* mapped = scratch(4, G.w);
          for (int64_t i = 0; i < G.w; i += kLanes) {
            int64_t m = std::min<int64_t>(kLanes, G.w - i);
            store_n(mapped + i, activate<In>(load_n(row + i, m) * in.scale + in.shift), m);
          }
          row = mapped;
        }
        split_row(row, G.w, G.pl, dst, G.phase_size, G.wq, G.sw);
      }
  zero_row(packed + G.phases * G.phase_size, G.tail_zeros);
}

void unpack_input_grad(const Geometry& G, const float* packed, float* dx) {
  for (int64_t t = 0; t < G.t; ++t)
    for (int64_t h = 0; h < G.h; ++h) {
      int64_t y = h + G.pt;
      const float* src = packed + (y % G.sh) * G.sw * G.phase_size + (t + G.pf) * G.plane + (y / G.sh) * G.wq;
      merge_row(src, G.phase_size, G.wq, G.sw, G.pl, dx + (t * G.h + h) * G.w, G.w);
    }
}

// Output (or its gradient) in packed coordinates: index ot*st*plane + oh*wq + ow.
void unpack_output(const Geometry& G, const float* packed, float* y) {
  for (int64_t ot = 0; ot < G.to; ++ot)
    for (int64_t oh = 0; oh < G.ho; ++oh)
      copy_row(y + (ot * G.ho + oh) * G.wo, packed + ot * G.st * G.plane + oh * G.wq, G.wo);
}

// unpack_output through act(y * scale + shift).
template <Act Out>
void unpack_output_mapped(const Geometry& G, const float* packed, float* y, Affine out) {
  for (int64_t ot = 0; ot < G.to; ++ot)
    for (int64_t oh = 0; oh < G.ho; ++oh) {
      const float* src = packed + ot * G.st * G.plane + oh * G.wq;
      float* dst = y + (ot * G.ho + oh) * G.wo;
      for (int64_t i = 0; i < G.wo; i += kLanes) {
        int64_t m = std::min<int64_t>(kLanes, G.wo - i);
        store_n(dst + i, activate<Out>(load_n(src + i, m) * out.scale + out.shift), m);
      }
    }
}

// Zeros everywhere but the real outputs: the gradient loops rely on reading
// zeros past row ends, frame ends and both ends of the volume.
void pack_output_grad(const Geometry& G, const float* dy, float* packed) {
  zero_row(packed, G.margin);
  float* base = packed + G.margin;
  for (int64_t slot = 0; slot < G.tp; ++slot) {
    int64_t ot = slot / G.st;
    bool real = slot % G.st == 0 && ot < G.to;
    for (int64_t yq = 0; yq < G.hq; ++yq) {
      float* dst = base + slot * G.plane + yq * G.wq;
      if (!real || yq >= G.ho) {
        zero_row(dst, G.wq);
        continue;
      }
      copy_row(dst, dy + (ot * G.ho + yq) * G.wo, G.wo);
      zero_row(dst + G.wo, G.wq - G.wo);
    }
  }
  zero_row(base + G.phase_size, G.tail_zeros);
}

// Per-thread scratch, grown on demand and kept between calls.
float* scratch(int slot, int64_t floats) {
  thread_local std::vector<float> buffers[5];
  std::vector<float>& b = buffers[slot];
  if (static_cast<int64_t>(b.size()) < floats) b.resize(floats);
  return b.data();
}

}  // namespace

// Inputs: x (N, C, T, H, W), weight (C, 1, kt, kh, kw), geometry int64[9]
// (stride t, h, w; padding front, back, top, bottom, left, right).
// Output: y (N, C, To, Ho, Wo).
extern "C" int ChannelwiseConv3dForward(int nparam, void** params, int* ndims, int64_t** shapes,
                                        const char** dtypes, void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 4 || ndims[0] != 5 || ndims[1] != 5 || ndims[2] != 1 || shapes[2][0] != 9 || ndims[3] != 5)
    return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_int64(dtypes[2]) || !is_float32(dtypes[3])) return 2;
  Geometry G;
  if (!make_geometry(shapes[0], shapes[1], static_cast<const int64_t*>(params[2]), shapes[3], &G)) return 3;
  const float* x = static_cast<const float*>(params[0]);
  const float* weight = static_cast<const float*>(params[1]);
  float* y = static_cast<float*>(params[3]);
  const int64_t taps = G.kt * G.kh * G.kw;
  const int64_t in_size = G.t * G.h * G.w, out_size = G.to * G.ho * G.wo;
  Pool::get().run(G.n * G.c, [&](int64_t item) {
    int64_t ch = item % G.c;
    float* packed = scratch(0, G.phases * G.phase_size + G.slack);
    float* result = scratch(1, G.out_len + G.slack);
    pack_input(G, x + item * in_size, packed);
    correlate(result, packed, G.tap_offset.data(), weight + ch * taps, taps, G.out_len);
    unpack_output(G, result, y + item * out_size);
  });
  return 0;
}

// Inputs: x, weight, geometry (as forward), dy (N, C, To, Ho, Wo).
// Outputs: dx (N, C, T, H, W), dweight (C, 1, kt, kh, kw).
extern "C" int ChannelwiseConv3dBackward(int nparam, void** params, int* ndims, int64_t** shapes,
                                         const char** dtypes, void* stream, void* extra) {
  (void)stream;
  (void)extra;
  if (nparam != 6 || ndims[0] != 5 || ndims[1] != 5 || ndims[2] != 1 || shapes[2][0] != 9 || ndims[3] != 5)
    return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_int64(dtypes[2]) || !is_float32(dtypes[3]))
    return 2;
  Geometry G;
  if (!make_geometry(shapes[0], shapes[1], static_cast<const int64_t*>(params[2]), shapes[3], &G)) return 3;
  const float* x = static_cast<const float*>(params[0]);
  const float* weight = static_cast<const float*>(params[1]);
  const float* dy = static_cast<const float*>(params[3]);
  float* dx = static_cast<float*>(params[4]);
  float* dweight = static_cast<float*>(params[5]);
  const int64_t taps = G.kt * G.kh * G.kw;
  const int64_t in_size = G.t * G.h * G.w, out_size = G.to * G.ho * G.wo;

  // Input gradient of phase p gathers the output gradient through the taps of
  // that phase, at negated offsets.
  std::vector<std::vector<int64_t>> phase_offsets(G.phases);
  std::vector<std::vector<int64_t>> phase_taps(G.phases);
  for (int64_t k = 0; k < taps; ++k) {
    phase_offsets[G.tap_phase[k]].push_back(-G.tap_local[k]);
    phase_taps[G.tap_phase[k]].push_back(k);
  }

  // One task per channel, looping over the batch, so each weight gradient has one writer.
  Pool::get().run(G.c, [&](int64_t ch) {
    float* packed = scratch(0, G.phases * G.phase_size + G.slack);
    float* grad = scratch(1, G.margin + G.phase_size + G.slack);
    float* packed_dx = scratch(2, G.phases * G.phase_size + G.slack);
    const float* w = weight + ch * taps;
    std::vector<double> sums(taps, 0.0);
    std::vector<float> phase_weight;
    for (int64_t n = 0; n < G.n; ++n) {
      int64_t item = n * G.c + ch;
      pack_input(G, x + item * in_size, packed);
      pack_output_grad(G, dy + item * out_size, grad);
      const float* g = grad + G.margin;
      weight_grad(sums.data(), g, packed, G.tap_offset.data(), taps, G.out_len);
      for (int64_t p = 0; p < G.phases; ++p) {
        phase_weight.clear();
        for (int64_t k : phase_taps[p]) phase_weight.push_back(w[k]);
        correlate(packed_dx + p * G.phase_size, g, phase_offsets[p].data(), phase_weight.data(),
                  static_cast<int64_t>(phase_weight.size()), G.phase_size);
      }
      unpack_input_grad(G, packed_dx, dx + item * in_size);
    }
    for (int64_t k = 0; k < taps; ++k) dweight[ch * taps + k] = static_cast<float>(sums[k]);
  });
  return 0;
}

namespace {

// Inference: y = out_act(conv(in_act(x * in_scale + in_shift)) * out_scale + out_shift),
// per channel; affine is (4, C): in_scale, in_shift, out_scale, out_shift (In
// = kNone: x as it is, the input pair unused). The
// BatchNorms and activations around X3D's channelwise conv ride along the
// packing and unpacking the kernel does anyway: two passes over memory and
// two ops fewer per block.
template <Act In, Act Out>
int fused_forward(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  if (nparam != 5 || ndims[0] != 5 || ndims[1] != 5 || ndims[2] != 1 || shapes[2][0] != 9 || ndims[3] != 2 ||
      ndims[4] != 5)
    return 1;
  if (!is_float32(dtypes[0]) || !is_float32(dtypes[1]) || !is_int64(dtypes[2]) || !is_float32(dtypes[3]) ||
      !is_float32(dtypes[4]))
    return 2;
  Geometry G;
  if (!make_geometry(shapes[0], shapes[1], static_cast<const int64_t*>(params[2]), shapes[4], &G)) return 3;
  if (shapes[3][0] != 4 || shapes[3][1] != G.c) return 3;
  const float* x = static_cast<const float*>(params[0]);
  const float* weight = static_cast<const float*>(params[1]);
  const float* affine = static_cast<const float*>(params[3]);
  float* y = static_cast<float*>(params[4]);
  const int64_t taps = G.kt * G.kh * G.kw;
  const int64_t in_size = G.t * G.h * G.w, out_size = G.to * G.ho * G.wo;
  Pool::get().run(G.n * G.c, [&](int64_t item) {
    int64_t ch = item % G.c;
    float* packed = scratch(0, G.phases * G.phase_size + G.slack);
    float* result = scratch(1, G.out_len + G.slack);
    pack_input<In>(G, x + item * in_size, packed, {affine[ch], affine[G.c + ch]});
    correlate(result, packed, G.tap_offset.data(), weight + ch * taps, taps, G.out_len);
    unpack_output_mapped<Out>(G, result, y + item * out_size, {affine[2 * G.c + ch], affine[3 * G.c + ch]});
  });
  return 0;
}

}  // namespace

#define X3D_FUSED(symbol, In, Out)                                                                        \
  extern "C" int symbol(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,     \
                        void* stream, void* extra) {                                                      \
    (void)stream;                                                                                         \
    (void)extra;                                                                                          \
    return fused_forward<In, Out>(nparam, params, ndims, shapes, dtypes);                                 \
  }

// Inputs: x, weight, geometry (as ChannelwiseConv3dForward), affine (4, C). Output: y.
// The combinations X3D has: the stem's conv_t (BN + ReLU after), conv_b in
// blocks with SE (BN + ReLU before, BN after) and without (then BN + Swish).
X3D_FUSED(ChannelwiseConv3dFused_none_relu, Act::kNone, Act::kRelu)
X3D_FUSED(ChannelwiseConv3dFused_relu_none, Act::kRelu, Act::kNone)
X3D_FUSED(ChannelwiseConv3dFused_relu_swish, Act::kRelu, Act::kSwish)
