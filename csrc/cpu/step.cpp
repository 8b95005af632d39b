// cpl::cpl_step_ on CPU: the step engine's op (schema: csrc/ops.cpp; contract:
// cpl_kernels/reference_step.py). This file validates every argument, looks the kind up in
// directions.h's table and turns the runtime choices (kind variant, skip_nonfinite, grad_scale,
// then per tensor dtype and rule) into template arguments of engine.h's loop.
//
// Every entry of every list is validated before anything is written (docs/design.md section 3: an
// error leaves every tensor as it was), whatever the Python layer already checked: a bad entry
// late in the list raises before the first tensor is stepped. Errors are ValueErrors naming the
// list and index, worded as cpl_kernels/_checks.py words them.
#include <cmath>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common.h"
#include "directions.h"
#include "engine.h"
#include "ops.h"

namespace cpl {
namespace cpu {

namespace {

// The op being validated, for the messages (cpl_step_ or cpl_step_8bit_, set by each entry point).
thread_local const char* kOp = "cpl_step_";

std::string item(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << "(";
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << t.size(d);
  s << (t.dim() == 1 ? ",)" : ")");
  return s.str();
}

#define CPL_FAIL_UNLESS(cond, name, ...) \
  TORCH_CHECK_VALUE(cond, "cpl.", kOp, ": argument '", name, "' ", __VA_ARGS__)

// Layout, dtype, contiguity, device (and element count when numel >= 0), in _checks.tensor's order.
void check_tensor(const at::Tensor& t, const std::string& name, std::initializer_list<at::ScalarType> dtypes,
                  const char* expected_dtypes, int64_t numel = -1) {
  CPL_FAIL_UNLESS(t.defined(), name, "must be a tensor, got None");
  CPL_FAIL_UNLESS(t.layout() == at::kStrided, name, "must be a dense (strided) tensor, got layout ", t.layout());
  CPL_FAIL_UNLESS(std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) != dtypes.end(), name, "has dtype ",
                  dtype_name(t.scalar_type()), "; expected ", expected_dtypes);
  CPL_FAIL_UNLESS(t.is_contiguous(), name, "must be contiguous (shape ", shape_of(t), ", stride ", t.strides(),
                  "); call .contiguous()");
  CPL_FAIL_UNLESS(t.device().is_cpu(), name, "is on ", t.device(), " but the other inputs are on cpu");
  if (numel >= 0) CPL_FAIL_UNLESS(t.numel() == numel, name, "has ", t.numel(), " elements; expected ", numel);
}

void check_list_size(size_t got, size_t want, const char* name) {
  CPL_FAIL_UNLESS(got == want, name, "has ", got, " entries but 'params' has ", want);
}

double host_scalar(const at::Tensor& t, const char* name) {
  CPL_FAIL_UNLESS(t.defined() && t.numel() == 1, name, "must hold one value, got ", t.defined() ? t.numel() : 0);
  CPL_FAIL_UNLESS(t.device().is_cpu(), name, "is on ", t.device(), " but the CPU kernel reads it on the host");
  return t.item<double>();
}

// The 8-bit state format's extra arguments (cpl_step_8bit_): per slot one fp32 absmax per block,
// and the maps; state1/state2 then hold uint8 codes.
struct Blockwise8Args {
  at::TensorList absmax1, absmax2;
  const at::Tensor& qmaps;
};

// The entries of the lists, validated, with their raw pointers.
std::vector<engine::Entry> check_entries(at::TensorList params, at::TensorList grads, at::TensorList state1,
                                         at::TensorList state2, const c10::List<std::optional<at::Tensor>>& codes,
                                         int slots, const Blockwise8Args* q8, quant8::BucketTable* tables) {
  const float* qmaps = nullptr;
  if (q8) {
    check_tensor(q8->qmaps, "qmaps", {at::kFloat}, "float32", 4 * engine::kQMapEntries);
    qmaps = q8->qmaps.const_data_ptr<float>();
    for (int k = 0; k < 2; ++k)
      CPL_FAIL_UNLESS(tables[k].build(qmaps + (2 * k + 1) * engine::kQMapEntries), "qmaps",
                      "row [", k, ", 1] must hold 255 sorted thresholds in (-1, 1) and +inf, as "
                      "cpl_kernels.quant8.qmaps builds them (at most one a bucket of quant8.h, none "
                      "under 2^-24 in magnitude but a first threshold of FLT_MIN)");
  }
  const size_t n = params.size();
  std::vector<engine::Entry> entries;
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string pname = item("params", i);
    check_tensor(p, pname, {at::kFloat, at::kBFloat16, at::kHalf}, "one of: float32, bfloat16, float16");
    const int64_t numel = p.numel();
    const at::Tensor& g = grads[i];
    const std::string gname = item("grads", i);
    check_tensor(g, gname, {at::kFloat, at::kBFloat16, at::kHalf}, "one of: float32, bfloat16, float16");
    CPL_FAIL_UNLESS(g.scalar_type() == p.scalar_type() && g.sizes() == p.sizes(), gname, "has dtype ",
                    dtype_name(g.scalar_type()), " and shape ", shape_of(g), " but '", pname, "' has ",
                    dtype_name(p.scalar_type()), ", ", shape_of(p), "; they must match");
    float* s[2] = {nullptr, nullptr};
    uint8_t* q[2] = {nullptr, nullptr};
    float* absmax[2] = {nullptr, nullptr};
    for (int k = 0; k < slots; ++k) {
      const at::Tensor& t = (k == 0 ? state1 : state2)[i];
      if (q8) {
        check_tensor(t, item(k == 0 ? "state1" : "state2", i), {at::kByte}, "uint8", numel);
        const at::Tensor& a = (k == 0 ? q8->absmax1 : q8->absmax2)[i];
        check_tensor(a, item(k == 0 ? "absmax1" : "absmax2", i), {at::kFloat}, "float32",
                     ceil_div(numel, engine::kQBlock));
        q[k] = t.data_ptr<uint8_t>();
        absmax[k] = a.data_ptr<float>();
      } else {
        check_tensor(t, item(k == 0 ? "state1" : "state2", i), {at::kFloat}, "float32", numel);
        s[k] = t.data_ptr<float>();
      }
    }
    const uint32_t* code_words = nullptr;
    if (codes.size() > 0) {
      const std::optional<at::Tensor> c = codes.get(i);
      if (c.has_value() && c->defined()) {
        const std::string cname = item("codes", i);
        const int64_t words = ceil_div(numel, kCodesPerWord);
        CPL_FAIL_UNLESS(c->numel() == words, cname, "holds ", c->numel(), " int32 words but ", numel,
                        " elements need ", words, " (2-bit codes, 16 per word); was it built for another tensor?");
        check_tensor(*c, cname, {at::kInt}, "int32");
        code_words = reinterpret_cast<const uint32_t*>(c->const_data_ptr<int32_t>());
      }
    }
    entries.push_back(engine::Entry{p.data_ptr(), g.const_data_ptr(), s[0], s[1], code_words, numel, p.scalar_type(),
                                    q[0], absmax[0], q[1], absmax[1], qmaps, q8 ? tables : nullptr});
  }
  return entries;
}

// Everything one call needs once validated; `run` is instantiated per kind.
struct Call {
  at::TensorList params, grads, state1, state2;
  const c10::List<std::optional<at::Tensor>>& codes;
  const at::Tensor &step, &lr;
  at::ArrayRef<double> hyper;
  Criterion criterion;
  bool strict, skip_nonfinite;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const Blockwise8Args* q8;  // null: fp32 state (cpl_step_)
};

template <class K>
at::Tensor run(const Call& c) {
  const size_t nh = K::kHyper.size();
  if (c.hyper.size() != nh) {
    std::string names;
    for (size_t k = 0; k < nh; ++k) names += std::string(k ? ", " : "") + K::kHyper[k];
    TORCH_CHECK_VALUE(false, "cpl.", kOp, ": argument 'hyper' for kind '", K::kName, "' holds ", c.hyper.size(),
                      " values; expected ", nh, ": ", names);
  }
  const double* h = c.hyper.data();
  for (size_t k = 0; k < nh; ++k) kinds::check_named_hyper(K::kHyper[k], h[k]);
  K::check(h);
  const int slots = K::slots(h);
  const size_t n = c.params.size();
  check_list_size(c.grads.size(), n, "grads");
  for (int k = 0; k < (c.q8 ? 4 : 2); ++k) {
    static const char* const kNames[4] = {"state1", "state2", "absmax1", "absmax2"};
    const size_t got = k == 0 ? c.state1.size()
                       : k == 1 ? c.state2.size()
                       : k == 2 ? c.q8->absmax1.size()
                                : c.q8->absmax2.size();
    const char* name = kNames[k];
    if (k % 2 < slots) {
      check_list_size(got, n, name);
    } else {
      CPL_FAIL_UNLESS(got == 0, name, "has ", got, " entries but kind '", K::kName,
                      "' with these hyperparameters uses ", slots, " state slot(s): pass an empty list");
    }
  }
  CPL_FAIL_UNLESS(c.codes.size() == 0 || c.codes.size() == n, "codes", "has ", c.codes.size(),
                  " entries but 'params' has ", n);
  const double step = host_scalar(c.step, "step"), lr = host_scalar(c.lr, "lr");
  const double min_step = K::kUsesStep ? 1.0 : 0.0;
  CPL_FAIL_UNLESS(std::isfinite(step) && step >= min_step, "step", "must be a finite number >= ", min_step,
                  ", got ", step);
  CPL_FAIL_UNLESS(std::isfinite(lr) && lr >= 0.0, "lr", "must be a finite number >= 0, got ", lr);
  std::optional<float> scale;
  if (c.grad_scale.has_value() && c.grad_scale->defined()) {
    CPL_FAIL_UNLESS(c.grad_scale->is_floating_point(), "grad_scale", "must be a one-element floating-point tensor");
    scale = static_cast<float>(host_scalar(*c.grad_scale, "grad_scale"));  // rounded once, as the reference
  }
  bool skip_all = false;
  if (c.found_inf.has_value() && c.found_inf->defined()) skip_all = host_scalar(*c.found_inf, "found_inf") != 0.0;
  // 8-bit format: the thresholds of each slot as a bucket table (quant8.h), ~50 KB, per call.
  std::unique_ptr<quant8::BucketTable[]> tables(c.q8 ? new quant8::BucketTable[2] : nullptr);
  const std::vector<engine::Entry> entries =
      check_entries(c.params, c.grads, c.state1, c.state2, c.codes, slots, c.q8, tables.get());

  at::Tensor out = at::zeros({2, static_cast<int64_t>(n)}, at::kLong);
  if (n == 0 || skip_all) return out;  // found_inf: GradScaler skips the whole step, nothing written
  const int rule = c.criterion == Criterion::kUpdate ? kUpdateRule : (c.strict ? kGradientStrict : kGradientSoft);
  int64_t* counts = out.data_ptr<int64_t>();
  const float scale_value = scale.value_or(1.f);
  const auto with_flags = [&](const auto& d) {
    using D = std::decay_t<decltype(d)>;
    if (c.skip_nonfinite) {
      if (scale) return engine::run_list<D, true, true>(d, entries, rule, scale_value, counts);
      return engine::run_list<D, true, false>(d, entries, rule, scale_value, counts);
    }
    if (scale) return engine::run_list<D, false, true>(d, entries, rule, scale_value, counts);
    return engine::run_list<D, false, false>(d, entries, rule, scale_value, counts);
  };
  K::visit(h, step, lr, [&](const auto& d) {
    using D = std::decay_t<decltype(d)>;
    if (c.q8) return with_flags(engine::Blockwise8<D>(d));  // the state format: same rule, same direction
    return with_flags(d);
  });
  return out;
}

at::Tensor dispatch_kind(c10::string_view kind, const Call& call) {
  const std::string name(kind);
  at::Tensor out;
  const bool known = kinds::any_kind([&]<class K>() {
    if (name != K::kName) return false;
    out = run<K>(call);
    return true;
  });
  TORCH_CHECK_VALUE(known, "cpl.", kOp, ": argument 'kind' must be one of ", kinds::kind_names(), ", got '", name,
                    "'");
  return out;
}

Criterion check_criterion(c10::string_view criterion) {
  const std::string crit(criterion);
  CPL_FAIL_UNLESS(crit == "update" || crit == "gradient", "criterion", "must be one of ('update', 'gradient'), got '",
                  crit, "'");
  return crit == "update" ? Criterion::kUpdate : Criterion::kGradient;
}

}  // namespace

at::Tensor cpl_step_(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                     const c10::List<std::optional<at::Tensor>>& codes, c10::string_view kind,
                     const at::Tensor& step, const at::Tensor& lr, at::ArrayRef<double> hyper,
                     c10::string_view criterion, bool strict, bool skip_nonfinite,
                     const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  kOp = "cpl_step_";
  const Call call{params, grads, state1, state2, codes, step, lr, hyper, check_criterion(criterion), strict,
                  skip_nonfinite, grad_scale, found_inf, nullptr};
  return dispatch_kind(kind, call);
}

at::Tensor cpl_step_8bit_(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList absmax1,
                          at::TensorList state2, at::TensorList absmax2, const at::Tensor& qmaps,
                          const c10::List<std::optional<at::Tensor>>& codes, c10::string_view kind,
                          const at::Tensor& step, const at::Tensor& lr, at::ArrayRef<double> hyper,
                          c10::string_view criterion, bool strict, bool skip_nonfinite,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  kOp = "cpl_step_8bit_";
  const Blockwise8Args q8{absmax1, absmax2, qmaps};
  const Call call{params, grads, state1, state2, codes, step, lr, hyper, check_criterion(criterion), strict,
                  skip_nonfinite, grad_scale, found_inf, &q8};
  return dispatch_kind(kind, call);
}

}  // namespace cpu
}  // namespace cpl
