"""Per-example gradients of diagonal-block parameters from the fit's own backward pass.

:class:`~laplace_kron.curvature.diagonal.DiagonalGradients` forms per-example gradients with a
second, vmapped forward and backward pass of the whole model. For parameters whose every use is
one of the calls below, the fit's backward already holds what is needed: the output-gradient
``dy`` of each use. A torch function mode (:class:`DiagUseRecorder`) records those uses during the
fit's forward pass, and the per-example gradient of datum ``n`` is a closed form of the use's
input and ``dy`` (summed over positions and over the parameter's uses):

* ``F.linear(x, W, b)``: ``dW[n] = sum_t dy[n, t] x[n, t]^T``, ``db[n] = sum_t dy[n, t]``;
* ``F.embedding(i, W)``: ``dW[n][v] = sum_{t: i[n, t] = v} dy[n, t]`` (no ``padding_idx`` row);
* ``F.layer_norm`` / ``F.rms_norm``: ``dw[n] = sum_t dy[n, t] * xhat[n, t]``, ``db[n] = sum_t dy``;
* ``x * p`` and ``x + p`` with ``p`` broadcast over the batch axis: ``dy * x`` (resp. ``dy``)
  summed to ``p``'s shape per datum.

``p`` may also be an affine image of a parameter ``q`` by a number or a dtype / device cast
(``p = 1 + q.float()``, as Gemma's RMS norm scales by ``1 + weight``; ``p = c q``; ``p = c - q``):
the gradient of ``q`` is ``s`` times that of ``p``, ``s`` the product of the images' slopes.

A use whose output does not have the batch's ``N`` data on its leading axis (a position table
looked up with ``[1, T]`` ids and broadcast over the batch, a sequence-first layout) is not
recognised. Whatever is recorded is verified once per fit against the vmapped per-example
gradient of one datum and against the batch gradient (:meth:`FastDiagonal.verify`); a parameter
that fails keeps the generic path, so this is a speed-up only, never a different number.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["DiagUseRecorder", "FastDiagonal"]

_MULS = (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__)
_ADDS = (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__)
_SUBS = (torch.sub, Tensor.sub, Tensor.__sub__)
_RSUBS = (Tensor.__rsub__,)
_CASTS = (Tensor.float, Tensor.double, Tensor.half, Tensor.bfloat16, Tensor.to, Tensor.type_as)
_RMS_NORM = getattr(F, "rms_norm", None)


@dataclass
class DiagUse:
    """One recorded call: ``kind``, the parameter names it uses by role, its saved operands."""

    kind: str  # "linear", "embedding", "norm", "mul", "add"
    names: dict[str, str]  # role ("weight", "bias") -> parameter name
    x: Tensor | None  # the other operand (detached)
    output: Tensor | None  # in the graph, for the output-gradient (None once consumed)
    extra: dict = field(default_factory=dict)


def _flat_tensors(args: Iterable) -> Iterable[Tensor]:
    for a in args:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _flat_tensors(a)


class DiagUseRecorder(TorchFunctionMode):
    """Records the recognised uses of ``params`` (name -> parameter); any other call that takes
    one of them marks it :attr:`unsupported`."""

    def __init__(self, params: dict[str, Tensor]):
        super().__init__()
        self.by_id = {id(p): n for n, p in params.items()}
        self.uses: list[DiagUse] = []
        self.unsupported: set[str] = set()
        self.paused = False
        # Uses whose output has one row (e.g. a position table looked up with [1, T] ids), until
        # an addition broadcasts them over the batch: the sum's output-gradient is per datum.
        self._pending: list[tuple[Tensor, DiagUse]] = []
        # Affine images of parameters: id -> (name, slope, the tensor, kept so that its id is
        # not reused by another tensor during the forward pass).
        self._derived: dict[int, tuple[str, float, Tensor]] = {}

    def _name(self, t) -> str | None:
        if not isinstance(t, Tensor):
            return None
        name = self.by_id.get(id(t))
        if name is None and id(t) in self._derived:
            name = self._derived[id(t)][0]
        return name

    def _slope(self, t) -> float:
        """``d t / d q`` of a recorded image ``t`` of parameter ``q`` (1 for ``q`` itself)."""
        return self._derived[id(t)][1] if id(t) in self._derived else 1.0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or getattr(func, "__name__", "") == "__get__":
            return out
        found = [n for t in _flat_tensors([*args, *kwargs.values()]) if (n := self._name(t))]
        if not isinstance(out, Tensor):
            return out
        if not found:
            if self._pending and func in _ADDS and len(args) == 2 and not kwargs:
                self._link(args, out)
            return out
        if len(found) == 1 and self._derive(func, args, kwargs, out):
            return out
        use = self._recognise(func, args, kwargs, out)
        if use is not None:
            use.extra["slopes"] = self._slopes(func, args, kwargs, use)
        if use is None or set(use.names.values()) != set(found):
            self.unsupported.update(found)
        else:
            self.uses.append(use)
            if out.ndim >= 2 and out.shape[0] == 1:
                self._pending.append((out, use))
        return out

    def _derive(self, func, args, kw, out: Tensor) -> bool:
        """Record ``out`` as an affine image of the one parameter among ``args`` (a cast, or a
        sum / difference / product with a number); whether it is one."""
        if not args or not isinstance(args[0], Tensor):
            return False
        if out is args[0]:  # a cast to the tensor's own dtype / device: the tensor itself
            return func in _CASTS
        base = args[0]
        if self._name(base) is None or out.shape != base.shape:
            return False
        slope = None
        if func in _CASTS and all(self._name(a) is None for a in (*args[1:], *kw.values())):
            slope = 1.0
        elif len(args) == 2 and not kw and _number(args[1]):
            if func in _ADDS or func in _SUBS:
                slope = 1.0
            elif func in _RSUBS:
                slope = -1.0
            elif func in _MULS:
                slope = float(args[1])
        if slope is None:
            return False
        name, s0 = self._name(base), self._slope(base)
        self._derived[id(out)] = (name, s0 * slope, out)
        return True

    def _slopes(self, func, args, kw, use: DiagUse) -> dict[str, float]:
        """Per role of ``use``, the slope of the image it used (only those other than 1)."""
        tensors = [t for t in _flat_tensors([*args, *kw.values()]) if self._name(t)]
        slopes = {}
        for role, name in use.names.items():
            s = [self._slope(t) for t in tensors if self._name(t) == name]
            if s and s[0] != 1.0:
                slopes[role] = s[0]
        return slopes

    def clear(self) -> None:
        """Forget the recorded uses (before the next forward pass)."""
        self.uses.clear()
        self._pending.clear()
        self._derived.clear()
        self.unsupported.clear()

    def _link(self, args, out: Tensor) -> None:
        """``out = a + b`` with ``a`` a pending one-row use output broadcast over ``b``'s batch:
        the use's output-gradient per datum is that of ``out``."""
        for i, (t, use) in enumerate(self._pending):
            if any(a is t for a in args) and out.ndim == t.ndim and out.shape[0] > 1:
                use.output = out
                use.extra["broadcast"] = True
                del self._pending[i]
                return

    def _recognise(self, func, args, kw, out: Tensor) -> DiagUse | None:
        nm = self._name
        if func is F.linear:
            x, w, b = (list(args) + [None, None, None])[:3]
            w, b = kw.get("weight", w), kw.get("bias", b)
            if nm(x) is None and x.ndim >= 2:
                roles = {"weight": nm(w), "bias": nm(b)}
                return DiagUse("linear", {r: n for r, n in roles.items() if n}, x.detach(), out)
        elif func is F.embedding:
            full = dict(zip(("input", "weight", "padding_idx", "max_norm"), args)) | kw
            plain = not full.get("scale_grad_by_freq") and not full.get("sparse")
            if full.get("max_norm") is None and plain and nm(full["weight"]):
                pad = full.get("padding_idx")
                if pad is not None and pad < 0:
                    pad += full["weight"].shape[0]
                names = {"weight": nm(full["weight"])}
                return DiagUse("embedding", names, full["input"], out, {"pad": pad})
        elif func is F.layer_norm or (_RMS_NORM is not None and func is _RMS_NORM):
            rms = func is not F.layer_norm
            keys = ("input", "normalized_shape", "weight") + (("eps",) if rms else ("bias", "eps"))
            full = dict(zip(keys, args)) | kw
            roles = {"weight": nm(full.get("weight")), "bias": nm(full.get("bias"))}
            extra = {"shape": tuple(full["normalized_shape"]), "eps": full.get("eps"), "rms": rms}
            x = full["input"]
            if nm(x) is None:
                names = {r: n for r, n in roles.items() if n}
                return DiagUse("norm", names, x.detach(), out, extra)
        elif (func in _MULS or func in _ADDS) and len(args) == 2 and not kw:
            a, b = args
            p, o = (a, b) if nm(a) else (b, a)
            if nm(o) is None and isinstance(o, Tensor) and p.ndim < out.ndim:
                kind = "mul" if func in _MULS else "add"
                return DiagUse(kind, {"weight": nm(p)}, o.detach() if kind == "mul" else None, out)
        return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _batched(t: Tensor, N: int) -> bool:
    return t.ndim >= 1 and t.shape[0] == N


def _example_grads(use: DiagUse, dy: Tensor, lo: int, hi: int, shapes) -> dict[str, Tensor]:
    """Per-example gradients ``[K, hi - lo, *shape]`` of the use's parameters for data ``lo:hi``
    and each of ``K`` output-gradients ``dy [K, N, ...]`` of the use's output."""
    x = use.x
    K, N = dy.shape[0], dy.shape[1]
    if x is not None and use.extra.get("broadcast"):
        x = x.expand(N, *x.shape[1:])
    x = None if x is None else x[lo:hi]
    dy = dy[:, lo:hi]
    b = dy.shape[1]
    out = {}
    if use.kind == "linear":
        x3, g3 = x.reshape(b, -1, x.shape[-1]).to(dy.dtype), dy.reshape(K, b, -1, dy.shape[-1])
        if "weight" in use.names:
            if K == 1:
                out[use.names["weight"]] = torch.bmm(g3[0].mT, x3).unsqueeze(0)
            else:
                out[use.names["weight"]] = torch.einsum("kbto,bti->kboi", g3, x3)
        if "bias" in use.names:
            out[use.names["bias"]] = g3.sum(2)
    elif use.kind == "embedding":
        name = use.names["weight"]
        idx = x.reshape(b, -1)
        g = dy.reshape(K, b, idx.shape[1], -1)
        if use.extra["pad"] is not None:
            g = g * (idx != use.extra["pad"]).unsqueeze(-1).to(g.dtype)
        grad = g.new_zeros(K, b, *shapes[name])
        ks = torch.arange(K, device=g.device).view(K, 1, 1).expand_as(g[..., 0])
        rows = torch.arange(b, device=g.device).view(1, b, 1).expand_as(g[..., 0])
        grad.index_put_((ks, rows, idx.expand_as(g[..., 0])), g, accumulate=True)
        out[name] = grad
    elif use.kind == "norm":
        shape, eps = use.extra["shape"], use.extra["eps"]
        with torch.no_grad():
            if use.extra["rms"]:
                xhat = F.rms_norm(x, shape, None, eps)
            else:
                xhat = F.layer_norm(x, shape, None, None, 1e-5 if eps is None else eps)
        k = len(shape)
        dims = tuple(range(2, dy.ndim - k))  # the positions between the data and the norm axes
        if "weight" in use.names:  # (sum over no dims would reduce them all)
            w = dy * xhat.to(dy.dtype)
            out[use.names["weight"]] = w.sum(dims) if dims else w
        if "bias" in use.names:
            out[use.names["bias"]] = dy.sum(dims) if dims else dy
    else:  # mul / add: p broadcast over the leading (batch) axis
        name = use.names["weight"]
        t = dy if use.kind == "add" else dy * x.to(dy.dtype)
        shape = shapes[name]
        padded = (1,) * (t.ndim - 2 - len(shape)) + tuple(shape)
        out[name] = t.sum_to_size(K, b, *padded).reshape(K, b, *shape)
    for role, slope in use.extra.get("slopes", {}).items():  # an image of the parameter
        out[use.names[role]] = out[use.names[role]] * slope
    return out


class FastDiagonal:
    """Squared per-example gradient sums of diagonal-block parameters from recorded uses.

    ``params``: name -> parameter of the diagonal blocks. :meth:`recorder` gives the mode to run
    the fit's forward pass in; :attr:`outputs` are the tensors to backpropagate to; then
    :meth:`squared_sums` turns their output-gradients into ``sum_n grad_n^2`` per parameter.
    ``chunk``: element budget of per-example gradients held at once.
    """

    def __init__(self, params: dict[str, Tensor], chunk: int = 2**23):
        self.params, self.chunk = params, chunk
        self.shapes = {n: p.shape for n, p in params.items()}
        self.rec = DiagUseRecorder(params)
        self.names: list[str] = []  # the verified parameters

    def begin(self) -> None:
        """Forget the previous forward pass's uses."""
        self.rec.clear()

    def uses(self, N: int, names: list[str]) -> list[DiagUse]:
        """The recorded uses of ``names`` (batch-first with ``N`` data)."""
        keep = set(names)
        return [u for u in self.rec.uses if set(u.names.values()) <= keep and _batched(u.output, N)]

    def candidates(self, N: int) -> list[str]:
        """Parameters whose every recorded use is recognised and batch-first."""
        bad = set(self.rec.unsupported)
        seen = set()
        for u in self.rec.uses:
            names = set(u.names.values())
            seen |= names
            wide = u.x is None or u.extra.get("broadcast") or _batched(u.x, N)
            if not _batched(u.output, N) or not wide:
                bad |= names
        return [n for n in self.params if n in seen and n not in bad]

    def example_jacobians(
        self, uses: list[DiagUse], dys: list[Tensor], lo: int, hi: int, names: list[str]
    ) -> dict[str, Tensor]:
        """``[K, hi - lo, *shape]``: the per-example gradients of ``names`` for each of ``K``
        output vectors at once (``dys``: the uses' output-gradients ``[K, N, ...]``, in order;
        the GLM predictive's Jacobians, ``K = C``)."""
        grads: dict[str, Tensor] = {}
        for u, dy in zip(uses, dys, strict=True):
            for n, g in _example_grads(u, dy, lo, hi, self.shapes).items():
                if n in names:
                    grads[n] = g if n not in grads else grads[n] + g
        return grads

    def per_example(self, uses: list[DiagUse], dys: list[Tensor], N: int, names: list[str]):
        """Yields ``(lo, hi, grads)``: per-example gradients ``[hi - lo, *shape]`` of ``names``."""
        size = max(1, sum(self.shapes[n].numel() for n in names))
        step = max(1, self.chunk // size)
        for lo in range(0, N, step):
            hi = min(N, lo + step)
            grads = self.example_jacobians(uses, [d.unsqueeze(0) for d in dys], lo, hi, names)
            yield lo, hi, {n: g[0] for n, g in grads.items()}

    def squared_sums(
        self, uses: list[DiagUse], dys: list[Tensor], N: int, names: list[str]
    ) -> dict[str, Tensor]:
        """``sum_n grad_n^2`` of ``names`` for one output-gradient vector, ``dys`` the
        output-gradients of ``uses`` (:meth:`uses`) in order."""
        sums = {}
        with torch.no_grad():
            for _, _, grads in self.per_example(uses, dys, N, names):
                for n, g in grads.items():
                    sq = g.square().sum(0)
                    sums[n] = sq if n not in sums else sums[n] + sq
        return sums

    def verify_tensors(self, N: int) -> tuple[list[str], list[DiagUse], list[Tensor]]:
        """``(candidates, their uses, tensors)``: what :meth:`verify` needs gradients of (the
        uses' outputs, then the candidates' parameters), for one backward pass shared with
        other checks."""
        cands = self.candidates(N)
        uses = self.uses(N, cands)
        if not cands or not uses:
            return [], [], []
        return cands, uses, [u.output for u in uses] + [self.params[n] for n in cands]

    def verify(self, cands, uses, got, N: int, reference, tol: float) -> list[str]:
        """Keep the candidates whose rule gradients equal ``reference(names, lo, hi)`` (the
        per-example gradients of data ``lo:hi`` by a separate pass) for the first datum and,
        summed over the batch, the autograd gradient; ``got``: the gradients of
        :meth:`verify_tensors`' tensors for one output vector (``None``: zero)."""
        if not cands:
            self.names = []
            return []
        params = [self.params[n] for n in cands]
        dys = [torch.zeros_like(u.output) if g is None else g for u, g in zip(uses, got)]
        total = {n: g for n, g in zip(cands, got[len(uses) :], strict=True)}
        hi = 1
        ref = reference(cands, 0, hi)
        sums = {n: torch.zeros_like(p) for n, p in zip(cands, params)}
        parts: dict[str, list[Tensor]] = {n: [] for n in cands}
        with torch.no_grad():
            for lo, _, grads in self.per_example(uses, dys, N, cands):
                for n, g in grads.items():
                    sums[n] += g.sum(0)
                    if lo < hi:
                        parts[n].append(g[: hi - lo])
        first = {n: torch.cat(p)[:hi] if p else None for n, p in parts.items()}
        ok = []
        for n in cands:
            pairs = [(first.get(n), ref[n]), (sums[n], total[n])]
            if all(_close(a, b, tol) for a, b in pairs):
                ok.append(n)
        self.names = ok
        return ok


def _close(a: Tensor | None, b: Tensor | None, tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    scale = max(float(b.abs().max()), float(a.abs().max()), 1e-30)
    return float((a - b.to(a.dtype)).abs().max()) <= tol * scale
