"""Capture by parameter use: a torch function mode that records the linear maps whose weight is
a covered parameter, wherever they are called from (:class:`UseRecorder`), and a check that the
recorded uses account for the whole gradient (:func:`check_uses`).

Recognised calls (the weight found by the identity of the parameter):

* ``F.linear(x, W, b)``: ``y = W a + b`` per row ``a`` of ``x [B, ..., d_in]``;
* ``torch.addmm(b, x, W)`` / ``torch.matmul(x, W)`` / ``x @ W``: ``y = a W + b`` with ``W`` stored
  ``[d_in, d_out]`` (Hugging Face ``Conv1D``);
* ``F.embedding(i, W, padding_idx)``: ``y = W^T onehot(i)`` per index of ``i [B, ...]`` with
  ``W`` stored ``[V, D] = [d_in, d_out]`` (``nn.Embedding``); the indices are recorded, never a
  one-hot. ``max_norm``, ``scale_grad_by_freq`` or another ``padding_idx`` than the module's
  are refused (such a weight keeps its diagonal block: ``embeddings="diag"``);
* ``F.multi_head_attention_forward`` of an ``nn.MultiheadAttention`` whose projections are
  covered: its in- and out-projections run here as ``F.linear`` calls that are recorded, and the
  attention core runs in PyTorch's function with identity projections (exact: ``x I = x``). Inside
  ``__torch_function__`` the mode is off, so the projections torch would compute inside could not
  be seen otherwise. Self-attention (query, key and value the same tensor) is one use of the
  packed weight; otherwise each of the query / key / value row slices is a use whose
  output-gradient is zero on the other rows.

Each use records its input ``[B, T, d_in]`` (detached; the batch axis first, attention's
sequence-first layout transposed) and its output ``[B, T, d_rows]`` (kept in the graph for the
output-gradient backward), and the row range it writes.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .selection import LayerSpec

__all__ = ["UseRecorder", "check_uses", "rows3"]

_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)
_EMBEDDING_SIGNATURE = inspect.signature(F.embedding)
_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__)


def rows3(t: Tensor) -> Tensor:
    """``[B, ..., d]`` -> ``[B, T, d]`` (a 1-d vector is one row of one datum)."""
    if t.ndim == 1:
        return t.reshape(1, 1, -1)
    return t.reshape(t.shape[0], -1, t.shape[-1])


class UseRecorder(TorchFunctionMode):
    """Records the uses of the ``specs``' weights (all ``by_use``) while active."""

    def __init__(self, specs: list[LayerSpec]):
        super().__init__()
        self.by_weight = {id(s.weight): s for s in specs}
        self.paused = False
        # The batch's number of data points, when known: an embedding indexed without a batch
        # axis of its own (positions [1, T] shared by the batch) is broadcast to it.
        self.batch_size: int | None = None

    def record(self, spec: LayerSpec, x: Tensor, y: Tensor, rows=None, embedding=False) -> None:
        if spec.embedding != embedding:
            raise ValueError(
                f"layer {spec.name!r}: its weight is used both as an embedding table "
                "(F.embedding) and as a linear map's weight (e.g. a language-model head calling "
                "F.linear(h, embedding.weight)): the two orientations share no Kronecker "
                "factors. Give it a diagonal block: embeddings='diag' (or leave it out of "
                "modules=[...])"
            )
        spec.inputs.append(rows3(x).detach())
        spec.outputs.append(y)
        spec.rows.append(rows)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is F.linear:
            spec = self.by_weight.get(id(args[1] if len(args) > 1 else kwargs.get("weight")))
            if spec is not None:
                y = func(*args, **kwargs)
                self.record(spec, args[0] if args else kwargs["input"], y)
                return y
        elif func is torch.addmm and len(args) >= 3 and not kwargs:
            spec = self.by_weight.get(id(args[2]))
            if spec is not None and spec.transposed and args[1].ndim == 2:
                y = func(*args)
                self.record(spec, args[1], y)
                return y
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            spec = self.by_weight.get(id(args[1]))
            if spec is not None and spec.transposed and args[0].ndim >= 2:
                y = func(*args)
                self.record(spec, args[0], y)
                return y
        elif func is F.embedding:
            spec = self.by_weight.get(id(args[1] if len(args) > 1 else kwargs.get("weight")))
            if spec is not None and not spec.embedding:
                self.record(spec, args[0], args[1], embedding=True)  # refused: mixed uses
            if spec is not None and spec.embedding:
                idx = _check_embedding_call(spec, _EMBEDDING_SIGNATURE.bind(*args, **kwargs))
                y = func(*args, **kwargs)
                N = self.batch_size
                if N is not None and N > 1 and idx.ndim >= 1 and idx.shape[0] == 1:
                    # Shared by the batch: its per-datum output-gradients are those of the
                    # broadcast copy (exact: later ops broadcast [1, ...] against [N, ...]).
                    idx, y = idx.expand(N, *idx.shape[1:]), y.expand(N, *y.shape[1:])
                self.record(spec, idx.unsqueeze(-1), y, embedding=True)
                return y
        elif func is F.multi_head_attention_forward:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs)
            w_in, w_out = bound.arguments.get("in_proj_weight"), bound.arguments["out_proj_weight"]
            if id(w_in) in self.by_weight or id(w_out) in self.by_weight:
                return self._attention(bound)
        return func(*args, **kwargs)

    def _linear(self, spec: LayerSpec | None, x: Tensor, w: Tensor, b, rows) -> Tensor:
        """``F.linear`` on the batch-first view of a sequence-first ``x [T, B, d]`` (recorded)."""
        xb = x.transpose(0, 1)
        y = F.linear(xb, w, b)
        if spec is not None:
            self.record(spec, xb, y, rows)
        return y.transpose(0, 1)

    def _attention(self, bound: inspect.BoundArguments):
        """``F.multi_head_attention_forward`` with its projections computed (and recorded) here."""
        a = dict(bound.arguments)
        q, k, v = a["query"], a["key"], a["value"]
        spec = self.by_weight.get(id(a["in_proj_weight"]))
        out_spec = self.by_weight.get(id(a["out_proj_weight"]))
        bad = a.get("bias_k") is not None or a.get("add_zero_attn")
        if bad or a.get("use_separate_proj_weight") or q.ndim != 3 or a.get("static_k") is not None:
            name = (spec or out_spec).name
            raise ValueError(
                f"attention {name!r}: unbatched inputs, separate projection weights or "
                "static keys are not supported by the Kronecker capture; leave this layer out of "
                "modules=[...] or freeze it"
            )
        W, b = a["in_proj_weight"], a["in_proj_bias"]
        E = a["embed_dim_to_check"]
        Wo, bo = a["out_proj_weight"], a["out_proj_bias"]
        bias = (lambda i: None) if b is None else (lambda i: b[i * E : (i + 1) * E])
        if q is k and k is v:
            qp, kp, vp = self._linear(spec, q, W, b, None).unflatten(-1, (3, E)).unbind(-2)
        else:
            qp = self._linear(spec, q, W[:E], bias(0), (0, E))
            kp = self._linear(spec, k, W[E : 2 * E], bias(1), (E, 2 * E))
            vp = self._linear(spec, v, W[2 * E :], bias(2), (2 * E, 3 * E))
        eye = torch.eye(E, dtype=W.dtype, device=W.device)
        a.update(
            query=qp,
            key=kp,
            value=vp,
            in_proj_weight=None,
            in_proj_bias=None,
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            out_proj_weight=eye,
            out_proj_bias=None,
        )
        out, weights = F.multi_head_attention_forward(**a)  # the mode is off in here
        return self._linear(out_spec, out, Wo, bo, None), weights


def _check_embedding_call(spec: LayerSpec, bound: inspect.BoundArguments) -> Tensor:
    """The indices of an ``F.embedding`` call of a Kronecker-covered weight; a call whose
    gradient is not ``sum_t g_t onehot(i_t)^T`` off the padding row is refused."""
    a = bound.arguments
    pad, V = a.get("padding_idx"), spec.weight.shape[0]
    if pad is not None and pad < 0:
        pad += V
    if a.get("max_norm") is not None or a.get("scale_grad_by_freq"):
        what = "max_norm or scale_grad_by_freq"
    elif pad != spec.padding_idx:
        what = f"padding_idx={pad} (the module has {spec.padding_idx})"
    else:
        return a["input"]
    raise ValueError(
        f"embedding {spec.name!r}: its weight is used in F.embedding with {what}, whose gradient "
        "the Kronecker capture does not model; pass embeddings='diag' (exact diagonal block) or "
        "leave it out of modules=[...]"
    )


def check_uses(specs: list[LayerSpec], grads: list[Tensor], inputs: list[Tensor], params) -> None:
    """Refuse a layer whose recorded uses do not account for its per-datum gradient.

    ``grads``: per layer the output-gradients ``[1, N, T, d_out]`` of one random vector that is
    zero outside the first data point's outputs, ``inputs``: the inputs ``[N, T, d_in (+1)]`` in
    weight order, ``params``: per layer the autograd gradients of its weight / bias for the same
    vector. The capture's gradient of the first data point must be autograd's and the others'
    must vanish: a use the capture cannot see (a weight used outside the recognised calls), or
    inputs shared by the batch that are read as positions of several data points, would make the
    block silently wrong.
    """
    for spec, g, a, (gw, gb) in zip(specs, grads, inputs, params, strict=True):
        mine = _use_gradients(spec, g[:, :1], a[:1])
        others = _use_gradients(spec, g[:, 1:], a[1:])
        trues = [t for t, has in ((gw, spec.has_weight), (gb, spec.has_bias)) if has]
        sizes = None
        for i, (m, other, true) in enumerate(zip(mine, others, trues, strict=True)):
            if true is not None and true.is_sparse:  # nn.Embedding(sparse=True)
                true = true.to_dense()
            true = torch.zeros_like(m) if true is None else true.reshape(m.shape)
            scale = true.abs().max().clamp_min(m.abs().max()).clamp_min(1e-30)
            if not spec.by_use:  # module hooks: data may interact (train-mode batch norm)
                err = (m + other - true).abs().max()
                if err > 1e-4 * scale and sizes is None:
                    # the size of the summed terms: a gradient that cancels to ~0 (an attention
                    # key's bias) is compared at its terms' round-off, not at its own
                    sizes = _use_gradients(spec, g.abs(), a.abs())
                if err > 1e-4 * scale and err > 1e-4 * sizes[i].abs().max():
                    raise ValueError(
                        f"layer {spec.name!r} ({type(spec.module).__name__}): its weight is also "
                        "used outside the module's own call (e.g. x * layer.weight), which the "
                        "module hooks do not see, so its Kronecker block would be wrong. Use the "
                        "weight only through the module, or leave it out of modules=[...]"
                    )
                continue
            if other.numel() and other.abs().max() > 1e-4 * scale:
                raise ValueError(
                    f"layer {spec.name!r}: the gradient of one data point reaches positions "
                    "the capture assigns to other data points: its inputs are shared by the "
                    "batch (e.g. positions arange(T) without a batch axis), so per-datum "
                    "gradients cannot be separated. Give its inputs a batch axis ([1, T] is "
                    "broadcast exactly for an nn.Embedding), or give it a diagonal block "
                    "(embeddings='diag', or leave it out of modules=[...])"
                )
            if (m - true).abs().max() > 1e-4 * scale:
                raise ValueError(
                    f"layer {spec.name!r}: its weight is used outside the linear maps the "
                    "capture records (F.linear, addmm / matmul, F.embedding, attention's "
                    "projections), so its Kronecker block would be wrong. Give it a diagonal "
                    "block by leaving it out of modules=[...] (an nn.Embedding: "
                    "embeddings='diag'), or report the use"
                )


def _use_gradients(spec: LayerSpec, g: Tensor, a: Tensor) -> list[Tensor]:
    """The weight (in its stored orientation) and bias gradients ``sum g a^T`` of the recorded
    uses, ``g [K, N, T, d_out]``, ``a [N, T, d_in (+1)]`` (token indices for an embedding)."""
    if spec.embedding:  # a holds token indices: J[:, v] = sum of g over positions with v
        J = _embedding_gradient(spec, g, a)
    else:
        J = torch.einsum("knto,nti->oi", g, a)  # sum over uses and positions of g a^T
    parts = []
    if spec.has_weight:
        w = J[:, : spec.d_in]
        parts.append(w.mT if spec.transposed else w)
    if spec.has_bias:
        parts.append(g.sum((0, 1, 2)))
    return parts


def _embedding_gradient(spec: LayerSpec, g: Tensor, idx: Tensor) -> Tensor:
    """``[D, V]``: ``sum_{k,n,t} g[k,n,t] onehot(idx[n,t])^T`` without the padding row."""
    D, V = spec.d_out, spec.d_in
    rows = g.sum(0).reshape(-1, D)
    J = rows.new_zeros(V, D).index_add_(0, idx.reshape(-1), rows)
    if spec.padding_idx is not None:
        J[spec.padding_idx] = 0
    return J.T
