// cpl::cpl_step_ on CUDA: instantiates the engine (engine.cuh) for every kind of directions.cuh's
// `Directions` list and every param dtype, and answers the glue's questions about kinds
// (kernels.cuh step_kind_*), so a new kind never touches this file or register.cpp.
#include <cstring>
#include <string>

#include "engine.cuh"

namespace cpl_cuda {
namespace {

// Calls fn(D{}) for the D of `Directions` named `kind`; false when none is.
template <class Fn>
bool visit_kind(const char*, Fn&&, DirectionList<>) {
  return false;
}

template <class Fn, class D, class... Rest>
bool visit_kind(const char* kind, Fn&& fn, DirectionList<D, Rest...>) {
  if (kind != nullptr && std::strcmp(kind, D::kName) == 0) {
    fn(D{});
    return true;
  }
  return visit_kind(kind, fn, DirectionList<Rest...>{});
}

template <class D, class... Rest>
std::string names_of(DirectionList<D, Rest...>) {
  std::string out = D::kName;
  ((out += std::string(", ") + Rest::kName), ...);
  return out;
}

}  // namespace

int step_kind_num_hyper(const char* kind) {
  int n = -1;
  visit_kind(kind, [&](auto d) { n = decltype(d)::kNumHyper; }, Directions{});
  return n;
}

int step_kind_state_slots(const char* kind, const double* hyper) {
  int n = -1;
  visit_kind(kind, [&](auto d) { n = decltype(d)::state_slots(hyper); }, Directions{});
  return n;
}

const char* step_kind_names() {
  static const std::string names = names_of(Directions{});
  return names.c_str();
}

cudaError_t launch_cpl_step(const StepParams& p, cudaStream_t stream) {
  RuleArgs args;
  args.step = p.step;
  args.lr = p.lr;
  args.grad_scale = p.grad_scale;
  args.found_inf = p.found_inf;
  args.counts = p.counts;
  args.count_stride = p.count_stride;
  args.skip_nonfinite = p.skip_nonfinite;
  args.update_criterion = p.criterion == Criterion::kUpdate;
  args.strict = p.strict;
  cudaError_t err = cudaErrorInvalidValue;  // an unknown kind (the glue checks it first)
  visit_kind(p.kind, [&](auto tag) {
    using D = decltype(tag);
    const D dir = D::make(p.hyper);
    err = dispatch_dtype(p.dtype, [&](auto dtype_tag) {
      using T = decltype(dtype_tag);
      if (p.qmaps) return launch_engine_8bit<T, D>(p, dir, args, stream);  // the 8-bit state format
      return launch_engine<T, D>(p, dir, args, stream);
    });
  }, Directions{});
  return err;
}

}  // namespace cpl_cuda
