"""Thin convolutions' forward and kernel gradient as native XLA:CPU custom calls.

Convolutions with 3-96 channels on one side (the pose embedding at 64x64 to
256x256, a small UNet) are where XLA:CPU's convolution kernels are furthest
behind PyTorch's oneDNN. Worst is the kernel gradient, which XLA runs as a
convolution contracting over batch and pixels, 2-3x slower than oneDNN
(benchmarks/README.md, finding 20); no ``lax`` rewrite of it was faster in the
step (finding 20 lists the forms tried). The forward, and the stride-1 input
gradient (a forward convolution of the output gradient with the flipped,
transposed kernel), are 1.1-1.9x behind. fpdm_jax/native/ has the loop nests
oneDNN uses for both, registered with XLA through its FFI and run on XLA's own
thread pool (findings 21 and 22; ``python -m benchmarks.kernel_gradient``).

The same library has fused Winograd F(2x2, 3x3) and F(4x4, 3x3)
convolutions for 3x3 stride-1 convs with 16+ channels (``winograd_forward``,
their input gradient too, and ``winograd_kernel_gradient``): 2.25x and 4x
fewer multiplies, where direct convolutions are already at the matmul rate
(findings 25, 26 and 31).

``models.native`` loads the build this CPU can run; without one the
convolution keeps XLA's kernels. ``models.convolution`` decides where each is
used; ``FPDM_CONV_NATIVE_KERNEL_GRADIENT=0``, ``FPDM_CONV_NATIVE_FORWARD=0``,
``FPDM_CONV_NATIVE_WINOGRAD=0`` and ``FPDM_CONV_NATIVE_WINOGRAD_KERNEL_GRADIENT=0``
(the Winograd kernel gradient alone) turn each off, to measure it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fpdm_jax import xla_cpu_flags
from fpdm_jax.models import native, winograd

KERNEL_GRADIENT_OPT_OUT = "FPDM_CONV_NATIVE_KERNEL_GRADIENT"
FORWARD_OPT_OUT = "FPDM_CONV_NATIVE_FORWARD"
WINOGRAD_OPT_OUT = "FPDM_CONV_NATIVE_WINOGRAD"
WINOGRAD_KERNEL_GRADIENT_OPT_OUT = "FPDM_CONV_NATIVE_WINOGRAD_KERNEL_GRADIENT"


def forward_available() -> bool:
  """Whether the native forward is built, loaded and not switched off."""
  return not xla_cpu_flags.opted_out(FORWARD_OPT_OUT) and native.target_prefix() is not None


def winograd_available() -> bool:
  """Whether the native Winograd convolution is built, loaded and not switched off."""
  return not xla_cpu_flags.opted_out(WINOGRAD_OPT_OUT) and native.target_prefix() is not None


def winograd_kernel_gradient_available() -> bool:
  """Whether the native Winograd kernel gradient is built, loaded and not
  switched off (``FPDM_CONV_NATIVE_WINOGRAD=0`` switches it off too)."""
  return not xla_cpu_flags.opted_out(WINOGRAD_KERNEL_GRADIENT_OPT_OUT) and winograd_available()


def kernel_gradient_available() -> bool:
  """Whether the native kernel gradient is built, loaded and not switched off."""
  return (not xla_cpu_flags.opted_out(KERNEL_GRADIENT_OPT_OUT)
          and native.target_prefix() is not None)


def _check(name, a, b, cout):
  if a.dtype != jnp.float32 or b.dtype != jnp.float32 or cout % 8:
    raise ValueError(f"native conv {name}: float32 and C_out % 8 == 0 only, got "
                     f"{a.dtype}, {b.dtype}, {cout} output channels")


def _attrs(strides, padding) -> dict:
  (top, _), (left, _) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(top), pad_left=np.int64(left))


def forward(x, w, out_size, strides, padding):
  """The NHWC x HWIO float32 convolution of ``x`` [B, H, W, C_in] with ``w``
  [kh, kw, C_in, C_out], ``strides`` and explicit ``padding`` ((top, bottom),
  (left, right)), of output size ``out_size`` (Ho, Wo): bottom and right
  padding need no argument, whatever the output reaches beyond the image is
  zero. C_out must be a multiple of 8. Call only where ``forward_available()``.
  """
  _check("forward", x, w, w.shape[3])
  out = jax.ShapeDtypeStruct((x.shape[0], *out_size, w.shape[3]), jnp.float32)
  call = jax.ffi.ffi_call(native.target_prefix() + "_conv_forward", out, vmap_method="sequential")
  return call(x, w, **_attrs(strides, padding))


def input_gradient(dy, w, x_shape, padding):
  """d(loss)/d(input) of a stride-1 convolution: the forward convolution of the
  output gradient ``dy`` with the kernel flipped in space and transposed in
  channels, padded kh - 1 - top and kw - 1 - left (top and left must be at
  most kh - 1 and kw - 1), out to the input's size. C_in must be a multiple
  of 8."""
  kh, kw = w.shape[:2]
  (top, _), (left, _) = padding
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  return forward(dy, w_t, x_shape[1:3], (1, 1),
                 ((kh - 1 - top, 0), (kw - 1 - left, 0)))


def kernel_gradient(x, dy, kernel_shape, strides, padding):
  """d(loss)/d(kernel), [kh, kw, C_in, C_out] float32, of an NHWC x HWIO
  float32 convolution with input ``x``, output cotangent ``dy``, ``strides``
  and explicit ``padding`` ((top, bottom), (left, right)).

  Bottom and right padding need no argument: whatever input row or column
  ``dy``'s size reaches beyond the image is zero. C_out must be a multiple of 8.
  Call only where ``kernel_gradient_available()``.
  """
  _check("kernel gradient", x, dy, kernel_shape[3])
  call = jax.ffi.ffi_call(native.target_prefix() + "_conv_kernel_gradient",
                          jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                          vmap_method="sequential")
  return call(x, dy, **_attrs(strides, padding))


def winograd_forward(x, u, out_size, padding):
  """The stride-1 NHWC float32 convolution of ``x`` with the 3x3 kernel whose
  Winograd transform is ``u`` (``winograd.kernel_transform``): [16, C_in,
  C_out] as F(2x2, 3x3), [36, C_in, C_out] as F(4x4, 3x3), with the input and
  output transforms fused with the matmuls (fpdm_jax/native/winograd.cc;
  ``models.winograd`` has the algorithm). ``padding`` as ``forward``'s, top
  and left at most 2; C_in and C_out multiples of 8. Call only where
  ``winograd_available()``."""
  if x.dtype != jnp.float32 or u.dtype != jnp.float32 or u.shape[0] not in (16, 36):
    raise ValueError(f"native Winograd: float32 input and [16 or 36, C_in, C_out] transform "
                     f"only, got {x.dtype}, {u.dtype} {u.shape}")
  if x.shape[3] != u.shape[1] or u.shape[1] % 8 or u.shape[2] % 8:
    raise ValueError(f"native Winograd: input channels {x.shape[3]}, transform {u.shape}: "
                     "channels must match and be multiples of 8")
  (top, _), (left, _) = padding
  out = jax.ShapeDtypeStruct((x.shape[0], *out_size, u.shape[2]), jnp.float32)
  call = jax.ffi.ffi_call(native.target_prefix() + "_winograd_forward", out,
                          vmap_method="sequential")
  return call(x, u, pad_top=np.int64(top), pad_left=np.int64(left))


def winograd_kernel_gradient(x, dy, padding, tile=2):
  """``kernel_gradient`` of a 3x3 stride-1 convolution as Winograd F(3x3, 2x2)
  (``tile`` 2) or F(3x3, 4x4) (4): the forward's input transform, the output
  gradient's ``tile`` x ``tile`` blocks transformed and 16 or 36 matmuls
  contracting over the tiles, 2.25x or 4x fewer multiply-adds
  (fpdm_jax/native/winograd.cc). ``padding`` as ``forward``'s, top and left at
  most 2; C_in and C_out multiples of 8. Call only where
  ``winograd_kernel_gradient_available()``."""
  if tile not in (2, 4):
    raise ValueError(f"native Winograd kernel gradient: tile 2 or 4, got {tile}")
  if x.dtype != jnp.float32 or dy.dtype != jnp.float32 or x.shape[3] % 8 or dy.shape[3] % 8:
    raise ValueError(f"native Winograd kernel gradient: float32 and channels % 8 == 0 only, "
                     f"got {x.dtype} {x.shape}, {dy.dtype} {dy.shape}")
  (top, _), (left, _) = padding
  out = jax.ShapeDtypeStruct((3, 3, x.shape[3], dy.shape[3]), jnp.float32)
  call = jax.ffi.ffi_call(native.target_prefix() + "_winograd_kernel_gradient", out,
                          vmap_method="sequential")
  return call(x, dy, pad_top=np.int64(top), pad_left=np.int64(left), tile=np.int64(tile))


# Winograd's G maps a kernel flipped in space to the transform flipped in its
# first and last positions: G J = P G, J the 3x3 reversal and P the 4x4
# permutation swapping 0 and 3. So the flipped kernel's transform is the
# kernel's own with positions (r, s) -> (P r, P s).
_FLIP = (3, 1, 2, 0)


def winograd_input_gradient(dy, w, x_shape, padding, tile=2):
  """``input_gradient`` of a 3x3 stride-1 convolution through
  ``winograd_forward`` with ``tile`` x ``tile`` output tiles (2 or 4). For
  F(2x2, 3x3) the flipped, transposed kernel's transform is the kernel's own
  (the forward's expression again) permuted and transposed: transforming the
  flipped, transposed kernel itself, XLA split the work into 16 strided
  passes over the kernel, which cost more than the matmuls. F(4x4, 3x3)'s
  points have no such symmetry (2 would have to map to 1/2): its input
  gradient transforms the flipped, transposed kernel."""
  (top, _), (left, _) = padding
  _, _, cin, cout = w.shape
  if tile == 2:
    u = winograd.kernel_transform(w).reshape(4, 4, cin, cout)
    u_t = u[_FLIP, :][:, _FLIP].transpose(0, 1, 3, 2).reshape(16, cout, cin)
  else:
    u_t = winograd.flipped_kernel_transform_4x4(w)
  return winograd_forward(dy, u_t, x_shape[1:3], ((2 - top, 0), (2 - left, 0)))
