// Entry points of the C++ CPU kernels. Torch-free (the kernels use at::parallel_for only
// for threading); csrc/torch fills the params and calls these.
#pragma once

#include "attnkit/params.h"

namespace attnkit::cpu {

void attention_fwd(const AttentionParams& params);
void attention_bwd(const AttentionBwdParams& params);
void decode(const DecodeParams& params);
void merge_attention_states(const MergeParams& params);

}  // namespace attnkit::cpu
