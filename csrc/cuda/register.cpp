// Torch glue for the CUDA kernels: validates CUDA tensors, fills the params structs of
// kernels.cuh and launches on the current stream. Schemas live in csrc/ops.cpp.
#include <cmath>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kernels.cuh"

namespace cpl {
namespace cpu {
// csrc/cpu/masked_adamw.cpp (same library): the compact-state check on CPU tensors; throws the
// message naming the first inconsistent block. Used here to report what the device check found.
void check_compact_state(const at::Tensor& mask_words, const at::Tensor& block_offsets, int64_t numel,
                         int64_t state_len, const char* op);
}  // namespace cpu
}  // namespace cpl

namespace {

using at::Tensor;

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "cpl.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cpl_cuda::DType param_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpl_cuda::DType::kFloat32;
    case at::kBFloat16: return cpl_cuda::DType::kBFloat16;
    case at::kHalf: return cpl_cuda::DType::kFloat16;
    default: TORCH_CHECK(false, "cpl.", op, ": argument '", name, "' has dtype ", t.scalar_type(),
                         "; expected float32, bfloat16 or float16");
  }
}

void check_cuda(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "cpl.", op, ": argument '", name, "' must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "cpl.", op, ": argument '", name, "' is on ", t.device(),
              " but the other inputs are on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "cpl.", op, ": argument '", name, "' must be contiguous");
}

void check_tensor(const Tensor& t, const Tensor& like, const char* op, const char* name,
                  at::ScalarType dtype, int64_t numel) {
  check_cuda(t, like, op, name);
  TORCH_CHECK(t.scalar_type() == dtype, "cpl.", op, ": argument '", name, "' has dtype ", t.scalar_type(),
              "; expected ", dtype);
  TORCH_CHECK(t.numel() == numel, "cpl.", op, ": argument '", name, "' has ", t.numel(),
              " elements; expected ", numel);
}

int64_t code_words(int64_t n) { return (n + 15) / 16; }
int64_t mask_words(int64_t n) { return (n + 31) / 32; }

cpl_cuda::Criterion parse_criterion(c10::string_view c, const char* op) {
  if (c == "update") return cpl_cuda::Criterion::kUpdate;
  if (c == "gradient") return cpl_cuda::Criterion::kGradient;
  TORCH_CHECK(false, "cpl.", op, ": argument 'criterion' must be 'update' or 'gradient', got '", std::string(c), "'");
}

void check_param_grad(const Tensor& param, const Tensor& grad, const char* op) {
  check_cuda(param, param, op, "param");
  param_dtype(param, op, "param");
  check_tensor(grad, param, op, "grad", param.scalar_type(), param.numel());
}

void pack_signs_cuda(const Tensor& src, const Tensor& codes) {
  const char* op = "pack_signs_";
  check_cuda(src, src, op, "src");
  check_tensor(codes, src, op, "codes", at::kInt, code_words(src.numel()));
  const c10::cuda::CUDAGuard guard(src.device());
  cpl_cuda::PackSignsParams p{src.data_ptr(), param_dtype(src, op, "src"), codes.data_ptr<int32_t>(), src.numel()};
  check_launch(cpl_cuda::launch_pack_signs(p, c10::cuda::getCurrentCUDAStream()), op);
}

std::tuple<Tensor, Tensor> stats_cuda(const Tensor& a, const Tensor* b, const Tensor* codes,
                                      const std::optional<Tensor>& mask_out, const char* op) {
  check_cuda(a, a, op, "a");
  const auto dtype = param_dtype(a, op, "a");
  const int64_t n = a.numel();
  if (b) check_tensor(*b, a, op, "b", a.scalar_type(), n);
  if (codes) check_tensor(*codes, a, op, "codes", at::kInt, code_words(n));
  if (mask_out) check_tensor(*mask_out, a, op, "mask_out", at::kInt, mask_words(n));
  const c10::cuda::CUDAGuard guard(a.device());
  Tensor counts = at::zeros({3}, a.options().dtype(at::kLong));
  Tensor sums = at::zeros({2}, a.options().dtype(at::kDouble));
  cpl_cuda::StatsParams p;
  p.a = a.data_ptr();
  p.b = b ? b->data_ptr() : nullptr;
  p.b_codes = codes ? codes->data_ptr<int32_t>() : nullptr;
  p.dtype = dtype;
  p.mask_out = mask_out ? mask_out->data_ptr<int32_t>() : nullptr;
  p.numel = n;
  p.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  p.sums = sums.data_ptr<double>();
  check_launch(cpl_cuda::launch_contribution_stats(p, c10::cuda::getCurrentCUDAStream()), op);
  return {counts, sums};
}

std::tuple<Tensor, Tensor> contribution_stats_cuda(const Tensor& a, const Tensor& b, const std::optional<Tensor>& mask_out) {
  return stats_cuda(a, &b, nullptr, mask_out, "contribution_stats");
}

std::tuple<Tensor, Tensor> contribution_stats_codes_cuda(const Tensor& a, const Tensor& codes,
                                                         const std::optional<Tensor>& mask_out) {
  return stats_cuda(a, nullptr, &codes, mask_out, "contribution_stats_codes");
}

Tensor masked_adamw_step_cuda(const Tensor& param, const Tensor& grad, const Tensor& mask, const Tensor& block_offsets,
                              const Tensor& exp_avg, const Tensor& exp_avg_sq, double step, double lr, double beta1,
                              double beta2, double eps, double weight_decay, bool skip_nonfinite,
                              const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  const char* op = "masked_adamw_step_";
  check_param_grad(param, grad, op);
  const int64_t n = param.numel();
  check_tensor(mask, param, op, "mask_words", at::kInt, mask_words(n));
  check_tensor(block_offsets, param, op, "block_offsets", at::kLong, (n + 1023) / 1024);
  const int64_t state_len = exp_avg.numel();
  check_tensor(exp_avg, param, op, "exp_avg", at::kFloat, state_len);
  check_tensor(exp_avg_sq, param, op, "exp_avg_sq", at::kFloat, state_len);
  TORCH_CHECK_VALUE(std::isfinite(step) && step >= 1, "cpl.", op, ": argument 'step' counts from 1, got ", step);
  TORCH_CHECK_VALUE(std::isfinite(lr) && lr >= 0, "cpl.", op, ": argument 'lr' must be a finite number >= 0, got ", lr);
  // GradScaler's scalars stay on the device (no sync): fp32 scale, found_inf as an int32 flag.
  Tensor scale, found;
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK_VALUE(grad_scale->numel() == 1 && grad_scale->is_floating_point(), "cpl.", op,
                      ": argument 'grad_scale' must be a one-element floating-point tensor");
    check_cuda(*grad_scale, param, op, "grad_scale");
    scale = grad_scale->reshape({1}).to(at::kFloat);
  }
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK_VALUE(found_inf->numel() == 1 && found_inf->is_floating_point(), "cpl.", op,
                      ": argument 'found_inf' must be a one-element floating-point tensor");
    check_cuda(*found_inf, param, op, "found_inf");
    found = found_inf->reshape({1}).ne(0).to(at::kInt);
  }
  Tensor nonfinite = at::zeros({}, param.options().dtype(at::kLong));
  if (n == 0) {  // no blocks to check on the device: only state_len == 0 can be valid
    cpl::cpu::check_compact_state(mask.cpu(), block_offsets.cpu(), n, state_len, op);
    return nonfinite;
  }
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor error = at::empty({1}, param.options().dtype(at::kLong));
  cpl_cuda::MaskedAdamWParams p;
  p.param = param.data_ptr();
  p.grad = grad.data_ptr();
  p.mask_words = mask.data_ptr<int32_t>();
  p.block_offsets = block_offsets.data_ptr<int64_t>();
  p.exp_avg = exp_avg.data_ptr<float>();
  p.exp_avg_sq = exp_avg_sq.data_ptr<float>();
  p.state_len = state_len;
  p.dtype = param_dtype(param, op, "param");
  p.numel = n;
  p.hyper[0] = beta1;
  p.hyper[1] = beta2;
  p.hyper[2] = eps;
  p.hyper[3] = weight_decay;
  p.step = step;
  p.lr = lr;
  p.skip_nonfinite = skip_nonfinite;
  p.grad_scale = scale.defined() ? scale.data_ptr<float>() : nullptr;
  p.found_inf = found.defined() ? found.data_ptr<int32_t>() : nullptr;
  p.nonfinite = reinterpret_cast<unsigned long long*>(nonfinite.data_ptr<int64_t>());
  p.error = reinterpret_cast<unsigned long long*>(error.data_ptr<int64_t>());
  // Validate, then step: the step kernel reads the error word first and writes nothing when it is
  // set, so a bad compact state leaves param, exp_avg and exp_avg_sq untouched.
  check_launch(cpl_cuda::launch_masked_adamw_validate(p, stream), op);
  check_launch(cpl_cuda::launch_masked_adamw_step(p, stream), op);
  // One host sync per masked step (this read of the error word): the caller must get the error
  // as an exception, which only the host can raise; the device word alone could only make the
  // step skip its writes silently. The host waits for the step kernel, and the GPU then idles
  // until the host queues the next kernel: about one launch latency (a few microseconds) per
  // masked parameter per step, and the host loses its run-ahead. It also makes this op
  // uncapturable in a CUDA graph.
  const auto code = static_cast<unsigned long long>(error.item<int64_t>());
  if (code != cpl_cuda::kMaskedStateOk) {
    // Rerun the check on the host for the message that names the block and the values (error
    // path only: copies the mask and the offsets, 0.13 B per element).
    cpl::cpu::check_compact_state(mask.cpu(), block_offsets.cpu(), n, state_len, op);
    TORCH_CHECK_VALUE(false, "cpl.", op, ": the compact state (mask_words, block_offsets, exp_avg) is inconsistent "
                      "(device check code ", code, ")");
  }
  return nonfinite;
}

Tensor cpl_mask_words_cuda(const Tensor& a, const std::optional<Tensor>& b, const std::optional<Tensor>& codes,
                           const Tensor& mask_out, const std::optional<Tensor>& block_offsets_out) {
  const char* op = "cpl_mask_words";
  check_cuda(a, a, op, "a");
  const auto dtype = param_dtype(a, op, "a");
  const int64_t n = a.numel();
  const bool has_b = b.has_value() && b->defined(), has_codes = codes.has_value() && codes->defined();
  TORCH_CHECK_VALUE(has_b != has_codes, "cpl.", op, ": pass exactly one of 'b' and 'codes', got ",
                    has_b ? "both" : "neither");
  if (has_b) check_tensor(*b, a, op, "b", a.scalar_type(), n);
  if (has_codes) check_tensor(*codes, a, op, "codes", at::kInt, code_words(n));
  check_tensor(mask_out, a, op, "mask_out", at::kInt, mask_words(n));
  const int64_t blocks = (n + 1023) / 1024;
  const bool has_offsets = block_offsets_out.has_value() && block_offsets_out->defined();
  if (has_offsets) check_tensor(*block_offsets_out, a, op, "block_offsets_out", at::kLong, blocks);
  const c10::cuda::CUDAGuard guard(a.device());
  // Per-block popcounts (one int64 per 1024 elements), scanned below into the offsets.
  Tensor counts = has_offsets ? *block_offsets_out : at::empty({blocks}, a.options().dtype(at::kLong));
  cpl_cuda::MaskWordsParams p;
  p.a = a.data_ptr();
  p.b = has_b ? b->data_ptr() : nullptr;
  p.b_codes = has_codes ? codes->data_ptr<int32_t>() : nullptr;
  p.dtype = dtype;
  p.mask_out = mask_out.data_ptr<int32_t>();
  p.block_counts = counts.data_ptr<int64_t>();
  p.numel = n;
  check_launch(cpl_cuda::launch_mask_words(p, c10::cuda::getCurrentCUDAStream()), op);
  Tensor total = counts.sum();
  if (has_offsets) counts.copy_(at::cumsum(counts, 0) - counts);  // exclusive prefix sums, in place
  return total;
}

// ---- list ops: validation and dtype groups -----------------------------------------------

// Host-side columns of one dtype group; pointers stay valid while the caller's tensors live.
struct Group {
  std::vector<void*> params;
  std::vector<const void*> grads;
  std::vector<float*> state1, state2;
  std::vector<const int32_t*> codes;
  std::vector<int64_t> numels, slots;
};

Tensor device_scalar(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  check_cuda(t, like, op, name);
  TORCH_CHECK(t.numel() == 1, "cpl.", op, ": argument '", name, "' must hold one value, got ", t.numel());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false), "cpl.", op,
              ": argument '", name, "' must be a real number tensor");
  return t.reshape({}).to(at::kDouble);  // device-side cast: stays capturable in a CUDA graph
}

std::string item(const char* list, int64_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// Validates every entry (all before any launch, so an error leaves every tensor as it was) and
// groups the pointers by dtype. Messages name the entry, e.g. 'exp_avgs[3]'.
std::vector<Group> group_by_dtype(at::TensorList params, at::TensorList grads, at::TensorList state1,
                                  const char* state1_name, at::TensorList state2, const char* state2_name,
                                  const c10::List<std::optional<Tensor>>& codes, const char* op) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "cpl.", op, ": 'grads' has ", grads.size(), " tensors, 'params' ", n);
  TORCH_CHECK(state1.empty() || static_cast<int64_t>(state1.size()) == n, "cpl.", op, ": state list length mismatch");
  TORCH_CHECK(state2.empty() || static_cast<int64_t>(state2.size()) == n, "cpl.", op, ": state list length mismatch");
  TORCH_CHECK(codes.size() == 0 || static_cast<int64_t>(codes.size()) == n, "cpl.", op, ": 'codes' has ",
              codes.size(), " entries, 'params' ", n);
  std::vector<Group> groups(3);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    // One launch serves the whole list on params[0]'s device: a tensor on another GPU would hand
    // the kernel a pointer it may not dereference (no peer access).
    check_cuda(p, params[0], op, item("params", i).c_str());
    const auto dtype = param_dtype(p, op, item("params", i).c_str());
    const int64_t numel = p.numel();
    check_tensor(grads[i], p, op, item("grads", i).c_str(), p.scalar_type(), numel);
    Group& g = groups[static_cast<int>(dtype)];
    g.params.push_back(p.data_ptr());
    g.grads.push_back(grads[i].data_ptr());
    if (!state1.empty()) {
      check_tensor(state1[i], p, op, item(state1_name, i).c_str(), at::kFloat, numel);
      g.state1.push_back(state1[i].data_ptr<float>());
    }
    if (!state2.empty()) {
      check_tensor(state2[i], p, op, item(state2_name, i).c_str(), at::kFloat, numel);
      g.state2.push_back(state2[i].data_ptr<float>());
    }
    const int32_t* c = nullptr;
    if (codes.size() > 0) {
      const std::optional<Tensor> ci = codes.get(i);
      if (ci.has_value()) {
        check_tensor(*ci, p, op, item("codes", i).c_str(), at::kInt, code_words(numel));
        c = ci->data_ptr<int32_t>();
      }
    }
    g.codes.push_back(c);
    g.numels.push_back(numel);
    g.slots.push_back(i);
  }
  return groups;
}

// ---- the step engine ------------------------------------------------------------------------

// A one-element floating-point device tensor (GradScaler's scale or found_inf), validated.
const Tensor& amp_scalar(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  check_cuda(t, like, op, name);
  TORCH_CHECK_VALUE(t.numel() == 1 && at::isFloatingType(t.scalar_type()), "cpl.", op, ": argument '", name,
                    "' must be a one-element floating-point tensor");
  return t;
}

// cpl::cpl_step_ (contract: cpl_kernels/reference_step.py). Everything is validated, every entry
// of every list included, before the first launch: an error leaves every tensor as it was. The
// kind's hyper count and state slots come from the engine (directions.cuh), so this function
// knows no kind. Device-side casts only (step, lr to double; grad_scale to fp32; found_inf to an
// int32 flag): no host sync, so the call is CUDA-graph capturable. step >= 1 and a finite lr are
// the Python layer's checks (engine.py): reading them here would sync.
Tensor cpl_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                     const c10::List<std::optional<Tensor>>& codes, c10::string_view kind, const Tensor& step,
                     const Tensor& lr, at::ArrayRef<double> hyper, c10::string_view criterion, bool strict,
                     bool skip_nonfinite, const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& found_inf) {
  const char* op = "cpl_step_";
  const std::string kind_name(kind);
  const int num_hyper = cpl_cuda::step_kind_num_hyper(kind_name.c_str());
  TORCH_CHECK_VALUE(num_hyper >= 0, "cpl.", op, ": argument 'kind' must be one of ", cpl_cuda::step_kind_names(),
                    "; got '", kind_name, "'");
  TORCH_CHECK_VALUE(static_cast<int64_t>(hyper.size()) == num_hyper, "cpl.", op, ": argument 'hyper' for kind '",
                    kind_name, "' holds ", hyper.size(), " values; expected ", num_hyper);
  for (size_t j = 0; j < hyper.size(); ++j)
    TORCH_CHECK_VALUE(std::isfinite(hyper[j]), "cpl.", op, ": argument 'hyper' has a non-finite value at ", j);
  const int slots = cpl_cuda::step_kind_state_slots(kind_name.c_str(), hyper.data());
  const auto crit = parse_criterion(criterion, op);
  const int64_t n = static_cast<int64_t>(params.size());
  const auto check_count = [&](const char* name, int64_t got, int64_t want) {
    TORCH_CHECK_VALUE(got == want, "cpl.", op, ": argument '", name, "' has ", got, " entries but 'params' has ", n,
                      want == 0 && n != 0 ? " (kind '" + kind_name + "' uses no such state here: pass [])" : "");
  };
  check_count("grads", static_cast<int64_t>(grads.size()), n);
  check_count("state1", static_cast<int64_t>(state1.size()), slots >= 1 ? n : 0);
  check_count("state2", static_cast<int64_t>(state2.size()), slots >= 2 ? n : 0);
  TORCH_CHECK_VALUE(codes.size() == 0 || static_cast<int64_t>(codes.size()) == n, "cpl.", op, ": argument 'codes' has ",
                    codes.size(), " entries but 'params' has ", n);
  const Tensor& first = n > 0 ? params[0] : step;
  const c10::cuda::CUDAGuard guard(first.device());
  const Tensor step_d = device_scalar(step, first, op, "step");
  const Tensor lr_d = device_scalar(lr, first, op, "lr");
  const Tensor scale_d = grad_scale ? amp_scalar(*grad_scale, first, op, "grad_scale").reshape({}).to(at::kFloat)
                                    : Tensor();
  const Tensor found_d = found_inf ? amp_scalar(*found_inf, first, op, "found_inf").reshape({}).ne(0).to(at::kInt)
                                   : Tensor();
  Tensor counts = at::zeros({2, n}, first.options().dtype(at::kLong));
  if (n == 0) return counts;
  std::vector<Group> groups = group_by_dtype(params, grads, state1, "state1", state2, "state2", codes, op);
  for (int d = 0; d < 3; ++d) {
    Group& g = groups[d];
    if (g.params.empty()) continue;
    cpl_cuda::StepParams p;
    p.kind = kind_name.c_str();
    p.hyper = hyper.data();
    p.num_tensors = static_cast<int64_t>(g.params.size());
    p.params = g.params.data();
    p.grads = g.grads.data();
    p.state1 = slots >= 1 ? g.state1.data() : nullptr;
    p.state2 = slots >= 2 ? g.state2.data() : nullptr;
    p.codes = g.codes.data();
    p.numels = g.numels.data();
    p.count_slots = g.slots.data();
    p.dtype = static_cast<cpl_cuda::DType>(d);
    p.step = step_d.data_ptr<double>();
    p.lr = lr_d.data_ptr<double>();
    p.grad_scale = grad_scale ? scale_d.data_ptr<float>() : nullptr;
    p.found_inf = found_inf ? found_d.data_ptr<int32_t>() : nullptr;
    p.criterion = crit;
    p.strict = strict;
    p.skip_nonfinite = skip_nonfinite;
    p.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    p.count_stride = n;
    check_launch(cpl_cuda::launch_cpl_step(p, c10::cuda::getCurrentCUDAStream()), op);
  }
  return counts;
}

// cpl::cpl_step_8bit_: cpl_step_ with the 8-bit blockwise state format (cpl_kernels/quant8.py).
// Validated like cpl_step_cuda, every entry before the first launch; state1/state2 hold uint8
// codes, absmax1/absmax2 one fp32 per 256 elements, qmaps the fp32 [2, 2, 256] maps.
Tensor cpl_step_8bit_cuda(at::TensorList params, at::TensorList grads, at::TensorList state1,
                          at::TensorList absmax1, at::TensorList state2, at::TensorList absmax2,
                          const Tensor& qmaps, const c10::List<std::optional<Tensor>>& codes, c10::string_view kind,
                          const Tensor& step, const Tensor& lr, at::ArrayRef<double> hyper,
                          c10::string_view criterion, bool strict, bool skip_nonfinite,
                          const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf) {
  const char* op = "cpl_step_8bit_";
  const std::string kind_name(kind);
  const int num_hyper = cpl_cuda::step_kind_num_hyper(kind_name.c_str());
  TORCH_CHECK_VALUE(num_hyper >= 0, "cpl.", op, ": argument 'kind' must be one of ", cpl_cuda::step_kind_names(),
                    "; got '", kind_name, "'");
  TORCH_CHECK_VALUE(static_cast<int64_t>(hyper.size()) == num_hyper, "cpl.", op, ": argument 'hyper' for kind '",
                    kind_name, "' holds ", hyper.size(), " values; expected ", num_hyper);
  for (size_t j = 0; j < hyper.size(); ++j)
    TORCH_CHECK_VALUE(std::isfinite(hyper[j]), "cpl.", op, ": argument 'hyper' has a non-finite value at ", j);
  const int slots = cpl_cuda::step_kind_state_slots(kind_name.c_str(), hyper.data());
  const auto crit = parse_criterion(criterion, op);
  const int64_t n = static_cast<int64_t>(params.size());
  const auto check_count = [&](const char* name, int64_t got, int64_t want) {
    TORCH_CHECK_VALUE(got == want, "cpl.", op, ": argument '", name, "' has ", got, " entries but 'params' has ", n,
                      want == 0 && n != 0 ? " (kind '" + kind_name + "' uses no such state here: pass [])" : "");
  };
  check_count("grads", static_cast<int64_t>(grads.size()), n);
  check_count("state1", static_cast<int64_t>(state1.size()), slots >= 1 ? n : 0);
  check_count("absmax1", static_cast<int64_t>(absmax1.size()), slots >= 1 ? n : 0);
  check_count("state2", static_cast<int64_t>(state2.size()), slots >= 2 ? n : 0);
  check_count("absmax2", static_cast<int64_t>(absmax2.size()), slots >= 2 ? n : 0);
  TORCH_CHECK_VALUE(codes.size() == 0 || static_cast<int64_t>(codes.size()) == n, "cpl.", op, ": argument 'codes' has ",
                    codes.size(), " entries but 'params' has ", n);
  const Tensor& first = n > 0 ? params[0] : step;
  const c10::cuda::CUDAGuard guard(first.device());
  check_tensor(qmaps, first, op, "qmaps", at::kFloat, 4 * 256);
  const Tensor step_d = device_scalar(step, first, op, "step");
  const Tensor lr_d = device_scalar(lr, first, op, "lr");
  const Tensor scale_d = grad_scale ? amp_scalar(*grad_scale, first, op, "grad_scale").reshape({}).to(at::kFloat)
                                    : Tensor();
  const Tensor found_d = found_inf ? amp_scalar(*found_inf, first, op, "found_inf").reshape({}).ne(0).to(at::kInt)
                                   : Tensor();
  Tensor counts = at::zeros({2, n}, first.options().dtype(at::kLong));
  if (n == 0) return counts;
  // Per dtype: pointers of every entry, all validated before the first launch.
  struct Group8 {
    std::vector<void*> params;
    std::vector<const void*> grads;
    std::vector<uint8_t*> q1, q2;
    std::vector<float*> a1, a2;
    std::vector<const int32_t*> codes;
    std::vector<int64_t> numels, slots;
  };
  std::vector<Group8> groups(3);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    check_cuda(p, params[0], op, item("params", i).c_str());
    const auto dtype = param_dtype(p, op, item("params", i).c_str());
    const int64_t numel = p.numel();
    check_tensor(grads[i], p, op, item("grads", i).c_str(), p.scalar_type(), numel);
    Group8& g = groups[static_cast<int>(dtype)];
    g.params.push_back(p.data_ptr());
    g.grads.push_back(grads[i].data_ptr());
    const int64_t blocks = (numel + 255) / 256;
    if (slots >= 1) {
      check_tensor(state1[i], p, op, item("state1", i).c_str(), at::kByte, numel);
      check_tensor(absmax1[i], p, op, item("absmax1", i).c_str(), at::kFloat, blocks);
      g.q1.push_back(state1[i].data_ptr<uint8_t>());
      g.a1.push_back(absmax1[i].data_ptr<float>());
    }
    if (slots >= 2) {
      check_tensor(state2[i], p, op, item("state2", i).c_str(), at::kByte, numel);
      check_tensor(absmax2[i], p, op, item("absmax2", i).c_str(), at::kFloat, blocks);
      g.q2.push_back(state2[i].data_ptr<uint8_t>());
      g.a2.push_back(absmax2[i].data_ptr<float>());
    }
    const int32_t* c = nullptr;
    if (codes.size() > 0) {
      const std::optional<Tensor> ci = codes.get(i);
      if (ci.has_value()) {
        check_tensor(*ci, p, op, item("codes", i).c_str(), at::kInt, code_words(numel));
        c = ci->data_ptr<int32_t>();
      }
    }
    g.codes.push_back(c);
    g.numels.push_back(numel);
    g.slots.push_back(i);
  }
  for (int d = 0; d < 3; ++d) {
    Group8& g = groups[d];
    if (g.params.empty()) continue;
    cpl_cuda::StepParams p;
    p.kind = kind_name.c_str();
    p.hyper = hyper.data();
    p.num_tensors = static_cast<int64_t>(g.params.size());
    p.params = g.params.data();
    p.grads = g.grads.data();
    p.state1 = p.state2 = nullptr;
    p.q1 = slots >= 1 ? g.q1.data() : nullptr;
    p.absmax1 = slots >= 1 ? g.a1.data() : nullptr;
    p.q2 = slots >= 2 ? g.q2.data() : nullptr;
    p.absmax2 = slots >= 2 ? g.a2.data() : nullptr;
    p.qmaps = qmaps.data_ptr<float>();
    p.codes = g.codes.data();
    p.numels = g.numels.data();
    p.count_slots = g.slots.data();
    p.dtype = static_cast<cpl_cuda::DType>(d);
    p.step = step_d.data_ptr<double>();
    p.lr = lr_d.data_ptr<double>();
    p.grad_scale = grad_scale ? scale_d.data_ptr<float>() : nullptr;
    p.found_inf = found_inf ? found_d.data_ptr<int32_t>() : nullptr;
    p.criterion = crit;
    p.strict = strict;
    p.skip_nonfinite = skip_nonfinite;
    p.counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
    p.count_stride = n;
    check_launch(cpl_cuda::launch_cpl_step(p, c10::cuda::getCurrentCUDAStream()), op);
  }
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(cpl, CUDA, m) {
  m.impl("pack_signs_", &pack_signs_cuda);
  m.impl("contribution_stats", &contribution_stats_cuda);
  m.impl("contribution_stats_codes", &contribution_stats_codes_cuda);
  m.impl("masked_adamw_step_", &masked_adamw_step_cuda);
  m.impl("cpl_mask_words", &cpl_mask_words_cuda);
  m.impl("cpl_step_", &cpl_step_cuda);
  m.impl("cpl_step_8bit_", &cpl_step_8bit_cuda);
}
