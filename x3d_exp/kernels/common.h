// Shared by the kernel sources: the vector type, activations and the thread pool.
//
// Named (not anonymous) namespace: the kernel sources link into one library
// and must share one pool, or their workers would compete for the cores.

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <mutex>
#include <sched.h>
#include <thread>
#include <vector>

namespace x3d {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

inline Vec splat(float x) { return Vec{} + x; }

inline float hsum(Vec v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// `m` lanes from p (0 < m <= kLanes), zeros in the rest: volumes and rows are
// rarely whole vectors. Masked moves where there are any: a variable-length
// memcpy per row costs more than the row's arithmetic.
inline Vec load_n(const float* p, int64_t m) {
  if (m == kLanes) return load(p);
#if defined(__AVX512F__)
  __m512 r = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m) - 1), p);
  Vec v;
  std::memcpy(&v, &r, sizeof(v));
#else
  Vec v{};
  std::memcpy(&v, p, sizeof(float) * m);
#endif
  return v;
}

inline void store_n(float* p, Vec v, int64_t m) {
  if (m == kLanes) return store(p, v);
#if defined(__AVX512F__)
  __m512 r;
  std::memcpy(&r, &v, sizeof(v));
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << m) - 1), r);
#else
  std::memcpy(p, &v, sizeof(float) * m);
#endif
}

enum class Act { kNone, kRelu, kSwish };

typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) with Cephes' single-precision polynomial (about 2 ulp): the vectorised
// libm exp needs -ffast-math, which would also loosen the sums.
inline Vec vexp(Vec x) {
  x = x < splat(88.3f) ? x : splat(88.3f);
  x = x > splat(-87.3f) ? x : splat(-87.3f);
  // Round to nearest by the float mantissa: no vector floor in GCC's vector extensions.
  Vec n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  Vec r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Vec p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  Vec y = p * r * r + r + 1.f;
  IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

inline Vec sigmoid(Vec z) { return 1.f / (1.f + vexp(-z)); }

template <Act A>
inline Vec activate(Vec z) {
  if constexpr (A == Act::kRelu) return z > 0.f ? z : Vec{};
  if constexpr (A == Act::kSwish) return z * sigmoid(z);
  return z;
}

// Gradient through the activation: dy * act'(z). Zero where dy is zero, so the
// zero-filled tails of partial vectors add nothing to the sums.
template <Act A>
inline Vec activate_grad(Vec z, Vec dy) {
  if constexpr (A == Act::kRelu) return z > 0.f ? dy : Vec{};
  if constexpr (A == Act::kSwish) {
    Vec s = sigmoid(z);
    return dy * s * (1.f + z * (1.f - s));
  }
  return dy;
}

// A small pool of our own that sleeps when idle, rather than OpenMP, whose
// spinning workers starve MindSpore's thread pool between kernel calls.
// Workers spin briefly after a job (in case the next kernel call follows at
// once), then sleep on a condition variable. A caller that finds the pool busy (two
// kernels launched concurrently) runs its job alone instead of waiting.
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  void run(int64_t count, const std::function<void(int64_t)>& task) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty() || count < 2) {
      for (int64_t i = 0; i < count; ++i) task(i);
      return;
    }
    task_ = &task;
    count_ = count;
    next_.store(0, std::memory_order_relaxed);
    left_.store(0, std::memory_order_relaxed);
    generation_ = (generation_ + 1) & kGenerationMask;
    control_.store(kOpen | (generation_ << 32), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      wake_.notify_all();
    }
    work();
    uint64_t joined = control_.fetch_and(~kOpen, std::memory_order_acq_rel) & kJoinedMask;
    while (left_.load(std::memory_order_acquire) < static_cast<int64_t>(joined)) cpu_relax();
  }

 private:
  static constexpr uint64_t kOpen = 1ull << 63;
  static constexpr uint64_t kJoinedMask = 0xffffffffull;
  static constexpr uint64_t kGenerationMask = 0x7fffffffull;
  // Spin by time, not count: one `pause` takes 5 to 300 ns depending on the
  // CPU. Longer spins steal a core from the MindSpore op that runs next.
  static constexpr auto kSpin = std::chrono::microseconds(50);

  Pool() {
    int threads = available_cpus();
    if (const char* env = std::getenv("X3D_EXP_KERNEL_THREADS")) threads = std::max(1, std::atoi(env));
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }

  ~Pool() {
    stop_.store(true);
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  static int available_cpus() {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
    return std::max(1u, std::thread::hardware_concurrency());
  }

  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  void work() {
    int64_t i;
    while ((i = next_.fetch_add(1, std::memory_order_relaxed)) < count_) (*task_)(i);
  }

  bool has_new_job(uint64_t seen) const {
    uint64_t c = control_.load(std::memory_order_acquire);
    return (c & kOpen) && ((c >> 32) & kGenerationMask) != seen;
  }

  void loop() {
    uint64_t seen = 0;
    while (!stop_.load(std::memory_order_relaxed)) {
      const auto spin_until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 1; !has_new_job(seen) && !stop_.load(std::memory_order_relaxed); ++i) {
        cpu_relax();
        if (i % 16 == 0 && std::chrono::steady_clock::now() > spin_until) break;
      }
      if (!has_new_job(seen)) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return stop_.load() || has_new_job(seen); });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        continue;
      }
      uint64_t c = control_.load(std::memory_order_acquire);
      seen = (c >> 32) & kGenerationMask;
      // Join only while the job is open: once closed, the caller no longer waits for us.
      while ((c & kOpen) && ((c >> 32) & kGenerationMask) == seen) {
        if (control_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) {
          work();
          left_.fetch_add(1, std::memory_order_release);
          break;
        }
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_;
  std::mutex sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> control_{0};
  std::atomic<int64_t> next_{0};
  std::atomic<int64_t> left_{0};
  const std::function<void(int64_t)>* task_ = nullptr;
  int64_t count_ = 0;
  uint64_t generation_ = 0;
};

inline bool is_float32(const char* dtype) { return std::strcmp(dtype, "float32") == 0; }

inline bool is_int64(const char* dtype) { return std::strcmp(dtype, "int64") == 0; }


}  // namespace x3d
