"""KFAC and EKFAC gradient preconditioners in the style of ``torch.optim``.

After ``loss.backward()`` (the loss a MEAN over a batch of ``B`` examples), ``step()`` rewrites the
``.grad`` of every covered parameter in place with the preconditioned gradient; any optimizer then
steps with it. Per covered layer, with the augmented weight ``V = [W | b]`` and every
``update_freq`` steps the batch's factors ``A = mean a a^T``, ``G = mean g g^T`` (over ``B L``
columns, ``g`` the output-gradients times ``B``) and their eigenbases:

    grad <- Q_G [ (Q_G^T grad Q_A) / (s + eps) ] Q_A^T

* KFAC: ``s = L e_G e_A^T`` (exact Tikhonov damping of ``L G (x) A``);
* EKFAC, intra-batch: ``s = mean_n (Q_G^T G_n Q_A)^2`` (``G_n`` the per-example gradient);
* EKFAC, running average: ``m2 <- alpha m2 + (1 - alpha) B (Q_G^T grad Q_A)^2``, ``s = m2``, with
  ``m2 = L e_G e_A^T`` at every refresh of the eigenbasis.

George et al. (2018), "Fast Approximate Natural Gradient Descent in a Kronecker-factored
Eigenbasis"; SUA for convolutions: Grosse & Martens (2016). Derivations: docs/math.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from ..curvature.capture import select_layers
from ..curvature.convs import generic_layout
from ..validation import check_number, positive, positive_int
from .layer import Batch, Layer, LayerCurvature, Record

__all__ = ["EKFAC", "KFAC", "KroneckerPreconditioner"]

# The layers the preconditioners cover (the posterior's Conv3d, transposed and grouped
# convolutions are not).
SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _default_modules(model: nn.Module) -> list[str]:
    """Names of the supported layers with trainable parameters."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, SUPPORTED_TYPES)
        and not generic_layout(m)  # grouped convolutions keep their plain gradient
        and any(p.requires_grad for p in m.parameters(False))
    ]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no layer to precondition: KFAC / EKFAC cover "
            + ", ".join(t.__name__ for t in SUPPORTED_TYPES)
            + " layers with trainable parameters"
        )
    return names


class KroneckerPreconditioner:
    """Common machinery of :class:`KFAC` and :class:`EKFAC` (hooks, steps, write-back).

    Construction registers forward hooks on the covered layers (and a pre-hook on ``model`` that
    marks a new forward pass); they stay until :meth:`remove` (or the end of a ``with`` block).
    A forward pass with gradients enabled records each covered layer's input (only on steps that
    need it) and hooks its output to receive ``dloss/doutput`` during ``loss.backward()``;
    :meth:`step` uses and then drops what was recorded. Forward passes under ``torch.no_grad()``
    record nothing; passes with gradients that are never backpropagated are ignored (their inputs
    are held until the next :meth:`step`). Parameters outside the covered layers keep their plain
    gradient (:attr:`uncovered` names them).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        sua: bool = False,
        update_freq: int = 1,
        modules: None | str | Sequence[str | nn.Module] = None,
    ):
        t = positive("eps", eps)
        if t.ndim != 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        if not isinstance(sua, bool):
            raise ValueError(f"sua must be True or False, got {sua!r}")
        self.eps = float(t)
        self.sua = sua
        self.update_freq = positive_int("update_freq", update_freq)
        if modules is None:
            modules = _default_modules(model)
        specs = select_layers(model, modules)
        for spec in specs:
            if generic_layout(spec.module):
                raise ValueError(
                    f"layer {spec.name!r} ({type(spec.module).__name__}): the KFAC / EKFAC "
                    "preconditioners cover nn.Linear, nn.Conv1d and nn.Conv2d (groups=1) only; leave it "
                    "out of modules=[...] (its parameters then keep their plain "
                    "gradient)"
                )
        self.layers = [Layer(spec, sua) for spec in specs]
        covered = {id(p) for layer in self.layers for p in (layer.weight, layer.bias)}
        self.uncovered = [
            n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered
        ]
        self.steps = 0
        self._pass = 0
        self._handles = [model.register_forward_pre_hook(self._new_pass)]
        for layer in self.layers:
            hook = partial(self._record, layer)
            self._handles.append(layer.spec.module.register_forward_hook(hook))

    # -- what subclasses decide -------------------------------------------------------------
    def _needs_patches(self, layer: Layer, refresh: bool) -> bool:
        """Whether this step needs the layer's per-example patches."""
        return refresh and not layer.sua

    def _eigenvalues(self, layer: Layer, batch: Batch | None, proj: Tensor, B: int) -> Tensor:
        """``s [d_out, D]`` for the projected gradient ``proj = Q_G^T grad Q_A`` of a batch of
        ``B`` examples (``batch``: what was recorded, ``None`` on steps that record nothing)."""
        raise NotImplementedError

    # -- hooks --------------------------------------------------------------------------------
    def _new_pass(self, module: nn.Module, args) -> None:
        self._pass += 1

    def _refresh_due(self, layer: Layer) -> bool:
        return layer.curvature is None or self.steps % self.update_freq == 0

    def _record(self, layer: Layer, module: nn.Module, inputs, output) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if not output.requires_grad:
            return
        x = inputs[0]
        if x.dim() < (2 if isinstance(module, nn.Linear) else module.weight.dim()):
            raise ValueError(
                f"layer {layer.name!r}: input of shape {tuple(x.shape)} has no batch axis; "
                "KFAC / EKFAC need batched inputs [B, ...]"
            )
        refresh = self._refresh_due(layer)
        need_x = self._needs_patches(layer, refresh) or (refresh and layer.sua)
        keep_grad = refresh or self._needs_patches(layer, refresh)
        rec = Record(self._pass, x.shape[0], x.detach() if need_x else None, keep_grad)
        layer.records.append(rec)
        output.register_hook(partial(_receive, rec))

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> None:
        """Rewrite the ``.grad`` of every covered parameter with its preconditioned gradient."""
        try:
            received = [[r for r in layer.records if r.seen] for layer in self.layers]
            passes = {r.pass_id for recs in received for r in recs}
            if not passes:
                raise RuntimeError(
                    f"{type(self).__name__}.step(): no covered layer received a gradient since "
                    "the last step; call it after a forward pass of the model (with gradients "
                    "enabled) and loss.backward()"
                )
            if len(passes) > 1:
                raise RuntimeError(
                    f"{type(self).__name__}.step(): gradients of {len(passes)} forward passes "
                    "were backpropagated since the last step; gradient accumulation over "
                    "several batches is not supported (the curvature estimates need one batch "
                    "whose loss is a mean): call step() after each backward, or concatenate the "
                    "batches"
                )
            with torch.no_grad():
                new = []
                for layer, recs in zip(self.layers, received):
                    if recs:
                        new += self._precondition(layer, recs)
                for p, g in new:
                    p.grad.copy_(g)
            self.steps += 1
        finally:
            for layer in self.layers:
                layer.records.clear()

    def _precondition(self, layer: Layer, recs: list[Record]) -> list[tuple[Tensor, Tensor]]:
        refresh = self._refresh_due(layer)
        batch = None
        if recs[0].keep_grad:
            batch = layer.batch(recs, self._needs_patches(layer, refresh))
        V = layer.grad_matrix()
        if refresh:
            layer.refresh(batch, self.steps)
        proj = layer.to_eigenbasis(V)
        s = self._eigenvalues(layer, batch, proj, layer.batch_size(recs))
        layer.curvature.eigenvalues = s
        return layer.split(layer.from_eigenbasis(proj / (s + self.eps)))

    # -- state for users and for building a Laplace posterior ---------------------------------
    def curvature(self) -> list[LayerCurvature]:
        """Per covered layer (in model order) the current factors, eigenbases and eigenvalues;
        empty before the first :meth:`step`."""
        return [layer.curvature for layer in self.layers if layer.curvature is not None]

    def state_dict(self) -> dict:
        """The step count and every layer's curvature (tensors and numbers only: a
        ``torch.save`` / ``torch.load(weights_only=True)`` round trip works)."""
        return {
            "kind": type(self).__name__,
            "sua": self.sua,
            "steps": self.steps,
            "layers": {
                layer.name: layer.curvature_state()
                for layer in self.layers
                if layer.curvature is not None
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (validated first: on any error nothing changes)."""
        if not isinstance(state, dict) or set(state) != {"kind", "sua", "steps", "layers"}:
            raise ValueError("not a preconditioner state_dict (expected kind, sua, steps, layers)")
        name = type(self).__name__
        if state["kind"] != name or state["sua"] != self.sua:
            raise ValueError(
                f"the state was saved by {state['kind']}(sua={state['sua']}); this is "
                f"{name}(sua={self.sua})"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        by_name = {layer.name: layer for layer in self.layers}
        unknown = sorted(set(state["layers"]) - set(by_name))
        if unknown:
            raise ValueError(f"the state has layers this preconditioner does not cover: {unknown}")
        new = {}
        for n, entry in state["layers"].items():
            layer = by_name[n]
            like = layer.weight if layer.weight is not None else layer.bias
            new[n] = layer.read_curvature(entry, like)
        for layer in self.layers:
            layer.curvature = new.get(layer.name)
            layer.records.clear()
        self.steps = steps

    def remove(self) -> None:
        """Remove the hooks (the preconditioner records nothing afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self.layers:
            layer.records.clear()

    def __enter__(self) -> KroneckerPreconditioner:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(layer.name or "<root>" for layer in self.layers)
        return (
            f"{type(self).__name__}(eps={self.eps}, sua={self.sua}, "
            f"update_freq={self.update_freq}, steps={self.steps}, layers=[{names}])"
        )


def _receive(rec: Record, grad: Tensor) -> None:
    """Tensor hook on a layer output: keep ``dloss/doutput`` (summed over backward passes)."""
    rec.seen = True
    if rec.keep_grad:
        grad = grad.detach()
        rec.grad = grad if rec.grad is None else rec.grad + grad


class KFAC(KroneckerPreconditioner):
    """KFAC preconditioner: ``s = L e_G e_A^T``, the eigenvalues of ``L G (x) A``.

    ``KFAC(model, eps, sua=False, update_freq=1, modules=None)``. ``eps > 0`` is Tikhonov damping
    added to every eigenvalue of ``L G (x) A`` (the exact ``(L G (x) A + eps I)^{-1}``, not
    factored damping). Every ``update_freq`` steps the factors and eigenbases are recomputed
    from the current batch; in between the last ones are reused. ``sua=True`` uses the spatially
    uncorrelated activations approximation for convolutions (input factor over channels only).
    ``modules``: which layers (default: every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` with
    trainable parameters), as in :func:`~laplace_kron.curvature.capture.select_layers`.

    Usage::

        precond = KFAC(model, eps=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()   # a mean over the batch
            precond.step()                             # .grad <- preconditioned gradient
            opt.step()
    """

    def _eigenvalues(self, layer: Layer, batch: Batch | None, proj: Tensor, B: int) -> Tensor:
        c = layer.curvature
        return c.positions * torch.outer(c.eig_G.values, layer.input_values(c.eig_A.values))


class EKFAC(KroneckerPreconditioner):
    """EKFAC preconditioner (George et al., 2018): KFAC's eigenbasis, re-estimated eigenvalues.

    ``EKFAC(model, eps, sua=False, ra=False, update_freq=1, alpha=0.75, modules=None)``. Every
    ``update_freq`` steps the eigenbasis ``Q_G (x) Q_A`` is recomputed from the current batch and
    the running eigenvalues reset to ``m2 = L e_G e_A^T``. ``ra=False`` (intra-batch): every step
    ``s = mean_n (Q_G^T G_n Q_A)^2`` from the per-example gradients ``G_n`` of the batch (it
    records the layer inputs on every step). ``ra=True`` (running average):
    ``m2 <- alpha m2 + (1 - alpha) B (Q_G^T grad Q_A)^2`` and ``s = m2`` (inputs are recorded on
    refresh steps only). The gradient is divided by ``s + eps`` in the eigenbasis. Other
    arguments as for :class:`KFAC`.
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float,
        sua: bool = False,
        ra: bool = False,
        update_freq: int = 1,
        alpha: float = 0.75,
        modules: None | str | Sequence[str | nn.Module] = None,
    ):
        if not isinstance(ra, bool):
            raise ValueError(f"ra must be True or False, got {ra!r}")
        self.alpha = check_number("alpha", alpha, 0.0, 1.0)
        if self.alpha == 1.0:
            raise ValueError("alpha must lie in [0, 1): alpha = 1 would never update m2")
        self.ra = ra
        super().__init__(model, eps, sua=sua, update_freq=update_freq, modules=modules)

    def _needs_patches(self, layer: Layer, refresh: bool) -> bool:
        return not self.ra or super()._needs_patches(layer, refresh)

    def _eigenvalues(self, layer: Layer, batch: Batch | None, proj: Tensor, B: int) -> Tensor:
        c = layer.curvature
        if not self.ra:
            return layer.intra_batch(batch)
        c.m2.mul_(self.alpha).add_(proj.square(), alpha=(1.0 - self.alpha) * B)
        return c.m2

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", ra={self.ra}, alpha={self.alpha})"
