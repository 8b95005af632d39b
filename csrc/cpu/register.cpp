// CPU implementations of the cpl:: ops declared in csrc/ops.cpp.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(cpl, CPU, m) {
  m.impl("cpl_step_", &cpl::cpu::cpl_step_);
  m.impl("cpl_step_8bit_", &cpl::cpu::cpl_step_8bit_);
  m.impl("pack_signs_", &cpl::cpu::pack_signs_);
  m.impl("contribution_stats", &cpl::cpu::contribution_stats);
  m.impl("contribution_stats_codes", &cpl::cpu::contribution_stats_codes);
  m.impl("masked_adamw_step_", &cpl::cpu::masked_adamw_step_);
  m.impl("cpl_mask_words", &cpl::cpu::cpl_mask_words);
}
