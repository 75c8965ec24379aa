"""Patches of the convolutions without a hand-tuned layout: ``nn.Conv3d`` and the transposed
convolutions ``nn.ConvTranspose1d/2d/3d`` (``groups = 1``).

Both are seen, like every Kronecker layer, as one weight shared by ``T`` positions per datum
(:mod:`.capture`): rows ``a [B, T, d_in]`` and output-gradients ``g [B, T, d_out]`` whose
per-example weight gradient is ``sum_t g_t a_t^T`` in the matrix view of the weight.

* ``nn.Conv3d``, weight ``[C_out, C_in, k1, k2, k3]``: ``a_t`` is the input patch read by output
  voxel ``t`` (columns ``(c, k1, k2, k3)``, the order of ``W.reshape(C_out, -1)``), ``g_t`` the
  output-gradient at ``t`` (``C_out``): exactly the Conv2d construction in three dimensions.
* ``nn.ConvTranspose{n}d``, weight ``[C_in, C_out, *k]``: input position ``p`` scatters
  ``u_p = W^T x_p`` (``C_out prod(k)`` numbers, ``W`` viewed ``[C_in, C_out prod(k)]``) into the
  output at ``q = p s + k d - pad``, so ``dL/dW = sum_p x_p u'_p^T`` with
  ``u'_p[o, k] = dL/dy[o, p s + k d - pad]``: the output-gradient unfolded like a convolution's
  input with the layer's kernel, stride, padding and dilation, cropped to the input's positions
  (``output_padding`` only adds output positions that no patch reads twice). The positions are
  the *input* positions (``a_t = x_t``, ``C_in``), the weight is stored ``[d_in, d_out]``
  (``LayerSpec.transposed``: its block is ``A (x) G`` in ``W.flatten()`` order). The bias adds
  ``b[o]`` at every output position, not per input position, so it gets a diagonal block.

Grouped convolutions (``groups = g > 1``, :mod:`laplace_kron.kron_groups`): the rows of the whole
layer, columns ``(c, k)``, hold group ``j``'s patch in the ``j``-th run of ``I/g prod(k)`` columns
(a joint bias gets a ones column per group), its output-gradient in the ``j``-th run of ``O/g``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gram import per_example_sq

__all__ = [
    "CONV_TRANSPOSED",
    "GENERIC_CONVS",
    "conv_input_rows",
    "conv_output_rows",
    "generic_layout",
    "grouped_sq",
    "patches_nd",
    "rotate_groups",
]

CONV_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Layers whose rows are built here (Conv1d / Conv2d keep capture.native_patches' layouts).
GENERIC_CONVS = (nn.Conv3d, *CONV_TRANSPOSED)


def generic_layout(module: nn.Module) -> bool:
    """Whether a layer's rows are built here (in weight order): Conv3d, transposed and grouped
    convolutions (a group's input channels are one contiguous run of the ``(c, k)`` columns)."""
    return isinstance(module, GENERIC_CONVS) or getattr(module, "groups", 1) > 1


def patches_nd(
    x: Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
    size: tuple[int, ...] | None = None,
) -> Tensor:
    """Zero-padded patches of ``x [B, C, *S]`` (``n`` spatial axes): ``[B, T, C prod(k)]`` with
    columns ``(c, k_1, ..., k_n)`` and ``T`` the output positions of the convolution (the first
    ``size`` of them per axis if given)."""
    n = len(kernel)
    xp = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    for j in range(n):
        xp = xp.unfold(2 + j, dilation[j] * (kernel[j] - 1) + 1, stride[j])
    # [B, C, o_1..o_n, span_1..span_n]: keep every d-th element of each window.
    xp = xp[(..., *(slice(None, None, d) for d in dilation))]
    if size is not None:
        xp = xp[(slice(None), slice(None), *(slice(0, s) for s in size))]
    B, outs = xp.shape[0], xp.shape[2 : 2 + n]
    perm = (0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
    return xp.permute(perm).reshape(B, math.prod(outs), -1)


def conv_input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """A :data:`GENERIC_CONVS` layer's input ``x [B, C_in, *S]`` -> rows ``[B, T, d_in]``
    (a transposing view for a transposed convolution: ``T`` input positions, ``C_in`` columns)."""
    if isinstance(module, CONV_TRANSPOSED):
        return x.flatten(2).transpose(1, 2)
    return patches_nd(x, module.kernel_size, module.dilation, module.padding, module.stride)


def conv_output_rows(module: nn.Module, gy: Tensor, in_size: tuple[int, ...]) -> Tensor:
    """A :data:`GENERIC_CONVS` layer's output-gradient ``gy [B, C_out, *S_out]`` -> ``[B, T,
    d_out]`` (``in_size``: the spatial size of the call's input, the positions of a transposed
    convolution)."""
    if isinstance(module, CONV_TRANSPOSED):
        m = module
        return patches_nd(gy, m.kernel_size, m.dilation, m.padding, m.stride, tuple(in_size))
    return gy.flatten(2).transpose(1, 2)


def rotate_groups(x: Tensor, Q: Tensor) -> Tensor:
    """Per group ``x_j Q_j``: ``x [..., g d]``, ``Q [g, d, d']`` -> ``[..., g d']``."""
    return torch.einsum("...gi,gij->...gj", x.unflatten(-1, (Q.shape[0], -1)), Q).flatten(-2)


def grouped_sq(a: Tensor, g: Tensor, groups: int, chunk: int | None = None) -> Tensor:
    """:func:`~.gram.per_example_sq` per group: ``a [B, T, g i]``, ``g [K, B, T, g o]`` ->
    ``[g, o, i]`` (the squared per-example gradients of each group's weight)."""
    a, g = a.unflatten(-1, (groups, -1)), g.unflatten(-1, (groups, -1))
    kw = {} if chunk is None else {"chunk": chunk}
    return torch.stack([per_example_sq(a[..., j, :], g[..., j, :], **kw) for j in range(groups)])
