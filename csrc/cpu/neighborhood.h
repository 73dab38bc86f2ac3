// Entry points of the CPU neighborhood attention kernels (forward, backward). Torch-free apart
// from at::parallel_for; csrc/torch/neighborhood.cpp fills the params.
#pragma once

#include "attnkit/params.h"

namespace attnkit::cpu {

void neighborhood_fwd(const NeighborhoodParams& params);
void neighborhood_bwd(const NeighborhoodBwdParams& params);

}  // namespace attnkit::cpu
