// BatchNorm with its activation, the SE squeeze and the SE gate with Swish,
// as MindSpore Custom AOT kernels (forward and gradient for each); and for
// inference the residual join of a block.
//
// MindSpore's CPU runs these as chains of separate ops, each a full pass over
// memory (BatchNorm alone at about 4x its bandwidth bound, Swish as Sigmoid and
// Mul, the SE pooling's gradient as Tile and RealDiv). Here each is one or two
// passes, parallel over channels (BatchNorm: its statistics are per channel)
// or over (sample, channel) volumes.
//
// Layout: x is (N, C, ...) float32, contiguous; S is the size of one (n, c)
// volume. Sums run in float vectors flushed to double every kFlush elements.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace {

using namespace x3d;

constexpr int64_t kFlush = 1024;

struct Shape {
  int64_t n, c, s;
};

bool read_shape(int ndim, const int64_t* shape, Shape* out) {
  if (ndim < 2) return false;
  out->n = shape[0];
  out->c = shape[1];
  out->s = 1;
  for (int i = 2; i < ndim; ++i) out->s *= shape[i];
  return true;
}

bool all_float32(int count, const char** dtypes) {
  for (int i = 0; i < count; ++i)
    if (!is_float32(dtypes[i])) return false;
  return true;
}

// ------------------------------------------------------------- BatchNorm

// y = act(x * scale + shift) over one volume.
template <Act A>
void scale_shift(const float* x, float* y, int64_t s, float scale, float shift) {
  for (int64_t i = 0; i < s; i += kLanes) {
    int64_t m = std::min<int64_t>(kLanes, s - i);
    store_n(y + i, activate<A>(load_n(x + i, m) * scale + shift), m);
  }
}

// Training forward, one channel: batch statistics, output, running statistics.
template <Act A>
void bn_train_channel(const Shape& D, int64_t c, const float* x, float* y, float gamma, float beta, float eps,
                      float momentum, float* mean_out, float* invstd_out, float* running_mean,
                      float* running_var) {
  const int64_t count = D.n * D.s;
  // One pass for both moments, of x - shift with the channel's first value as
  // the shift: close enough to the mean that E[d^2] - E[d]^2 keeps its digits.
  const float shift0 = x[c * D.s];
  const Vec shiftv = splat(shift0);
  double sum = 0.0, squares = 0.0;
  for (int64_t n = 0; n < D.n; ++n) {
    const float* v = x + (n * D.c + c) * D.s;
    for (int64_t start = 0; start < D.s; start += kFlush) {
      int64_t end = std::min(D.s, start + kFlush);
      Vec acc{}, acc2{};
      for (int64_t i = start; i < end; i += kLanes) {
        int64_t m = std::min<int64_t>(kLanes, end - i);
        Vec d = load_n(v + i, m) - shiftv;
        if (m < kLanes)
          for (int64_t k = m; k < kLanes; ++k) d[k] = 0.f;
        acc += d;
        acc2 += d * d;
      }
      sum += hsum(acc);
      squares += hsum(acc2);
    }
  }
  const double mean_shifted = sum / count;
  const double mean = shift0 + mean_shifted;
  const double var = std::max(0.0, squares / count - mean_shifted * mean_shifted);
  const double invstd = 1.0 / std::sqrt(var + eps);
  const float scale = static_cast<float>(gamma * invstd);
  const float shift = static_cast<float>(beta - mean * gamma * invstd);
  for (int64_t n = 0; n < D.n; ++n) {
    int64_t offset = (n * D.c + c) * D.s;
    scale_shift<A>(x + offset, y + offset, D.s, scale, shift);
  }
  mean_out[c] = static_cast<float>(mean);
  invstd_out[c] = static_cast<float>(invstd);
  // Running variance unbiased, as MindSpore's (and PyTorch's) BatchNorm keep it.
  const double unbiased = count > 1 ? var * count / (count - 1) : var;
  running_mean[c] = static_cast<float>((1.0 - momentum) * running_mean[c] + momentum * mean);
  running_var[c] = static_cast<float>((1.0 - momentum) * running_var[c] + momentum * unbiased);
}

// Gradient, one channel. With batch statistics (Train) the mean and variance
// depend on x: dx = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)).
// dz is kept in dx between the two passes.
template <Act A, bool Train>
void bn_grad_channel(const Shape& D, int64_t c, const float* x, const float* dy, float* dx, float gamma,
                     float beta, float mean, float invstd, float* dgamma, float* dbeta) {
  const float scale = gamma * invstd, shift = beta - mean * scale;
  const Vec meanv = splat(mean);
  double sum_dz = 0.0, sum_dz_xc = 0.0;  // xc = x - mean
  for (int64_t n = 0; n < D.n; ++n) {
    int64_t offset = (n * D.c + c) * D.s;
    const float *xv = x + offset, *dyv = dy + offset;
    float* dxv = dx + offset;
    for (int64_t start = 0; start < D.s; start += kFlush) {
      int64_t end = std::min(D.s, start + kFlush);
      Vec acc_dz{}, acc_dz_xc{};
      for (int64_t i = start; i < end; i += kLanes) {
        int64_t m = std::min<int64_t>(kLanes, end - i);
        Vec xi = load_n(xv + i, m);
        Vec dz = activate_grad<A>(xi * scale + shift, load_n(dyv + i, m));
        acc_dz += dz;
        acc_dz_xc += dz * (xi - meanv);
        store_n(dxv + i, Train ? dz : dz * scale, m);
      }
      sum_dz += hsum(acc_dz);
      sum_dz_xc += hsum(acc_dz_xc);
    }
  }
  dbeta[c] = static_cast<float>(sum_dz);
  dgamma[c] = static_cast<float>(sum_dz_xc * invstd);
  if (!Train) return;
  const double count = static_cast<double>(D.n * D.s);
  const double k1 = sum_dz / count, k2 = sum_dz_xc * invstd * invstd / count;
  // dx = scale * (dz - k1 - (x - mean) * k2) = a * dz + b * x + d
  const float a = scale, b = static_cast<float>(-scale * k2), d = static_cast<float>(scale * (mean * k2 - k1));
  for (int64_t n = 0; n < D.n; ++n) {
    int64_t offset = (n * D.c + c) * D.s;
    const float* xv = x + offset;
    float* dxv = dx + offset;
    for (int64_t i = 0; i < D.s; i += kLanes) {
      int64_t m = std::min<int64_t>(kLanes, D.s - i);
      store_n(dxv + i, load_n(dxv + i, m) * a + load_n(xv + i, m) * b + d, m);
    }
  }
}

// Inputs: x, gamma, beta, running mean, running variance, hyper [eps, momentum].
// Outputs: y, batch mean, batch invstd, new running mean, new running variance.
// `momentum` is MindSpore's internal one: the weight of the batch statistic.
template <Act A>
int bn_train(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 11 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  auto p = [&](int i) { return static_cast<float*>(params[i]); };
  const float eps = p(5)[0], momentum = p(5)[1];
  std::memcpy(p(9), p(3), sizeof(float) * D.c);
  std::memcpy(p(10), p(4), sizeof(float) * D.c);
  Pool::get().run(D.c, [&](int64_t c) {
    bn_train_channel<A>(D, c, p(0), p(6), p(1)[c], p(2)[c], eps, momentum, p(7), p(8), p(9), p(10));
  });
  return 0;
}

// Inputs: x, gamma, beta, batch mean, batch invstd, dy. Outputs: dx, dgamma, dbeta.
template <Act A>
int bn_train_grad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 9 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  auto p = [&](int i) { return static_cast<float*>(params[i]); };
  Pool::get().run(D.c, [&](int64_t c) {
    bn_grad_channel<A, true>(D, c, p(0), p(5), p(6), p(1)[c], p(2)[c], p(3)[c], p(4)[c], p(7), p(8));
  });
  return 0;
}

float running_invstd(float var, float eps) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(var) + eps)); }

// Inputs: x, gamma, beta, running mean, running variance, hyper [eps, momentum]. Output: y.
template <Act A>
int bn_infer(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 7 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  auto p = [&](int i) { return static_cast<float*>(params[i]); };
  const float eps = p(5)[0];
  // Per volume, not per channel: batch 1 has few channels per thread otherwise.
  Pool::get().run(D.n * D.c, [&](int64_t item) {
    int64_t c = item % D.c;
    float scale = p(1)[c] * running_invstd(p(4)[c], eps);
    scale_shift<A>(p(0) + item * D.s, p(6) + item * D.s, D.s, scale, p(2)[c] - p(3)[c] * scale);
  });
  return 0;
}

// Inputs: x, gamma, beta, running mean, running variance, hyper, dy. Outputs: dx, dgamma, dbeta.
template <Act A>
int bn_infer_grad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 10 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  auto p = [&](int i) { return static_cast<float*>(params[i]); };
  const float eps = p(5)[0];
  Pool::get().run(D.c, [&](int64_t c) {
    bn_grad_channel<A, false>(D, c, p(0), p(6), p(7), p(1)[c], p(2)[c], p(3)[c], running_invstd(p(4)[c], eps),
                              p(8), p(9));
  });
  return 0;
}

// ------------------------------------------------------------ SE squeeze

// Inputs: x. Output: mean over each volume, (N, C, 1, ...).
int channel_mean(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 2 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  const float* x = static_cast<const float*>(params[0]);
  float* out = static_cast<float*>(params[1]);
  Pool::get().run(D.n * D.c, [&](int64_t item) {
    const float* v = x + item * D.s;
    double sum = 0.0;
    for (int64_t start = 0; start < D.s; start += kFlush) {
      int64_t end = std::min(D.s, start + kFlush);
      Vec acc{};
      for (int64_t i = start; i < end; i += kLanes) acc += load_n(v + i, std::min<int64_t>(kLanes, end - i));
      sum += hsum(acc);
    }
    out[item] = static_cast<float>(sum / D.s);
  });
  return 0;
}

// Inputs: x (for its shape), d mean. Output: dx = d mean / S over each volume.
int channel_mean_grad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 3 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  const float* dmean = static_cast<const float*>(params[1]);
  float* dx = static_cast<float*>(params[2]);
  Pool::get().run(D.n * D.c, [&](int64_t item) {
    const Vec v = splat(dmean[item] / static_cast<float>(D.s));
    float* out = dx + item * D.s;
    for (int64_t i = 0; i < D.s; i += kLanes) store_n(out + i, v, std::min<int64_t>(kLanes, D.s - i));
  });
  return 0;
}

// --------------------------------------------------------------- SE gate

// Inputs: x (N, C, ...), gate (N, C, 1, ...). Output: act(x * gate).
template <Act A>
int gate(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 3 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float*>(params[0]), *g = static_cast<const float*>(params[1]);
  float* y = static_cast<float*>(params[2]);
  Pool::get().run(D.n * D.c, [&](int64_t item) {
    scale_shift<A>(x + item * D.s, y + item * D.s, D.s, g[item], 0.f);
  });
  return 0;
}

// Inputs: x, gate, dy. Outputs: dx = act'(z) dy gate, dgate = sum(act'(z) dy x), z = x * gate.
template <Act A>
int gate_grad(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 5 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float*>(params[0]), *g = static_cast<const float*>(params[1]);
  const float* dy = static_cast<const float*>(params[2]);
  float *dx = static_cast<float*>(params[3]), *dg = static_cast<float*>(params[4]);
  Pool::get().run(D.n * D.c, [&](int64_t item) {
    const float gi = g[item];
    const float *xv = x + item * D.s, *dyv = dy + item * D.s;
    float* dxv = dx + item * D.s;
    double sum = 0.0;
    for (int64_t start = 0; start < D.s; start += kFlush) {
      int64_t end = std::min(D.s, start + kFlush);
      Vec acc{};
      for (int64_t i = start; i < end; i += kLanes) {
        int64_t m = std::min<int64_t>(kLanes, end - i);
        Vec xi = load_n(xv + i, m);
        Vec dz = activate_grad<A>(xi * gi, load_n(dyv + i, m));
        acc += dz * xi;
        store_n(dxv + i, dz * gi, m);
      }
      sum += hsum(acc);
    }
    dg[item] = static_cast<float>(sum);
  });
  return 0;
}

// ------------------------------------------------------- residual join

// Inference: relu(branch * bs + bt + shortcut * ss + st) per channel, the
// block's last BatchNorm, the shortcut's BatchNorm (or 1, 0), the sum and the
// ReLU in one pass. Inputs: branch, shortcut (N, C, ...), affine (4, C): bs,
// bt, ss, st. Output: as branch.
int residual_relu(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes) {
  Shape D;
  if (nparam != 4 || !read_shape(ndims[0], shapes[0], &D) || !all_float32(nparam, dtypes)) return 1;
  if (ndims[2] != 2 || shapes[2][0] != 4 || shapes[2][1] != D.c) return 1;
  const float *b = static_cast<const float*>(params[0]), *sc = static_cast<const float*>(params[1]);
  const float* affine = static_cast<const float*>(params[2]);
  float* y = static_cast<float*>(params[3]);
  Pool::get().run(D.n * D.c, [&](int64_t item) {
    const int64_t c = item % D.c;
    const float bs = affine[c], ss = affine[2 * D.c + c], shift = affine[D.c + c] + affine[3 * D.c + c];
    const float *bv = b + item * D.s, *sv = sc + item * D.s;
    float* yv = y + item * D.s;
    for (int64_t i = 0; i < D.s; i += kLanes) {
      int64_t m = std::min<int64_t>(kLanes, D.s - i);
      store_n(yv + i, activate<Act::kRelu>(load_n(bv + i, m) * bs + load_n(sv + i, m) * ss + shift), m);
    }
  });
  return 0;
}

}  // namespace

#define X3D_AOT(symbol, call)                                                                             \
  extern "C" int symbol(int nparam, void** params, int* ndims, int64_t** shapes, const char** dtypes,     \
                        void* stream, void* extra) {                                                      \
    (void)stream;                                                                                         \
    (void)extra;                                                                                          \
    return call(nparam, params, ndims, shapes, dtypes);                                                   \
  }

#define X3D_BN(Name, A)                                      \
  X3D_AOT(BatchNorm##Name##Train, bn_train<A>)               \
  X3D_AOT(BatchNorm##Name##TrainGrad, bn_train_grad<A>)      \
  X3D_AOT(BatchNorm##Name##Infer, bn_infer<A>)               \
  X3D_AOT(BatchNorm##Name##InferGrad, bn_infer_grad<A>)

X3D_BN(, Act::kNone)
X3D_BN(Relu, Act::kRelu)
X3D_BN(Swish, Act::kSwish)
X3D_AOT(ChannelMean, channel_mean)
X3D_AOT(ChannelMeanGrad, channel_mean_grad)
X3D_AOT(Gate, gate<Act::kNone>)
X3D_AOT(GateGrad, gate_grad<Act::kNone>)
X3D_AOT(GateSwish, gate<Act::kSwish>)
X3D_AOT(GateSwishGrad, gate_grad<Act::kSwish>)
X3D_AOT(ResidualRelu, residual_relu)
