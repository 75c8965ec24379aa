"""What a posterior covers: the Kronecker layers (:class:`LayerSpec`) and the parameters that
get diagonal blocks (:func:`select_coverage`), resolved from the ``modules`` option."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)

__all__ = ["SUPPORTED_TYPES", "Coverage", "LayerSpec", "select_coverage", "select_layers"]


@dataclass
class LayerSpec:
    """A covered layer and how its parameters map to Kronecker blocks.

    ``weight_name`` / ``bias_name`` are full parameter names (``None`` if absent or frozen).
    ``joint`` means one block over the augmented weight ``[W | b]``; otherwise weight and bias get
    separate blocks (the bias block has the single factor ``G``).
    """

    name: str
    module: nn.Module
    weight_name: str | None
    bias_name: str | None
    joint: bool
    inputs: list[Tensor] = field(default_factory=list, repr=False)
    outputs: list[Tensor] = field(default_factory=list, repr=False)

    @property
    def d_out(self) -> int:
        m = self.module
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels

    @property
    def d_in(self) -> int:
        """Input size of the weight matrix view (without the bias column)."""
        m = self.module
        if isinstance(m, nn.Linear):
            return m.in_features
        return m.weight[0].numel()

    @property
    def has_weight(self) -> bool:
        return self.weight_name is not None

    @property
    def has_bias(self) -> bool:
        return self.bias_name is not None


def _trainable(p: nn.Parameter | None) -> bool:
    return p is not None and p.requires_grad


@dataclass
class Coverage:
    """What a posterior covers: Kronecker layers and diagonal-block parameters.

    ``specs``: the layers whose weight / bias get Kronecker blocks; ``diag_names``: every other
    covered parameter (one diagonal block each); ``param_names``: all covered parameters in
    ``model.named_parameters()`` order (the order of flat vectors and ``to_dense()``).
    """

    specs: list[LayerSpec]
    diag_names: list[str]
    param_names: list[str]


def _functional_linears(named: list[tuple[str, nn.Module]]) -> set[int]:
    """Ids of supported layers whose forward hooks never fire because their parent calls their
    weight functionally: ``nn.MultiheadAttention.out_proj`` (``F.multi_head_attention_forward``).
    Their parameters get diagonal blocks."""
    out = set()
    for _, m in named:
        if isinstance(m, nn.MultiheadAttention):
            out.update(id(c) for c in m.children() if isinstance(c, SUPPORTED_TYPES))
    return out


def _kron_capable(m: nn.Module, functional: set[int]) -> bool:
    """A supported layer called as a module; convolutions with ``groups > 1``, a non-zero
    ``padding_mode`` or string padding get diagonal blocks instead."""
    if not isinstance(m, SUPPORTED_TYPES) or id(m) in functional:
        return False
    if isinstance(m, nn.Linear):
        return True
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def select_layers(
    model: nn.Module,
    modules: None | str | Sequence[str | nn.Module] = None,
    separate_bias: bool = False,
) -> list[LayerSpec]:
    """The Kronecker layers of :func:`select_coverage` (see there)."""
    return select_coverage(model, modules, separate_bias).specs


def select_coverage(
    model: nn.Module,
    modules: None | str | Sequence[str | nn.Module] = None,
    separate_bias: bool = False,
) -> Coverage:
    """Resolve ``modules`` into Kronecker layers and diagonal-block parameters.

    ``None`` covers every trainable parameter: the weight and bias of a supported layer
    (nn.Linear, nn.Conv1d, nn.Conv2d whose forward is called) get Kronecker blocks, every other
    parameter a diagonal block. ``"last_layer"`` covers the last supported layer only. A list
    selects modules by name or object and covers every trainable parameter in their subtrees, in
    the same way (Kronecker for supported layers, diagonal elsewhere). Parameters with
    ``requires_grad=False`` are never covered.
    """
    named = [(n, m) for n, m in model.named_modules()]
    with_params = [
        (n, m) for n, m in named if any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    if not with_params:
        raise ValueError("the model has no trainable parameters to put a Laplace posterior on")
    functional = _functional_linears(named)
    if modules is None:
        chosen = with_params
    elif isinstance(modules, str):
        if modules != "last_layer":
            raise ValueError(
                f"modules={modules!r} is not understood: use None (all layers), 'last_layer', "
                "or a list of module names / modules"
            )
        sup = [(n, m) for n, m in with_params if _kron_capable(m, functional)]
        if not sup:
            raise ValueError(
                "modules='last_layer': the model has no supported layer (nn.Linear, nn.Conv1d, "
                "nn.Conv2d called as a module)"
            )
        chosen = [sup[-1]]
    else:
        by_name = dict(named)
        by_id = {id(m): n for n, m in named}
        roots = []
        for item in modules:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(f"modules: the model has no submodule named {item!r}")
                roots.append(item)
            elif isinstance(item, nn.Module):
                if id(item) not in by_id:
                    raise ValueError(f"modules: {type(item).__name__} is not a submodule of model")
                roots.append(by_id[id(item)])
            else:
                raise TypeError(f"modules entries must be names or nn.Modules, got {type(item)}")
        if not roots:
            raise ValueError("modules is an empty list: select at least one layer")
        inside = [
            (n, m)
            for n, m in with_params
            if any(r == "" or n == r or n.startswith(r + ".") for r in roots)
        ]
        if not inside:
            raise ValueError(f"modules {roots}: they hold no trainable parameters")
        chosen = inside
    canonical, shared = _tied(model)
    kron = [
        (n, m)
        for n, m in chosen
        if _kron_capable(m, functional)
        and not any(id(p) in shared for p in m.parameters(recurse=False))
    ]
    specs = []
    for n, m in kron:
        prefix = f"{n}." if n else ""
        w = prefix + "weight" if _trainable(m.weight) else None
        b = prefix + "bias" if _trainable(getattr(m, "bias", None)) else None
        if w is None and b is None:
            raise ValueError(f"layer {n!r} has no trainable parameters")
        specs.append(
            LayerSpec(n, m, w, b, joint=(w is not None and b is not None and not separate_bias))
        )
    kron_names = {x for s in specs for x in (s.weight_name, s.bias_name) if x}
    diag = {
        canonical[(f"{n}." if n else "") + pn]
        for n, m in chosen
        for pn, p in m.named_parameters(recurse=False, remove_duplicate=False)
        if p.requires_grad
    } - kron_names
    order = [n for n, _ in model.named_parameters()]
    return Coverage(
        specs,
        [n for n in order if n in diag],
        [n for n in order if n in diag or n in kron_names],
    )


def _tied(model: nn.Module) -> tuple[dict[str, str], set[int]]:
    """Every parameter name (tied duplicates included) -> the name ``model.named_parameters()``
    gives it, and the ids of parameters registered in several modules (tied weights). A tied
    parameter gets one diagonal block over all its uses: its per-example gradients
    (:mod:`.diagonal`) sum every use, where module hooks would see only one."""
    first: dict[int, str] = {}
    canonical: dict[str, str] = {}
    count: dict[int, int] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        canonical[n] = first.setdefault(id(p), n)
        count[id(p)] = count.get(id(p), 0) + 1
    return canonical, {i for i, c in count.items() if c > 1}
