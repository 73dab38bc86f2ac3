// Runs a templated CPU kernel for the element type named by a DType.
#pragma once

#include <stdexcept>
#include <type_traits>

#include "attnkit/dtype.h"
#include "attnkit/quant.h"

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

// Runs fn(std::integral_constant<KVFormat, F>{}) for the format F.
template <typename Fn>
void dispatch_kv_format(KVFormat format, Fn&& fn) {
  switch (format) {
    case KVFormat::kInt8: fn(std::integral_constant<KVFormat, KVFormat::kInt8>{}); return;
    case KVFormat::kInt4: fn(std::integral_constant<KVFormat, KVFormat::kInt4>{}); return;
    case KVFormat::kFp8E4M3: fn(std::integral_constant<KVFormat, KVFormat::kFp8E4M3>{}); return;
  }
  throw std::invalid_argument("attnkit: unsupported kv format");
}

}  // namespace attnkit::cpu
