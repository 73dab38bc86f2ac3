// Entry point of the CPU PagedKVCache append kernel (torch-free; csrc/torch/paged_cache.cpp
// fills the params and calls it).
#pragma once

#include "attnkit/params.h"

namespace attnkit::cpu {

void paged_cache_append(const PagedAppendParams& params);

}  // namespace attnkit::cpu
