"""What a posterior covers: the Kronecker layers (:class:`LayerSpec`) and the parameters that
get diagonal blocks (:func:`select_coverage`), resolved from the ``modules`` option."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..kron import KronBlock
from .convs import CONV_TRANSPOSED

SUPPORTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *CONV_TRANSPOSED)

__all__ = [
    "SUPPORTED_TYPES",
    "Coverage",
    "LayerSpec",
    "kron_embedding",
    "select_coverage",
    "select_layers",
]


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
    # Captured by parameter use (curvature/uses.py) instead of module hooks: "linear"
    # (``y = W a + b``, weight ``[d_out, d_in]``: F.linear), "linear_t" (``y = a W + b``,
    # weight ``[d_in, d_out]``: Hugging Face Conv1D through torch.addmm / matmul) or
    # "embedding" (``y = W^T onehot(i)``, weight ``[V, D] = [d_in, d_out]``: F.embedding; its
    # inputs are the token indices ``[B, T, 1]`` and its input factor is diagonal).
    kind: str = "module"
    weight: Tensor | None = field(default=None, repr=False)  # the parameter a use is found by
    bias: Tensor | None = field(default=None, repr=False)
    # Row range ``(start, stop)`` of the weight's output rows each recorded use writes.
    rows: list[tuple[int, int] | None] = field(default_factory=list, repr=False)

    @property
    def by_use(self) -> bool:
        """Captured by parameter use (a torch function mode), not by module hooks."""
        return self.kind != "module"

    @property
    def linear_like(self) -> bool:
        """Inputs ``[B, ..., d_in]`` and outputs ``[B, ..., d_out]`` (no patches)."""
        return self.by_use or isinstance(self.module, nn.Linear)

    @property
    def transposed(self) -> bool:
        """The weight is stored ``[d_in, d_out]`` (its Kronecker block is ``A (x) G`` in the
        parameter's own ``p.flatten()`` order: stored as ``KronBlock(G=A, A=G)``): a
        ``"linear_t"`` use, an embedding, or a transposed convolution (``[C_in, C_out prod(k)]``,
        :mod:`.convs`)."""
        return self.kind in ("linear_t", "embedding") or isinstance(self.module, CONV_TRANSPOSED)

    @property
    def embedding(self) -> bool:
        """An ``nn.Embedding`` weight: token-index inputs, diagonal input factor."""
        return self.kind == "embedding"

    @property
    def padding_idx(self) -> int | None:
        """The row of an embedding that receives no gradient (``None``: none)."""
        return getattr(self.module, "padding_idx", None) if self.embedding else None

    @property
    def groups(self) -> int:
        """Groups of a grouped convolution (factors ``[groups, d, d]``, ``d_out`` and ``d_in``
        per group: :mod:`laplace_kron.kron_groups`); 1 otherwise."""
        return 1 if self.by_use else getattr(self.module, "groups", 1)

    def factor_shape(self, d: int) -> tuple[int, ...]:
        """Shape of a ``d x d`` factor: ``(groups, d, d)`` for a grouped convolution."""
        return (self.groups, d, d) if self.groups > 1 else (d, d)

    @property
    def d_out(self) -> int:
        """Output size of the weight matrix view (per group)."""
        if self.by_use:
            return self.weight.shape[1 if self.transposed else 0]
        m = self.module
        if isinstance(m, CONV_TRANSPOSED):  # an output patch: C_out prod(k)
            return m.weight[0].numel()
        return m.out_features if isinstance(m, nn.Linear) else m.out_channels // m.groups

    @property
    def d_in(self) -> int:
        """Input size of the weight matrix view (per group, without the bias column)."""
        if self.by_use:
            return self.weight.shape[0 if self.transposed else 1]
        m = self.module
        if isinstance(m, nn.Linear):
            return m.in_features
        return m.in_channels if isinstance(m, CONV_TRANSPOSED) else m.weight[0].numel()

    def standard_block(self, block: KronBlock) -> KronBlock:
        """``block`` with the output factor in the ``G`` slot and the input factor in ``A``
        (eigenvalues ``[d_out, d_in]``): the block itself, except the weight block of a
        :attr:`transposed` use, whose slots hold ``A`` and ``G`` (parameter order)."""
        if not self.transposed or block.A is None:
            return block
        return KronBlock(
            block.A,
            block.G,
            list(block.param_names),
            [torch.Size((self.d_out, self.d_in))],
            False,
            None if block.eigenvalues is None else block.eigenvalues.mT,
            block.eig_A,
            block.eig_G,
        )

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
    """A supported layer called as a module; convolutions with a non-zero ``padding_mode`` or
    string padding and grouped transposed convolutions get diagonal blocks instead (as does the bias of a
    transposed convolution, which :func:`select_coverage` leaves out of its spec)."""
    if not isinstance(m, SUPPORTED_TYPES) or id(m) in functional:
        return False
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, CONV_TRANSPOSED) and m.groups > 1:
        return False
    return m.padding_mode == "zeros" and not isinstance(m.padding, str)


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
    by_use: bool = True,
    embeddings: bool = False,
) -> Coverage:
    """Resolve ``modules`` into Kronecker layers and diagonal-block parameters.

    ``None`` covers every trainable parameter: the weight and bias of a supported layer
    (nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d whose forward is called; a transposed
    convolution's bias excepted) get Kronecker blocks, every other
    parameter a diagonal block. ``"last_layer"`` covers the last supported layer only. A list
    selects modules by name or object and covers every trainable parameter in their subtrees, in
    the same way (Kronecker for supported layers, diagonal elsewhere). Parameters with
    ``requires_grad=False`` are never covered.

    ``by_use`` (the fit's default) adds Kronecker blocks for weights used functionally
    (:func:`_use_specs`: attention's projections, Hugging Face ``Conv1D``, weights tied between
    ``nn.Linear`` layers), captured by parameter use (:mod:`.uses`); ``False`` keeps module hooks
    only (the optimizers' preconditioners). ``embeddings`` (with ``by_use``) gives the weight of
    an ``nn.Embedding`` (not tied, no ``max_norm``, no ``scale_grad_by_freq``) a
    Kronecker block with a diagonal input factor instead of a diagonal block.
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
                "modules='last_layer': the model has no supported layer (nn.Linear, "
                "nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d called as a module)"
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
        if isinstance(m, CONV_TRANSPOSED):
            # Its bias is added per output position, not per input position (.convs): diagonal.
            if w is None:
                continue
            b = None
        if w is None and b is None:
            raise ValueError(f"layer {n!r} has no trainable parameters")
        specs.append(
            LayerSpec(n, m, w, b, joint=(w is not None and b is not None and not separate_bias))
        )
    if by_use:
        specs += _use_specs(named, chosen, shared, functional, separate_bias, embeddings)
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


def mha_supported(m: nn.MultiheadAttention) -> bool:
    """Attention whose projections get Kronecker blocks: a packed ``in_proj_weight`` (query, key
    and value of one width), no ``bias_k`` / ``bias_v``, no ``add_zero_attn``."""
    return m.in_proj_weight is not None and m.bias_k is None and not m.add_zero_attn


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W [in, out]`` (``torch.addmm``)."""
    w = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(w, Tensor)
        and w.ndim == 2
        and getattr(m, "nf", None) == w.shape[1]
    )


def kron_embedding(m: nn.Module) -> bool:
    """An ``nn.Embedding`` whose weight's gradient is ``sum_t g_t onehot(i_t)^T``: no
    ``max_norm`` (renormalises the weight in the forward), no ``scale_grad_by_freq`` (rescales
    the gradient by batch frequencies); ``sparse`` only changes the gradient's storage. Others
    (and ``nn.EmbeddingBag``) keep the exact diagonal block."""
    return isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq


def _use_spec(
    name: str, m: nn.Module, kind: str, w_attr: str, b_attr: str, joint_ok: bool, sep: bool
) -> LayerSpec | None:
    prefix = f"{name}." if name else ""
    w, b = getattr(m, w_attr), getattr(m, b_attr, None)
    wn = prefix + w_attr if _trainable(w) else None
    bn = prefix + b_attr if _trainable(b) else None
    if wn is None and bn is None:
        return None
    joint = wn is not None and bn is not None and joint_ok and not sep
    return LayerSpec(name, m, wn, bn, joint, kind=kind, weight=w, bias=b)


def _use_specs(
    named: list[tuple[str, nn.Module]],
    chosen: list[tuple[str, nn.Module]],
    shared: set[int],
    functional: set[int],
    sep: bool,
    embeddings: bool = False,
) -> list[LayerSpec]:
    """Kronecker layers captured by parameter use (:mod:`.uses`), among the ``chosen`` modules:

    * ``nn.MultiheadAttention`` (packed ``in_proj_weight``, no ``bias_k`` / ``add_zero_attn``):
      ``in_proj`` (one block ``[3E, E]``; cross-attention's row slices are uses with
      zero output-gradients on the other rows) and ``out_proj`` (``F.linear``);
    * Hugging Face ``Conv1D`` (``torch.addmm(b, x, W)``, ``W [in, out]``): a transposed use, its
      bias always a separate block;
    * a weight shared by several ``nn.Linear`` layers that also share their bias (or have none):
      one block over the uses of every layer (KFAC-expand);
    * with ``embeddings``, ``nn.Embedding`` (``F.embedding(i, W)``, ``W [V, D]``): a transposed
      use whose input factor is the diagonal of token counts (:func:`kron_embedding`).

    Tied weights of mixed orientation (``nn.Embedding`` tied to a linear head) stay diagonal.
    """
    out: list[LayerSpec] = []
    chosen_ids = {id(m) for _, m in chosen}
    attention = {id(c): m for _, m in named for c in m.children() if id(c) in functional}
    registrations: dict[int, list[tuple[str, nn.Module]]] = {}
    for n, m in named:
        for p in m.parameters(recurse=False):
            if id(p) in shared and p is getattr(m, "weight", None):
                registrations.setdefault(id(p), []).append((n, m))
    for n, m in chosen:
        if any(id(p) in shared for p in m.parameters(recurse=False)):
            continue
        found = []
        if isinstance(m, nn.MultiheadAttention) and mha_supported(m):
            found.append(_use_spec(n, m, "linear", "in_proj_weight", "in_proj_bias", True, sep))
        elif isinstance(attention.get(id(m)), nn.MultiheadAttention):  # its out_proj
            if mha_supported(attention[id(m)]):
                found.append(_use_spec(n, m, "linear", "weight", "bias", True, sep))
        elif _is_hf_conv1d(m):
            found.append(_use_spec(n, m, "linear_t", "weight", "bias", False, sep))
        elif embeddings and kron_embedding(m):
            found.append(_use_spec(n, m, "embedding", "weight", "bias", False, sep))
        out += [s for s in found if s is not None]
    # Weights tied between nn.Linear layers: every registration in the model must be an
    # nn.Linear called as a module with the same bias; the first registration names the block.
    for regs in registrations.values():
        mods = [m for _, m in regs]
        first_name, first = regs[0]
        if id(first) not in chosen_ids or not all(
            isinstance(m, nn.Linear) and id(m) not in functional and m.bias is first.bias
            for m in mods
        ):
            continue
        spec = _use_spec(first_name, first, "linear", "weight", "bias", True, sep)
        if spec is not None:
            out.append(spec)
    return out
