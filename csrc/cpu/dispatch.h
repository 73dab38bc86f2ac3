// Runs a templated CPU kernel for the element type named by a DType.
#pragma once

#include <stdexcept>

#include "attnkit/dtype.h"

namespace attnkit::cpu {

template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat16: fn(Half{}); return;
    case DType::kBFloat16: fn(BFloat16{}); return;
  }
  throw std::invalid_argument("attnkit: unsupported dtype");
}

}  // namespace attnkit::cpu
