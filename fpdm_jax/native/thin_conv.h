// What conv_forward.cc and conv_kernel_gradient.cc share besides common.h:
// the operand type and the FFI signature of both custom calls.
#ifndef FPDM_JAX_NATIVE_THIN_CONV_H_
#define FPDM_JAX_NATIVE_THIN_CONV_H_

#include <cstdint>

#include "common.h"

namespace fpdm_native {

using Image = ffi::Buffer<ffi::F32, 4>;  // NHWC images and HWIO kernels

// Both calls: (pool, two operands, one result, strides, top and left
// padding; bottom and right padding follow from the shapes).
inline auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<Image>()
      .Arg<Image>()
      .Ret<Image>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_left");
}

}  // namespace fpdm_native

#endif  // FPDM_JAX_NATIVE_THIN_CONV_H_
