"""Hooks recording the covered layers' inputs and output-gradients (which layers: selection.py).

Each covered layer is seen as ``y = W a + b`` applied at ``T`` shared positions per datum:
``T = prod`` of the middle axes for ``nn.Linear`` on ``[B, ..., D]`` and the number of output
pixels for convolutions (whose inputs are unfolded into patches ``[B, T, C_in * prod(k)]``; a
transposed convolution's positions are its input pixels and its output-gradients are unfolded
into output patches instead, :mod:`.convs`).
A layer called several times in one forward pass (weight tying) contributes the positions of
every call. The capture returns, per layer, inputs ``a [B, T, d_in]`` (with a trailing column of
ones when the bias is treated jointly) and output-gradients ``g [K, B, T, d_out]`` for the ``K``
output-gradient vectors backpropagated from the network output.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convs import CONV_TRANSPOSED, conv_input_rows, conv_output_rows, generic_layout
from .selection import SUPPORTED_TYPES, LayerSpec, select_layers
from .uses import UseRecorder, rows3

__all__ = [
    "LayerSpec",
    "select_layers",
    "Capture",
    "SUPPORTED_TYPES",
    "Workspace",
    "native_patches",
    "join_use_gradients",
    "native_to_weight_order",
    "output_rows",
    "unfold_input",
]


def _conv_geometry(module: nn.Module):
    """``(kernel, dilation, padding, stride)`` as 2-D tuples (Conv1d is a 1 x L convolution)."""
    if isinstance(module, nn.Conv1d):
        return (
            (1, module.kernel_size[0]),
            (1, module.dilation[0]),
            (0, module.padding[0]),
            (1, module.stride[0]),
        )
    return module.kernel_size, module.dilation, module.padding, module.stride


class Workspace:
    """Buffers reused across batches, keyed by name.

    Fresh multi-megabyte temporaries per batch are served by glibc as new ``mmap`` regions that
    the kernel zero-fills page by page; reusing one buffer per layer removes those page faults
    (which cost the benchmark CNN's fit about 30% before, docs/benchmarks.md).
    """

    def __init__(self) -> None:
        self._bufs: dict = {}

    def get(self, key, shape: tuple[int, ...], like: Tensor, fill: float | None = None) -> Tensor:
        """A tensor of ``shape`` (dtype and device of ``like``), the same one for equal calls.

        ``fill`` initialises it when it is (re)allocated only: callers rely on the parts they
        never write (a zero padding border, a column of ones) keeping that value.
        """
        buf = self._bufs.get(key)
        if (
            buf is None
            or buf.shape != shape
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            if fill is not None:
                buf.fill_(fill)
            self._bufs[key] = buf
        return buf

    def clear(self) -> None:
        self._bufs.clear()


def native_patches(
    module: nn.Module,
    x: Tensor,
    workspace: Workspace | None = None,
    key=None,
    ones_column: bool = False,
) -> Tensor:
    """Layer input -> ``[B, T, d_in (+1)]`` rows in the layer's *native* column order.

    For ``nn.Linear`` that is the weight's column order. For convolutions the columns are ordered
    ``(kernel row, kernel column, input channel)``: the input is made channels-last once and every
    patch is then a strided window of it, so the patch matrix is a single copy with contiguous
    runs of ``C_in`` numbers (im2col writes ``(channel, kernel row, kernel column)`` columns
    with scattered reads and, for the row layout needed here, a second transposing copy; measured
    9-34x slower for 128 inputs of the benchmark CNNs). :func:`native_to_weight_order` maps the columns to the weight's order.

    With a ``workspace`` the rows are written into buffers that the next call with the same
    ``key`` overwrites (and ``ones_column`` appends a constant-1 column, for a joint bias, at no
    extra copy); without one, ``ones_column`` must be False.
    """
    if ones_column and workspace is None:
        raise ValueError("ones_column=True needs a workspace")
    linear = isinstance(module, nn.Linear)
    if linear or generic_layout(module):  # Conv3d, transposed, grouped convs: weight order
        rows = x.reshape(x.shape[0], -1, x.shape[-1]) if linear else conv_input_rows(module, x)
        if not ones_column:
            return rows
        B, T, D = rows.shape
        out = workspace.get((key, "rows"), (B, T, D + 1), x, fill=1.0)
        out[..., :D].copy_(rows)
        return out
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(2)
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = _conv_geometry(module)
    B, C, H, W = x.shape
    H, W = H + 2 * ph, W + 2 * pw
    oh, ow = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    D = kh * kw * C
    if _channel_first(module):
        # Few columns: write [B, D, T] (runs along output columns are contiguous) and return its
        # transposed view; the caller forms the Gram matrix with one batched product.
        if workspace is None:
            xp = F.pad(x, (pw, pw, ph, ph))
        else:
            xp = workspace.get((key, "nchw"), (B, C, H, W), x, fill=0.0)
            xp[:, :, ph : H - ph, pw : W - pw].copy_(x)
        s0, s1, s2, s3 = xp.stride()
        view = xp.as_strided((B, C, kh, kw, oh, ow), (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw))
        if workspace is None:
            return view.reshape(B, D, oh * ow).transpose(1, 2)
        out = workspace.get((key, "patches_cf"), (B, D + ones_column, oh * ow), x, fill=1.0)
        out[:, :D].view(B, C, kh, kw, oh, ow).copy_(view)
        return out.transpose(1, 2)
    nhwc = x.permute(0, 2, 3, 1)
    if workspace is None:
        xl = F.pad(nhwc, (0, 0, pw, pw, ph, ph)).contiguous()
    else:
        xl = workspace.get((key, "nhwc"), (B, H, W, C), x, fill=0.0)
        xl[:, ph : H - ph, pw : W - pw].copy_(nhwc)
    s0, s1, s2, s3 = xl.stride()
    view = xl.as_strided((B, oh, ow, kh, kw, C), (s0, s1 * sh, s2 * sw, s1 * dh, s2 * dw, s3))
    if workspace is None:
        return view.reshape(B, oh * ow, D)
    out = workspace.get((key, "patches"), (B, oh * ow, D + ones_column), x, fill=1.0)
    out[..., :D].view(B, oh, ow, kh, kw, C).copy_(view)
    return out


# Convolutions with at most this many patch columns get channel-first patches (see below).
_CHANNEL_FIRST_MAX_COLUMNS = 32


def _channel_first(module: nn.Module) -> bool:
    """Whether :func:`native_patches` lays a convolution's patches out channel-first.

    With few columns (e.g. 1-3 input channels) a channels-last patch row is a handful of scattered
    numbers and a ``[B T, d]`` Gram product is a tall skinny GEMM, both slow; ``[B, d, T]`` has
    contiguous runs and a batched product (measured about 4x faster for ``d = 10``).
    """
    if isinstance(module, nn.Linear):
        return False
    return module.weight[0].numel() <= _CHANNEL_FIRST_MAX_COLUMNS


def native_to_weight_order(module: nn.Module) -> Tensor | None:
    """Index ``idx`` with ``weight_order_rows = native_rows[..., idx]`` (``None``: identical).

    The Kronecker factor of the weight view ``W.reshape(d_out, -1)`` in weight order is
    ``A_w = A_native[idx][:, idx]``.
    """
    if isinstance(module, nn.Linear) or generic_layout(module) or _channel_first(module):
        return None
    (kh, kw), _, _, _ = _conv_geometry(module)
    C = module.in_channels
    return torch.arange(kh * kw * C).reshape(kh, kw, C).permute(2, 0, 1).reshape(-1)


def unfold_input(module: nn.Module, x: Tensor) -> Tensor:
    """Layer input -> ``[B, T, d_in]`` rows ``a`` with ``output = W a (+ b)`` at each position
    (columns in the order of ``W.reshape(d_out, -1)``)."""
    rows = native_patches(module, x)
    idx = native_to_weight_order(module)
    return rows if idx is None else rows[..., idx.to(rows.device)]


def flatten_output(module: nn.Module | LayerSpec, y: Tensor) -> Tensor:
    """Layer output (or its gradient) -> ``[B, T, d_out]`` (``module``: the layer or its spec)."""
    linear = module.linear_like if isinstance(module, LayerSpec) else isinstance(module, nn.Linear)
    if linear:
        return rows3(y)
    return y.flatten(2).transpose(1, 2)


def output_rows(module: nn.Module, g: Tensor, x: Tensor) -> Tensor:
    """A module call's output-gradient ``[B, ...]`` -> ``[B, T, d_out]`` (``x``: the call's
    input): :func:`flatten_output` (a view of a convolution's channel-first tensor), or the
    unfolded output patches of a transposed convolution (:func:`conv_output_rows`)."""
    if isinstance(module, CONV_TRANSPOSED):
        return conv_output_rows(module, g, x.shape[2:])
    return flatten_output(module, g)


def _cat_uses(parts: list[Tensor], lead: int = 0) -> Tensor:
    """Concatenate the uses' ``[..., B_u, T_u, d]`` along the positions; uses that see the
    positions flattened into the batch axis (``B_u = B R``) are first read as ``[B, R T_u, d]``."""
    if len(parts) == 1:
        return parts[0]
    b = min(p.shape[lead] for p in parts)
    if any(p.shape[lead] % b for p in parts):
        raise ValueError(
            f"the uses of one weight see {[p.shape[lead] for p in parts]} rows: not multiples of "
            "one batch size"
        )
    parts = [p.reshape(*p.shape[:lead], b, -1, p.shape[-1]) for p in parts]
    return torch.cat(parts, dim=lead + 1)


def join_use_gradients(spec: LayerSpec, grads: list[Tensor], lead: int = 0) -> Tensor:
    """The output-gradients of a layer's recorded uses (each ``[*L, B_u, ..., d_rows]`` with
    ``lead`` leading axes ``L``) as one ``[*L, B, T, d_out]``: zero outside each use's rows,
    positions of all uses concatenated (KFAC-expand over uses)."""
    parts = []
    for g, rows in zip(grads, spec.rows, strict=True):
        if g.ndim == lead + 1:  # one unbatched row
            g = g.reshape(*g.shape[:lead], 1, 1, -1)
        g = g.reshape(*g.shape[: lead + 1], -1, g.shape[-1])
        if rows is not None:
            full = g.new_zeros(*g.shape[:-1], spec.d_out)
            full[..., rows[0] : rows[1]] = g
            g = full
        parts.append(g)
    return _cat_uses(parts, lead)


def _cat1(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class Capture:
    """Context manager recording inputs and outputs of the covered layers during a forward pass."""

    def __init__(self, specs: Iterable[LayerSpec], batch_size: int | None = None):
        self.specs = list(specs)
        self._handles: list = []
        self._paused = False
        used = [s for s in self.specs if s.by_use]
        self._recorder = UseRecorder(used) if used else None
        if self._recorder is not None:  # embeddings shared by the batch are broadcast to it
            self._recorder.batch_size = batch_size

    def __enter__(self) -> Capture:
        self.clear()
        if self._recorder is not None:
            self._recorder.paused = False
            self._recorder.__enter__()
        for spec in self.specs:
            if spec.by_use:
                continue

            def hook(mod, inp, out, spec=spec):
                if self._paused:
                    return
                spec.inputs.append(inp[0].detach())
                spec.outputs.append(out)

            self._handles.append(spec.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._recorder is not None:
            self._recorder.__exit__(*exc)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside (other forward passes, e.g. the diagonal blocks' per-example
        calls, must not add to the captured calls)."""
        self._paused = True
        if self._recorder is not None:
            self._recorder.paused = True
        try:
            yield
        finally:
            self._paused = False
            if self._recorder is not None:
                self._recorder.paused = False

    def clear(self) -> None:
        for spec in self.specs:
            spec.inputs.clear()
            spec.outputs.clear()
            spec.rows.clear()

    def layer_inputs(
        self,
        spec: LayerSpec,
        augment: bool = True,
        native: bool = False,
        workspace: Workspace | None = None,
    ) -> Tensor:
        """``[B, T, d_in (+1)]`` unfolded inputs of all calls, with a ones column if joint (and
        ``augment``); columns in weight order, or in :func:`native_patches` order (written into
        ``workspace`` buffers if given) if ``native``."""
        if not spec.inputs:
            if spec.by_use:
                raise ValueError(
                    f"layer {spec.name!r}: its weight was not used in the forward pass through a "
                    "call the capture records (F.linear, addmm / matmul, attention); leave it out "
                    "of modules=[...] or freeze it with requires_grad_(False)"
                )
            raise ValueError(
                f"layer {spec.name!r} ({type(spec.module).__name__}) was never called as a module "
                "in the forward pass (its weight is used functionally, e.g. F.linear(x, "
                "layer.weight)), so its Kronecker factors cannot be captured. Leave it out of "
                "modules=[...] or freeze it with requires_grad_(False)"
            )
        ones = spec.joint and augment
        if spec.by_use:
            a = _cat_uses(spec.inputs)
            if not ones:
                return a
            if workspace is None:
                return torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            out = workspace.get((spec.name, "rows"), (*a.shape[:2], a.shape[2] + 1), a, fill=1.0)
            out[..., :-1].copy_(a)
            return out
        if spec.groups > 1:  # [B, T, g (i + 1)]: a ones column per group (convs.py)
            a = _cat1([conv_input_rows(spec.module, x) for x in spec.inputs])
            if not ones:
                return a
            a = a.unflatten(-1, (spec.groups, -1))
            return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1).flatten(-2)
        if native and workspace is not None:
            parts = [
                native_patches(spec.module, x, workspace, (spec.name, i), ones)
                for i, x in enumerate(spec.inputs)
            ]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        unfold = native_patches if native else unfold_input
        parts = [unfold(spec.module, x) for x in spec.inputs]
        a = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if ones:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def iter_output_gradients(
        self,
        f: Tensor,
        vectors: Tensor,
        retain_graph: bool = False,
        extra: list[Tensor] | None = None,
    ) -> Iterator[list]:
        """Backpropagate each vector ``s_k`` (``vectors [K, B, C]``) from the output ``f``.

        Yields, for ``k = 1..K`` in turn, per layer ``g [1, B, T, d_out]``: the gradient of
        ``sum_b s_k[b] . f[b]`` w.r.t. the layer outputs (one backward pass each). Consuming them
        one at a time keeps memory at one vector's gradients (the exact Fisher has ``K = C``).
        Convolution gradients are ``[B, T, C]`` views of the channel-first tensors autograd
        returns (no copy). The graph is freed after the last vector unless ``retain_graph``.
        With ``extra`` tensors, the same backward pass also gives their gradients, appended as
        one more list (zeros where unused).
        """
        outs = [o for spec in self.specs for o in spec.outputs]
        for o, spec in zip(outs, [s for s in self.specs for _ in s.outputs]):
            if not o.requires_grad:
                raise ValueError(
                    f"layer {spec.name!r}: its output does not require grad; is the forward pass "
                    "wrapped in torch.no_grad()?"
                )
        K = vectors.shape[0]
        extra = list(extra or [])
        if not outs and not extra:  # no Kronecker layers: nothing to backpropagate
            yield from ([] for _ in range(K))
            return
        for k in range(K):
            grads = torch.autograd.grad(
                f,
                outs + extra,
                grad_outputs=vectors[k].reshape(f.shape),
                retain_graph=retain_graph or k < K - 1,
                allow_unused=True,
            )
            grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outs + extra, grads)]
            result: list = []
            start = 0
            for spec in self.specs:
                c = len(spec.outputs)
                if spec.by_use:
                    g = join_use_gradients(spec, grads[start : start + c])
                elif isinstance(spec.module, (nn.Linear, *CONV_TRANSPOSED)):
                    rows = [
                        output_rows(spec.module, grads[start + i], x)
                        for i, x in enumerate(spec.inputs)
                    ]
                    g = _cat1(rows)
                else:
                    parts = [grads[start + i].flatten(2) for i in range(c)]
                    g = (parts[0] if c == 1 else torch.cat(parts, dim=2)).transpose(1, 2)
                result.append(g.unsqueeze(0))
                start += c
            if extra:
                result.append(grads[len(outs) :])
            yield result

    def output_gradients(self, f: Tensor, vectors: Tensor) -> list[Tensor]:
        """All of :meth:`iter_output_gradients` at once: per layer ``g [K, B, T, d_out]``."""
        per_vec = list(self.iter_output_gradients(f, vectors))
        if len(per_vec) == 1:
            return per_vec[0]
        return [torch.cat(gs, dim=0) for gs in zip(*per_vec)]
