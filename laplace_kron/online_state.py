"""Checks of :class:`~laplace_kron.continual.OnlineLaplace` options and of a saved state.

A state (a :meth:`~laplace_kron.continual.OnlineLaplace.state_dict`, in memory or read from a file by
:func:`laplace_kron.io.load_file`) is untrusted input: :func:`read_state` checks every entry
against the object it is loaded into (curvature, likelihood, parameter names and shapes, block
layout, list lengths, types, NaN / Inf) and returns the new attribute values, or raises a
``ValueError`` naming the state and the problem, so a refused state changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import io
from .constants import FILE_FORMATS, ONLINE_CURVATURES, ONLINE_FORMAT, WEIGHT_SHARING
from .curvature.likelihoods import check_fisher, check_likelihood
from .online_precision import BlockSum
from .validation import check_number

if TYPE_CHECKING:
    from .continual import OnlineLaplace

__all__ = [
    "check_decay",
    "check_max_terms",
    "check_options",
    "check_shapes",
    "module_names",
    "read_state",
    "saved_options",
]

# Constructor options every saved state holds, and those added later (older files lack them).
_OPTIONS = ("likelihood", "curvature", "fisher", "mc_samples", "strength", "decay", "max_terms")
_OPTIONS = (*_OPTIONS, "prior_precision")
_OPTIONS_LATER = ("separate_bias", "weight_sharing", "modules")


def check_options(
    likelihood: str, curvature: str, fisher: str, mc_samples: int, weight_sharing: str
) -> None:
    """The option names of an OnlineLaplace (see :mod:`laplace_kron.constants`)."""
    check_likelihood(likelihood)
    check_fisher(fisher, mc_samples)
    if curvature not in ONLINE_CURVATURES:
        raise ValueError(f"curvature must be one of {ONLINE_CURVATURES}, got {curvature!r}")
    if weight_sharing not in WEIGHT_SHARING:
        raise ValueError(f"weight_sharing must be one of {WEIGHT_SHARING}, got {weight_sharing!r}")


def module_names(model: nn.Module, modules: None | str | Sequence) -> None | str | list[str]:
    """``modules=`` with module objects replaced by their names in ``model`` (for a file)."""
    if modules is None or isinstance(modules, str):
        return modules
    by_id = {id(m): n for n, m in model.named_modules()}
    return [m if isinstance(m, str) else by_id[id(m)] for m in modules]


def check_decay(value: object) -> float:
    """The forgetting factor ``gamma in (0, 1]``."""
    value = check_number("decay", value, 0.0, 1.0)
    if value == 0:
        raise ValueError("decay must lie in (0, 1] (1 = no forgetting), got 0")
    return value


def check_max_terms(value: object) -> int | None:
    """``None`` or a positive integer."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"max_terms must be None or a positive integer, got {value!r}")
    return value


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_shapes(
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    named: Mapping[str, Tensor],
    what: str,
    ref: str = "the consolidated ones",
) -> None:
    """``named`` (``what``, e.g. "the model") must hold every name in ``names`` with its shape."""
    missing = [n for n in names if n not in named]
    if missing:
        raise ValueError(f"{what} has no parameters {missing}; is it the consolidated model?")
    bad = [
        f"{n}: {tuple(named[n].shape)} vs {tuple(s)}"
        for n, s in zip(names, shapes)
        if named[n].shape != s
    ]
    if bad:
        raise ValueError(f"{what}'s parameter shapes differ from {ref}: {bad}")


def saved_options(state: Mapping, name: str) -> dict:
    """The constructor keywords (``likelihood``, ``curvature``, ...) saved in a loaded file."""
    with io.reading(name):
        options = {k: state[k] for k in _OPTIONS}
    options.update({k: state[k] for k in _OPTIONS_LATER if k in state})
    return options


def read_state(state: object, name: str, ol: OnlineLaplace) -> dict:
    """Check ``state`` (called ``name`` in errors) against ``ol``; the attributes to assign.

    Returns ``fisher``, ``mc_samples``, ``strength``, ``decay``, ``max_terms``,
    ``prior_precision``, ``weight_sharing``, ``num_tasks``, ``task_sizes``, ``anchor`` (on the
    model's device and dtype), ``blocks`` (:class:`BlockSum` list), ``diag`` and
    ``generator_state``.
    """
    if not isinstance(state, Mapping) or state.get("format") != ONLINE_FORMAT:
        raise ValueError(
            f"{name!r} is not an OnlineLaplace state (format marker {ONLINE_FORMAT!r} missing)"
        )
    version = FILE_FORMATS[ONLINE_FORMAT]
    if state.get("version") != version:
        raise ValueError(
            f"{name!r} has OnlineLaplace state version {state.get('version')!r}; this "
            f"laplace_kron reads version {version}"
        )
    io.check_finite(dict(state), name)
    with io.reading(name):
        try:
            return _parse(state, ol)
        except ValueError as e:
            raise ValueError(f"{name!r} is refused: {e}") from e


def _parse(state: Mapping, ol: OnlineLaplace) -> dict:
    for key, mine in (("curvature", ol.curvature_type), ("likelihood", ol.likelihood)):
        if state[key] != mine:
            raise ValueError(
                f"the state has {key}={state[key]!r} but this OnlineLaplace has {key}={mine!r}; "
                f"construct it with the same {key}"
            )
    names = state["param_names"]
    if names != ol.param_names:
        raise ValueError(
            f"the state covers parameters {names} but this OnlineLaplace covers "
            f"{ol.param_names}; use the same model and modules="
        )
    shapes = [torch.Size(s) for s in state["param_shapes"]]
    if len(shapes) != len(names):
        raise ValueError(f"param_shapes has {len(shapes)} entries for {len(names)} parameters")
    named = dict(ol.model.named_parameters())
    check_shapes(names, shapes, named, "the model", "the state's")
    if state.get("separate_bias", ol.separate_bias) != ol.separate_bias:
        raise ValueError(f"the state has separate_bias={state['separate_bias']!r}")
    weight_sharing = state.get("weight_sharing", ol.weight_sharing)
    check_options(
        ol.likelihood, ol.curvature_type, state["fisher"], state["mc_samples"], weight_sharing
    )
    new = {
        "fisher": state["fisher"],
        "mc_samples": state["mc_samples"],
        "strength": check_number("strength", state["strength"], 0.0),
        "decay": check_decay(state["decay"]),
        "max_terms": check_max_terms(state["max_terms"]),
        "prior_precision": check_number("prior_precision", state["prior_precision"], 0.0),
        "weight_sharing": weight_sharing,
        "num_tasks": _check_int("num_tasks", state["num_tasks"], 0),
        "task_sizes": state["task_sizes"],
    }
    tasks = new["num_tasks"]
    if not isinstance(new["task_sizes"], list) or len(new["task_sizes"]) != tasks:
        raise ValueError(f"task_sizes must be a list of num_tasks={tasks} integers")
    for s in new["task_sizes"]:
        _check_int("a task size", s, -1)  # -1: unknown (a curvature folded without num_data)
    ref = named[names[0]]

    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device=ref.device, dtype=ref.dtype, copy=True)

    diag = ol.curvature_type == "diag"
    new["anchor"] = _tensors(state["anchor"], names if tasks else [], named, "anchor", cast)
    # The diagonal precision: every parameter for "diag", the diagonal-block ones otherwise.
    new["diag"] = _tensors(state["diag"], ol.diag_names if tasks else [], named, "diag", cast)
    if any(bool((d < 0).any()) for d in new["diag"].values()):
        raise ValueError("the diagonal curvature must be >= 0")
    entries = state["blocks"]
    if not isinstance(entries, list) or (diag or not tasks) and entries:
        raise ValueError("blocks must be a list, empty for curvature='diag' or before a task")
    shapes_by_name = {n: named[n].shape for n in names}
    ekfac = ol.curvature_type == "ekfac"
    new["blocks"] = [BlockSum.from_state(e, shapes_by_name, ekfac, cast) for e in entries]
    covered = sorted(n for bs in new["blocks"] for n in bs.param_names)
    kron_names = [n for n in names if n not in set(ol.diag_names)]
    if not diag and tasks and covered != sorted(kron_names):
        raise ValueError(f"the blocks cover {covered}, not each of {kron_names} once")
    counts = sorted({len(bs.terms) for bs in new["blocks"]})
    if counts and (len(counts) > 1 or not 1 <= counts[0] <= tasks):
        raise ValueError(f"the blocks hold {counts} terms, not one count in 1..{tasks}")
    new["generator_state"] = state["generator_state"]
    if new["generator_state"] is not None:  # a bad one raises here, before anything is assigned
        torch.Generator().set_state(new["generator_state"])
    return new


def _tensors(
    obj: object,
    names: list[str],
    named: Mapping[str, Tensor],
    what: str,
    cast: Callable[[Tensor | None], Tensor | None],
) -> dict[str, Tensor]:
    """A state's ``{name: tensor}`` entry: exactly ``names``, each shaped like the parameter."""
    if not isinstance(obj, dict) or sorted(obj) != sorted(names):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{what} must map exactly the parameters {names} to tensors, got {got}")
    for n in names:
        if not isinstance(obj[n], Tensor) or obj[n].shape != named[n].shape:
            raise ValueError(f"{what}[{n!r}] must be a tensor of shape {tuple(named[n].shape)}")
    return {n: cast(obj[n]) for n in names}
