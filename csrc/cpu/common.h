// Shared pieces of the CPU kernels: layouts, dtype dispatch, conversions, argument checks.
// Layouts are those of cpl_kernels/reference.py (the contract).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <string>

namespace cpl {
namespace cpu {

constexpr int64_t kCodesPerWord = 16;   // 2-bit sign codes
constexpr int64_t kBitsPerWord = 32;    // 1-bit masks
constexpr int64_t kOffsetBlock = 1024;  // elements per block_offsets entry
constexpr uint32_t kCodePos = 1, kCodeNeg = 2;

// Work per parallel task: 64K elements keeps the 2 x ~1 MiB streams of a task inside L2 and the
// OpenMP overhead (~2 us per task) under 1% of a 16M-element step.
constexpr int64_t kGrainElements = 1 << 16;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// fp32 <-> storage type. c10's conversions round to nearest even, exactly as tensor.to(dtype).
template <typename T>
inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <typename T>
inline void store(T* p, int64_t i, float x) { p[i] = static_cast<T>(x); }

// Sign code of a float: NaN and +-0 are "zero" (always collaborative).
inline uint32_t sign_code(float x) { return x > 0.f ? kCodePos : (x < 0.f ? kCodeNeg : 0u); }

// x * r < 0 decided on signs: the element conflicts with the mastered reference.
inline bool conflicts(float x, uint32_t code) {
  return (x > 0.f && code == kCodeNeg) || (x < 0.f && code == kCodePos);
}

enum class Criterion { kUpdate, kGradient };

inline Criterion parse_criterion(const std::string& s) {
  if (s == "update") return Criterion::kUpdate;
  if (s == "gradient") return Criterion::kGradient;
  TORCH_CHECK(false, "cpl: argument 'criterion' must be 'update' or 'gradient', got '", s, "'");
}

inline void check_dense(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, "cpl.", op, ": argument '", name, "' must be dense");
  TORCH_CHECK(t.is_contiguous(), "cpl.", op, ": argument '", name, "' must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), "cpl.", op, ": argument '", name, "' must be a CPU tensor");
}

inline void check_float_param(const at::Tensor& t, const char* op, const char* name) {
  check_dense(t, op, name);
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, "cpl.", op, ": argument '",
              name, "' must be float32, bfloat16 or float16, got ", s);
}

inline void check_exact(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype,
                        int64_t numel) {
  check_dense(t, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, "cpl.", op, ": argument '", name, "' must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.numel() == numel, "cpl.", op, ": argument '", name, "' has ", t.numel(),
              " elements, expected ", numel);
}

}  // namespace cpu
}  // namespace cpl

// Dispatch over the three param dtypes (float32, bfloat16, float16); `scalar_t` names the type.
#define CPL_DISPATCH_PARAM_TYPES(TYPE, NAME, ...)                                     \
  [&] {                                                                              \
    switch (TYPE) {                                                                  \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }             \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }  \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }          \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", TYPE);               \
    }                                                                                \
  }()
