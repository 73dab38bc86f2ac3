// Entry points of the CPU page-selection kernels (Quest page scores, top-k page choice).
// Torch-free apart from at::parallel_for; csrc/torch/page_select.cpp fills the params.
#pragma once

#include "attnkit/params.h"

namespace attnkit::cpu {

void page_scores(const PageScoresParams& params);
void select_pages(const SelectPagesParams& params);

}  // namespace attnkit::cpu
