"""Checks of user-given numbers, shared by every public entry point, and :class:`Checked`, a
validated attribute (the setter runs a check, the getter returns what the check returned)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["Checked", "check_number", "flat_vector", "positive", "positive_int"]


def positive(name: str, value: Any) -> Tensor:
    """``value`` as a detached float64 scalar or 1-d tensor; ValueError unless positive and finite."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if t.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-d tensor, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t <= 0).any():
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return t


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is a positive ``int`` (not a bool); else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    """``value`` as a float if it is a finite real number in ``[low, high]``; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")
    return float(value)


def flat_vector(
    name: str, value: Any, names: list[str], shapes: list[torch.Size], like: Tensor
) -> Tensor:
    """``value`` as one flat vector over the parameters ``names`` (in that order, each
    ``p.flatten()``), dtype and device of ``like``: a tensor ``[P]``, a number (every entry), or
    a mapping name -> tensor shaped like that parameter (every name, nothing else)."""
    P = sum(s.numel() for s in shapes)
    if isinstance(value, Mapping):
        extra = sorted(set(value) - set(names))
        missing = [n for n in names if n not in value]
        if extra or missing:
            raise ValueError(
                f"{name}: the mapping must hold exactly the covered parameters; missing "
                f"{missing}, not covered {extra}"
            )
        bad = [n for n, s in zip(names, shapes) if torch.as_tensor(value[n]).shape != s]
        if bad:
            raise ValueError(f"{name}: entries {bad} are not shaped like their parameters")
        flat = torch.cat([torch.as_tensor(value[n]).reshape(-1) for n in names])
    else:
        flat = torch.as_tensor(value)
        if flat.ndim == 0:
            flat = flat.expand(P)
        if flat.shape != (P,):
            raise ValueError(
                f"{name} must be a number, a vector of the {P} covered parameters, or a mapping "
                f"name -> tensor; got shape {tuple(flat.shape)}"
            )
    flat = flat.detach().to(dtype=like.dtype, device=like.device).clone()
    if not torch.isfinite(flat).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return flat


class Checked:
    """A validated attribute: ``obj.x = v`` stores ``check(v)`` (which raises on bad input)."""

    def __init__(self, check: Callable[[Any], Any], doc: str):
        self.check = check
        self.__doc__ = doc

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj, self.slot)

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj, self.slot, self.check(value))
