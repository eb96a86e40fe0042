"""3x3 stride-1 convolutions as Winograd F(2x2, 3x3): 2.25x fewer multiplies.

Every 2x2 block of output pixels depends on a 4x4 window of the input.
Winograd's minimal filtering algorithm (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016) computes the block as

    Y = A^T [ sum_c (G g_c G^T) * (B^T d_c B) ] A

where d_c is the 4x4 window of input channel c, g_c the 3x3 kernel from that
channel and "*" the elementwise product. The sum over channels is 16
independent [tiles, C_in] x [C_in, C_out] matmuls, one per position in the
transformed 4x4 window: 16 multiplies per 4 outputs instead of 36. B^T, G
and A^T hold only 0, +-1 and +-1/2, so the transforms are additions, which
XLA fuses into elementwise loops around the matmuls, and the result stays
within float32 rounding of a direct convolution (tests/test_convolution.py
states the tolerance).

The gradients are JAX's autodiff of the same expression: the input gradient
runs the transforms backwards around the transposed matmuls, and the kernel
gradient is 16 matmuls contracting over the tiles. So all three parts of a
convolution's training cost get the 2.25x, which no direct convolution can:
at the UNet's 256-channel 8x8 level XLA's and torch's oneDNN convolutions
both already run at about this machine's matmul rate (benchmarks/README.md,
finding 24). Where the images are larger or the channels fewer, the
transforms' memory traffic (the transformed input is 4x the input) costs
more than the multiplies saved; F(4x4, 3x3), 4x fewer multiplies but 36
transformed positions, was slower still at every UNet shape written this
way. The native calls (``models.native_conv``), which keep the transformed
input in cache, run both; ``kernel_transform`` gives either's kernel.
``models.convolution`` decides where each is used.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Lavin & Gray's F(2x2, 3x3) transforms: input B^T (4x4), kernel G (4x3),
# output A^T (2x4).
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))
# F(4x4, 3x3)'s kernel transform G (6x3; interpolation points 0, 1, -1, 2, -2
# and infinity), for the native forward (fpdm_jax/native/winograd.cc has its
# B^T and A^T).
_G4 = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
       (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def _apply(matrix, xs):
  """[sum_k matrix[i][k] * xs[k] for each row i]: a constant matrix applied
  across a list of equal-shaped arrays, as additions where a coefficient is
  +-1, so that XLA fuses it into one elementwise loop."""
  out = []
  for row in matrix:
    acc = None
    for c, x in zip(row, xs):
      if c == 0:
        continue
      term = x if abs(c) == 1 else c * x
      if acc is None:
        acc = -term if c == -1 else term
      else:
        acc = acc - term if c == -1 else acc + term
    out.append(acc)
  return out


def kernel_transform(w: jax.Array, tile: int = 2) -> jax.Array:
  """G g G^T of a 3x3 HWIO kernel ``w``, per input and output channel, as
  [(tile + 2)^2, C_in, C_out] (row-major over the transformed window):
  F(2x2, 3x3)'s for ``tile`` 2, F(4x4, 3x3)'s for 4."""
  if w.shape[:2] != (3, 3):
    raise ValueError(f"winograd.kernel_transform: a 3x3 kernel only, got {w.shape}")
  if tile not in (2, 4):
    raise ValueError(f"winograd.kernel_transform: tile 2 or 4, got {tile}")
  if tile == 4:
    return _kernel_transform_4x4(w)
  u = jnp.stack([c for r in _apply(_G, list(w)) for c in _apply(_G, list(r))])
  return u.reshape(16, *w.shape[2:])


def flipped_kernel_transform_4x4(w: jax.Array) -> jax.Array:
  """F(4x4, 3x3)'s transform of ``w`` flipped in space with its channels
  swapped, [36, C_out, C_in]: the kernel of the input gradient."""
  return _kernel_transform_4x4(w[::-1, ::-1].transpose(0, 1, 3, 2))


def _kernel_transform_4x4(w):
  """(G4 x G4) [36, 9] times the kernel's 9 taps: one matmul over all the
  channels. As 36 sums of scaled taps (the F(2x2) transform's form), XLA
  made 36 loops of each: 1.7-4.6x slower alone, 1.5-3.3x for the input
  gradient's flipped, transposed kernel, and in the medium batch-8 step the
  weight-only ops went from 55 to 129 ms (benchmarks/README.md, finding 31)."""
  g4 = jnp.asarray(_G4, jnp.float32)
  gg = (g4[:, None, :, None] * g4[None, :, None, :]).reshape(36, 9)
  return jnp.einsum("kn,nio->kio", gg, w.reshape(9, *w.shape[2:]),
                    precision=lax.Precision.HIGHEST)


def conv3x3(x: jax.Array, w: jax.Array, padding, precision=None) -> jax.Array:
  """The stride-1 NHWC x HWIO convolution of ``x`` [B, H, W, C_in] with a 3x3
  kernel ``w`` [3, 3, C_in, C_out] and explicit ``padding`` ((top, bottom),
  (left, right)), as ``lax.conv_general_dilated`` computes it (``precision``
  is the matmuls'). An odd output size is computed one row or column larger
  and cut.
  """
  if w.shape[:2] != (3, 3):
    raise ValueError(f"winograd.conv3x3: a 3x3 kernel only, got {w.shape}")
  b, h, wd, cin = x.shape
  cout = w.shape[3]
  (top, bottom), (left, right) = padding
  ho, wo = h + top + bottom - 2, wd + left + right - 2
  th, tw = -(-ho // 2), -(-wo // 2)  # 2x2 output tiles
  # Tile (ty, tx) reads padded rows 2ty .. 2ty + 3 and columns 2tx .. 2tx + 3.
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, 2 * th + 2 - h - top, 0),
                                           (left, 2 * tw + 2 - wd - left, 0), (0, 0, 0)))
  rows = _apply(_BT, [lax.slice_in_dim(xp, k, k + 2 * th - 1, stride=2, axis=1)
                      for k in range(4)])
  v = jnp.stack([c for r in rows
                 for c in _apply(_BT, [lax.slice_in_dim(r, k, k + 2 * tw - 1, stride=2, axis=2)
                                       for k in range(4)])])
  v = v.reshape(16, b * th * tw, cin)
  m = lax.dot_general(v, kernel_transform(w), (((2,), (1,)), ((0,), (0,))),  # [16, tiles, C_out]
                      precision=precision)
  m = m.reshape(4, 4, b, th, tw, cout)
  y = [_apply(_AT, list(mk)) for mk in _apply(_AT, list(m))]  # y[a][c]: [B, th, tw, C_out]
  y = jnp.stack([jnp.stack(ya, axis=3) for ya in y], axis=2)  # [B, th, 2, tw, 2, C_out]
  return y.reshape(b, 2 * th, 2 * tw, cout)[:, :ho, :wo]
