"""Architectures: fit, tune, predict. One tiny model per architecture (float64, fixed seeds, built
from configs: no downloads), checked against dense ground truth, tuned, predicted and timed.

Columns of the first table (one row per architecture):

* ``params``: parameters covered (``modules=None``: every trainable parameter) / trainable;
* ``blocks``: Kronecker / diagonal block counts;
* ``Kron = GGN``: max over Kronecker blocks of ``||K - H|| / ||H||``, ``K`` the library's block and
  ``H`` the exact GGN block (``torch.func.jacrev``, float64), fitted on ONE datum with ONE
  position / token (where KFAC is exact; grouped convolutions per group; a block whose norm is
  below 1e-6 of the whole GGN's, e.g. 0 for an attention key that sees one token, is measured
  against 1e-6 of the whole GGN's norm);
* ``EKFAC Kron = GGN``: the same for EKFAC's blocks (also exact for one datum of one position);
  with per-output noise EKFAC keeps the eigenbasis ``Q`` of the ``sigma = 1`` fit, in which the
  noise-weighted GGN ``H`` is not diagonal, so there it is compared with its definition
  ``Q diag(Q^T H Q) Q^T`` (marked "def.");
* ``diag = GGN diag``: max over diagonal blocks of the relative error against the exact GGN
  diagonal on several data (several positions, padding where the model takes it);
* ``GLM = J Sigma J^T``: max relative error of ``la.functional_covariance(x)`` against dense
  ``J Sigma J^T`` built from the library's own ``la.posterior_covariance.to_dense()``, on a few
  inputs, after tuning;
* ``tune``: the prior precision found by ``optimize_prior_precision()`` (scalar, evidence) and the
  evidence at prior 1 -> after;
* ``predict``: the output shape of ``la.predict(x)`` and whether the probabilities sum to 1
  (regression: mean and variance shapes, variance > 0);
* ``fit / epoch``: best-of-``--repeats`` time of ``lk.kfac(model, data, fisher="mc")`` over
  best-of-``--repeats`` time of one forward + backward epoch of the training loss over the same
  batches (float32 copies, ``--n-time`` data in batches of 64).

The weights are the initialisation (LoRA adapters drawn non-zero): the checks are about the
numbers, not the quality of a fit. The second table triggers what the library refuses (the first
line of its message) or leaves on a diagonal block.

    python experiments/architectures.py            # full: about 1-3 minutes on 2 cores
    python experiments/architectures.py --quick    # smoke mode (tests/test_experiments.py)
"""

from __future__ import annotations

import copy
import math
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from . import _common as C
except ImportError:  # run as a script
    import _common as C

import laplace_kron as lk
from laplace_kron.kron import DiagBlock
from laplace_kron.kron_groups import GroupedKronBlock

STUDY = "architectures"
DT = torch.float64
VOCAB = 31


# --------------------------------------------------------------------------------------------------
# dense ground truth
# --------------------------------------------------------------------------------------------------


def softmax_hessian(f: Tensor) -> Tensor:
    """``[M, C, C]`` Hessian of the cross-entropy in the logits."""
    p = torch.softmax(f, -1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def dense_jacobian(model: nn.Module, names: list[str], outputs: Callable) -> tuple[Tensor, Tensor]:
    """``outputs(call) -> [M, C]`` (``call`` runs the model): the outputs ``[M, C]`` and their
    Jacobian ``[M, C, P]`` in the named parameters (each flattened row-major, concatenated), one
    reverse pass per output (``jacrev``'s vmap fails on some embedding backward passes)."""
    params = dict(model.named_parameters())
    wanted = [params[n] for n in names]
    out = outputs(model)
    rows = []
    for r in out.flatten():
        g = torch.autograd.grad(r, wanted, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).flatten()
                               for p, gi in zip(wanted, g)]))  # fmt: skip
    M, Cn = out.shape
    return out.detach(), torch.stack(rows).reshape(M, Cn, -1)


def rel(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


# --------------------------------------------------------------------------------------------------
# architectures
# --------------------------------------------------------------------------------------------------


@dataclass
class Arch:
    """One architecture: ``build() -> model`` (float64, eval); ``data(n, seed, big) -> batches``;
    ``one() -> batch`` with one datum of one position; ``inputs(batch)`` strips the targets;
    ``outputs(call, batch) -> [M, C]`` the outputs that carry a target (the GGN's rows);
    ``all_outputs(call, x) -> [M, C]`` every output row of ``predict``'s inputs; ``loss(model,
    batch)`` the training loss; ``kw`` options of the fit (``one_kw`` for the one-position fit)."""

    name: str
    likelihood: str
    build: Callable[[], nn.Module]
    data: Callable[[int, int, bool], list]
    one: Callable[[], Any]
    inputs: Callable[[Any], Any]
    outputs: Callable[[Callable, Any], Tensor]
    all_outputs: Callable[[Callable, Any], Tensor]
    loss: Callable[[nn.Module, Any], Tensor]
    kw: dict = field(default_factory=dict)
    one_kw: dict | None = None
    one_outputs: Callable | None = None  # the one-position batch's rows (no shift)
    sigma: Tensor | None = None  # per-output noise

    def hessian(self, f: Tensor) -> Tensor:
        if self.likelihood == "classification":
            return softmax_hessian(f)
        w = torch.ones(f.shape[1], dtype=f.dtype) if self.sigma is None else self.sigma**-2
        return torch.diag(w).expand(f.shape[0], -1, -1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tensor_arch(name, likelihood, make, shape_one, shape_big, d_out, **extra) -> Arch:
    """Models taking a tensor ``x [B, *shape]``: ``(x, y)`` batches."""

    def data(n: int, seed: int, big: bool) -> list:
        g = _gen(seed)
        shape = shape_big if big else shape_one
        x = torch.randn(n, *shape, generator=g, dtype=DT)
        if likelihood == "classification":
            y = torch.randint(0, d_out, (n,), generator=g)
        else:
            with torch.no_grad():
                k = make_model().to(DT)(x[:1]).shape[1]
            y = torch.randn(n, k, generator=g, dtype=DT)
        return [(x[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]

    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return make()

    def loss(model: nn.Module, b) -> Tensor:
        f = model(b[0])
        if likelihood == "classification":
            return F.cross_entropy(f, b[1], reduction="sum")
        return 0.5 * ((f - b[1]) ** 2).sum()

    def outputs(call, b) -> Tensor:
        x = b[0] if isinstance(b, tuple) else b
        f = call(x)
        return f.reshape(f.shape[0], -1)

    return Arch(
        name,
        likelihood,
        build=lambda: make_model().to(DT).eval(),
        data=data,
        one=lambda: data(1, 7, False)[0],
        inputs=lambda b: b[0],
        outputs=outputs,
        all_outputs=outputs,
        loss=loss,
        **extra,
    )


def mlp() -> nn.Module:
    return C.mlp(6, 3, width=8, depth=2)


def cnn() -> nn.Module:
    """Conv2d + max pooling + Conv2d + average pooling + Linear; on a 1x1 input every
    convolution sees one position (the agreement check), on 8x8 the usual CNN."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def grouped_cnn() -> nn.Module:
    """Conv2d, a depthwise Conv2d (groups = channels) and a grouped 1x1 Conv2d (groups=2)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.Tanh(),
        nn.Conv2d(4, 6, 1, groups=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def conv3d() -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv3d(3, 4, 3, padding=1, stride=2),
        nn.Tanh(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def decoder() -> nn.Module:
    """ConvTranspose2d decoder (regression): ``[B, 4, h, w] -> [B, 2 * 2h * 2w]``; on a 1x1
    input both transposed convolutions see one input position."""
    return nn.Sequential(
        nn.ConvTranspose2d(4, 4, 3, padding=1),
        nn.Tanh(),
        nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1),
        nn.Flatten(),
    )


class TokenTransformer(nn.Module):
    """nn.Embedding + free positional parameter + nn.TransformerEncoderLayer + LayerNorm +
    mean pooling + Linear head."""

    def __init__(self, V: int = 11, D: int = 8, T: int = 8, n_classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Parameter(0.5 * torch.randn(T, D))
        self.layer = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, n_classes)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids) + self.pos[: ids.shape[1]]
        return self.head(self.norm(self.layer(h)).mean(1))


def transformer_arch() -> Arch:
    def data(n: int, seed: int, big: bool) -> list:
        g = _gen(seed)
        ids = torch.randint(0, 11, (n, 8 if big else 3), generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        return [(ids[i : i + 64], y[i : i + 64]) for i in range(0, n, 64)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return TokenTransformer().to(DT).eval()

    def outputs(call, b) -> Tensor:
        return call(b[0] if isinstance(b, tuple) else b)

    return Arch(
        "TransformerEncoderLayer + Embedding + LayerNorm",
        "classification",
        build=build,
        data=data,
        one=lambda: (torch.tensor([[4]]), torch.tensor([1])),
        inputs=lambda b: b[0],
        outputs=outputs,
        all_outputs=outputs,
        loss=lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum"),
    )


# ---------------------------------------------------------------- Hugging Face (imported lazily)


def _padded(seqs: list[Tensor]) -> dict[str, Tensor]:
    T = max(map(len, seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _seq_data(n: int, seed: int, big: bool, T: int) -> list:
    """Padded causal-LM batches of 64 sequences, lengths in [T/2, T]."""
    g = _gen(seed)
    seqs = [
        torch.randint(
            1, VOCAB, (int(torch.randint(T // 2, T + 1, (1,), generator=g)),), generator=g
        )
        for _ in range(n)
    ]
    return [_padded(seqs[i : i + 64]) for i in range(0, n, 64)]


def _strip(b: dict) -> dict:
    return {k: v for k, v in b.items() if k != "labels"}


def _token_outputs(shift: bool) -> Callable:
    """Logit rows that carry a target: ``[M, V]``."""

    def outputs(call, b) -> Tensor:
        f = call(**_strip(b)).logits
        y = b["labels"]
        if shift:
            f, y = f[:, :-1], y[:, 1:]
        return f[y != -100]

    return outputs


def _all_token_outputs(call, x) -> Tensor:
    f = call(**x).logits
    return f.reshape(-1, f.shape[-1])


def _hf_loss(model: nn.Module, b: dict) -> Tensor:
    return model(**b).loss


def gpt2_arch() -> Arch:
    import transformers

    def build() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16,
            attn_implementation="eager",
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg).to(DT).eval()

    return Arch(
        "GPT-2 LM (tied wte / lm_head, padded, shift_labels)",
        "classification",
        build=build,
        data=lambda n, seed, big: _seq_data(n, seed, big, 16 if big else 6),
        one=lambda: {"input_ids": torch.tensor([[5]]), "labels": torch.tensor([[7]])},
        inputs=_strip,
        outputs=_token_outputs(shift=True),
        all_outputs=_all_token_outputs,
        loss=_hf_loss,
        kw={"shift_labels": True},
        one_kw={"shift_labels": False},
        one_outputs=_token_outputs(shift=False),
    )


def bert_arch() -> Arch:
    import transformers

    def build() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=12, max_position_embeddings=16, num_labels=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
        )  # fmt: skip
        return transformers.BertForSequenceClassification(cfg).to(DT).eval()

    def data(n: int, seed: int, big: bool) -> list:
        batches = _seq_data(n, seed, big, 16 if big else 6)
        g = _gen(seed + 1)
        for b in batches:
            b["labels"] = torch.randint(0, 3, (b["input_ids"].shape[0],), generator=g)
        return batches

    def outputs(call, b) -> Tensor:
        return call(**_strip(b)).logits

    return Arch(
        "BERT sequence classifier (dict batches)",
        "classification",
        build=build,
        data=data,
        one=lambda: {"input_ids": torch.tensor([[5]]), "labels": torch.tensor([1])},
        inputs=_strip,
        outputs=outputs,
        all_outputs=lambda call, x: call(**x).logits,
        loss=_hf_loss,
    )


def _rmsnorm_float64(self, hidden_states: Tensor) -> Tensor:
    """LlamaRMSNorm without its float32 cast (the module computes in float32 whatever the
    model's dtype, which would limit every float64 check to float32 round-off)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def lora_arch() -> Arch:
    import peft
    import transformers

    def build() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
            attn_implementation="eager",
        )  # fmt: skip
        base = transformers.LlamaForCausalLM(cfg).to(DT)
        for m in base.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = types.MethodType(_rmsnorm_float64, m)
        lora = peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        )
        model = peft.get_peft_model(base, lora).to(DT).eval()
        with torch.no_grad():  # peft starts B at zero: give the adapters non-trivial values
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
        return model

    return Arch(
        "peft LoRA on Llama (adapters only, padded, shift_labels)",
        "classification",
        build=build,
        data=lambda n, seed, big: _seq_data(n, seed, big, 16 if big else 6),
        one=lambda: {"input_ids": torch.tensor([[5]]), "labels": torch.tensor([[7]])},
        inputs=_strip,
        outputs=_token_outputs(shift=True),
        all_outputs=_all_token_outputs,
        loss=_hf_loss,
        kw={"shift_labels": True},
        one_kw={"shift_labels": False},
        one_outputs=_token_outputs(shift=False),
    )


def architectures() -> list[Arch]:
    noise = torch.tensor([0.2, 0.6, 1.3], dtype=DT)
    return [
        _tensor_arch("MLP", "classification", mlp, (6,), (6,), 3),
        _tensor_arch("CNN (Conv2d + pooling + Linear)", "classification", cnn, (2, 1, 1),
                     (2, 8, 8), 3),
        _tensor_arch("depthwise / grouped CNN", "classification", grouped_cnn, (2, 1, 1),
                     (2, 8, 8), 3),
        _tensor_arch("Conv3d net", "classification", conv3d, (2, 1, 1, 1), (2, 6, 6, 6), 3),
        _tensor_arch("ConvTranspose2d decoder (regression)", "regression", decoder, (4, 1, 1),
                     (4, 4, 4), 0),
        transformer_arch(),
        gpt2_arch(),
        bert_arch(),
        lora_arch(),
        _tensor_arch("regression MLP, per-output noise [3]", "regression", mlp, (6,), (6,), 3,
                     kw={"fisher": "exact", "sigma_noise": noise}, sigma=noise),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------------


def _laplace(
    arch: Arch, model: nn.Module, data: list, kw: dict | None = None, curvature: str = "kfac"
) -> lk.KronLaplace:
    kw = {"fisher": "exact", **(arch.kw if kw is None else kw)}
    la = lk.KronLaplace(model, arch.likelihood, curvature, prior_precision=1.0, **kw)
    return la.fit(data)


def _fitted_blocks(la: lk.KronLaplace) -> Tensor:
    """The fitted curvature (noise-weighted) in parameter order: precision minus the prior."""
    P = la.n_params
    return la.posterior_precision.to_dense() - torch.eye(P, dtype=DT)


def fit_agreement(arch: Arch, model: nn.Module, several: list) -> tuple[float, float, float]:
    """(KFAC's and EKFAC's Kronecker blocks vs exact GGN blocks on one datum of one position,
    diagonal blocks vs the exact GGN diagonal on ``several``); NaN where the model has no block
    of that kind."""
    one = arch.one()
    kfac = _kron_agreement(arch, model, one, "kfac")
    ekfac = _kron_agreement(arch, model, one, "ekfac")
    la = _laplace(arch, model, several)
    curv = la.curvature
    diag_blocks = [b for b in curv.blocks if isinstance(b, DiagBlock)]
    diag = []
    if diag_blocks:
        H = _fitted_blocks(la).diagonal()
        dnames = [n for b in diag_blocks for n in b.param_names]
        exact = torch.zeros(len(H), dtype=DT)
        for batch in several:  # sum_m J_m^T H_m J_m, diagonal only
            f, J = dense_jacobian(model, dnames, lambda call, b=batch: arch.outputs(call, b))
            exact_d = torch.einsum("mcp,mcd,mdp->p", J, arch.hessian(f), J)
            start = 0
            for b in diag_blocks:
                idx = curv.block_index(b)
                exact[idx] += exact_d[start : start + len(idx)]
                start += len(idx)
        diag = [rel(H[i], exact[i]) for b in diag_blocks for i in [curv.block_index(b)]]
    return kfac, ekfac, (max(diag) if diag else float("nan"))


def _kron_agreement(arch: Arch, model: nn.Module, one: Any, curvature: str) -> float:
    """Max over Kronecker blocks of the relative error against the exact GGN block, fitted on
    one datum of one position (NaN: no Kronecker block)."""
    la = _laplace(arch, model, [one], arch.one_kw, curvature)
    H = _fitted_blocks(la)
    names = la.param_names
    rows = arch.one_outputs or arch.outputs
    f, J = dense_jacobian(model, names, lambda call: rows(call, one))
    ggn = torch.einsum("mcp,mcd,mdq->pq", J, arch.hessian(f), J)
    curv = la.curvature
    kron = []
    for b in curv.blocks:
        if isinstance(b, DiagBlock):
            continue
        i = curv.block_index(b)
        K, E = H[i][:, i], ggn[i][:, i]
        if isinstance(b, GroupedKronBlock):  # per group: KFAC drops the cross-group terms
            mask = torch.zeros_like(K, dtype=torch.bool)
            for idx in b.param_permutation().reshape(b.groups, -1):
                mask[idx.unsqueeze(1), idx.unsqueeze(0)] = True
            assert (K[~mask] == 0).all()
            K, E = K[mask], E[mask]
        if curvature == "ekfac" and arch.sigma is not None:
            # Per-output noise: EKFAC keeps the basis Q of the sigma = 1 fit (docs/math.md), in
            # which the weighted GGN is not diagonal: compare with EKFAC's definition there,
            # Q diag(Q^T H Q) Q^T (the KFAC-basis rows permuted to parameter order).
            Q = torch.kron(b.eig_G.vectors, b.eig_A.vectors)
            Qp = torch.empty_like(Q)
            Qp[b.param_permutation()] = Q
            E = Qp @ torch.diag(torch.diagonal(Qp.T @ E @ Qp)) @ Qp.T
        # floor: blocks that are 0 (a key seeing one token) or tiny (BERT's 0.02-scale init
        # deep in the net: 5e-8 of the GGN) are measured against 1e-6 of the whole GGN's norm
        kron.append(rel(K, E, 1e-6 * float(ggn.norm())))
    return max(kron) if kron else float("nan")


def glm_agreement(la: lk.KronLaplace, arch: Arch, x: Any) -> float:
    """``la.functional_covariance(x)`` vs dense ``J Sigma J^T`` from ``la``'s own posterior."""
    Sigma = la.posterior_covariance.to_dense()
    _, J = dense_jacobian(la.model, la.param_names, lambda call: arch.all_outputs(call, x))
    got = la.functional_covariance(x)  # [B, C, C]; token outputs [B, T C, T C] per sequence
    J = J.reshape(got.shape[0], -1, J.shape[-1])
    return rel(got, J @ Sigma @ J.mT)


def predict_check(la: lk.KronLaplace, arch: Arch, x: Any) -> str:
    out = la.predict(x)
    if arch.likelihood == "classification":
        ok = torch.allclose(out.sum(-1), torch.ones((), dtype=out.dtype), atol=1e-10)
        return f"{list(out.shape)}, sums to 1: {'yes' if ok else 'NO'}"
    mean, var = out
    return f"mean {list(mean.shape)}, var {list(var.shape)}, var > 0: {bool((var > 0).all())}"


def _to32(b: Any) -> Any:
    if isinstance(b, Tensor):
        return b.float() if b.is_floating_point() else b
    if isinstance(b, dict):
        return {k: _to32(v) for k, v in b.items()}
    return tuple(_to32(v) for v in b)


def _best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fit_over_epoch(arch: Arch, model: nn.Module, n: int, repeats: int) -> tuple[float, str]:
    """Best-of-``repeats`` fit time over best-of-``repeats`` forward+backward epoch (float32)."""
    m32 = copy.deepcopy(model).float()
    data = [_to32(b) for b in arch.data(n, 3, True)]
    params = [p for p in m32.parameters() if p.requires_grad]

    def epoch() -> None:
        for b in data:
            for p in params:
                p.grad = None
            arch.loss(m32, b).backward()

    if arch.sigma is None:
        kw = {k: v for k, v in arch.kw.items() if k != "fisher"}
        how = "kfac, mc"

        def fit() -> None:
            lk.kfac(m32, data, arch.likelihood, fisher="mc", **kw)

    else:  # the MC Fisher is refused with per-output noise: the exact Fisher's fit
        how = "KronLaplace.fit, exact"

        def fit() -> None:
            lk.KronLaplace(m32, arch.likelihood, **arch.kw).fit(data)

    epoch()  # warm-up (lazy initialisation, allocator)
    fit()
    return _best(fit, repeats) / _best(epoch, repeats), how


def run_arch(arch: Arch, quick: bool, n_time: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    model = arch.build()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    several = arch.data(3 if quick else 4, 1, False)
    kron_err, ekfac_err, diag_err = fit_agreement(arch, model, several)
    train = arch.data(16 if quick else 32, 2, True)
    la = _laplace(arch, model, train)
    n_kron = sum(not isinstance(b, DiagBlock) for b in la.curvature.blocks)
    n_diag = la.n_blocks - n_kron
    ev0 = float(la.log_marginal_likelihood())
    la.optimize_prior_precision()
    ev1 = float(la.log_marginal_likelihood())
    delta = float(la.prior_precision.flatten()[0])
    x = arch.inputs(arch.data(3, 5, True)[0])
    glm_err = glm_agreement(la, arch, x)
    pred = predict_check(la, arch, x)
    ratio, how = fit_over_epoch(arch, model, n_time, repeats)
    row = {
        "architecture": arch.name,
        "params": f"{la.n_params} / {trainable}",
        "blocks": f"{n_kron} / {n_diag}",
        "kron_err": kron_err,
        "ekfac_err": ekfac_err,
        "ekfac_def": arch.sigma is not None,
        "diag_err": diag_err,
        "glm_err": glm_err,
        "prior": delta,
        "evidence_before": ev0,
        "evidence_after": ev1,
        "tune": f"{delta:.3g}: {ev0:.2f} -> {ev1:.2f}",
        "predict": pred,
        "fit_over_epoch": ratio,
        "fit_how": how,
        "seconds": time.perf_counter() - t0,
    }
    C.log(f"[{STUDY}] {arch.name}: {row['seconds']:.1f} s")
    return row


def _e(v: float) -> str:
    return "–" if not math.isfinite(v) else f"{v:.1e}"


def table(rows: list[dict]) -> str:
    head = ("| architecture | params covered / trainable | blocks Kron / diag | Kron = GGN "
            "(1 datum, 1 position) | EKFAC Kron = GGN | diag = GGN diag (several data) | "
            "GLM = J Sigma J^T | tune: prior, evidence before -> after | predict | "
            "fit / epoch |")  # fmt: skip
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        fit = f"{r['fit_over_epoch']:.2f}" + ("" if r["fit_how"] == "kfac, mc" else " (exact)")
        lines.append(
            f"| {r['architecture']} | {r['params']} | {r['blocks']} | {_e(r['kron_err'])} | "
            f"{_e(r['ekfac_err'])}{' (def.)' if r['ekfac_def'] else ''} | {_e(r['diag_err'])} | {_e(r['glm_err'])} | {r['tune']} | "
            f"{r['predict']} | {fit} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# what is refused or left diagonal
# --------------------------------------------------------------------------------------------------


def _cls_data(shape: tuple, n: int = 4, d_out: int = 3, seed: int = 0) -> list:
    g = _gen(seed)
    x = torch.randn(n, *shape, generator=g, dtype=DT)
    return [(x, torch.randint(0, d_out, (n,), generator=g))]


def _ids_data(n: int = 2, T: int = 3, V: int = 7) -> list:
    g = _gen(0)
    return [(torch.randint(0, V, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g))]


class _EmbedHead(nn.Module):
    """An embedding whose table is also the output matrix through F.linear (not registered
    twice)."""

    def __init__(self, V: int = 7, D: int = 4):
        super().__init__()
        self.emb = nn.Embedding(V, D)

    def forward(self, ids: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.emb(ids)).mean(1), self.emb.weight)[:, :3]


class _SharedPositions(nn.Module):
    """Position embedding looked up with arange(T), no batch axis."""

    def __init__(self, V: int = 7, D: int = 4):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(V, D), nn.Embedding(8, D), nn.Linear(D, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(torch.tanh(h).mean(1))


class _Flattens(nn.Module):
    """A token model returning ``[B*T, C]``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).reshape(-1, 3)


class _UsedTwiceDifferently(nn.Module):
    """A linear weight also used by an elementwise product (outside the recorded maps)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + x * self.lin.weight.sum(0)


def _kinds(curv, names: Sequence[str]) -> str:
    out = []
    for b in curv.blocks:
        if any(n in b.param_names for n in names):
            out.append(f"{', '.join(b.param_names)}: {type(b).__name__}")
    return "; ".join(out)


def refusal_cases() -> list[tuple[str, Callable[[], str]]]:
    seq = nn.Sequential
    noise = torch.ones(3, dtype=DT)

    def blocks(model, data, names, **kw) -> Callable[[], str]:
        def run() -> str:
            torch.manual_seed(0)
            return _kinds(lk.kfac(model.to(DT).eval(), data, "classification", **kw), names)

        return run

    def reg_noise(model, shape, **kw) -> Callable[[], str]:
        def run() -> str:
            torch.manual_seed(0)
            m = model.to(DT).eval()
            x = torch.randn(4, *shape, dtype=DT)
            y = torch.randn(4, 3, dtype=DT)
            la = lk.KronLaplace(m, "regression", sigma_noise=noise, **kw).fit([(x, y)])
            return type(la).__name__ + " fitted"

        return run

    def tune_diag_noise() -> str:
        x, y = torch.randn(8, 6, dtype=DT), torch.randn(8, 3, dtype=DT)
        la = lk.KronLaplace(mlp().to(DT), "regression", fisher="exact", sigma_noise=noise)
        la.fit([(x, y)]).optimize_prior_precision(granularity="diag")
        return "tuned"

    def bn_train() -> str:
        torch.manual_seed(0)
        m = seq(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT).train()
        lk.kfac(m, _cls_data((6,)), "classification")
        return "fitted"

    def flattened_bt() -> str:
        torch.manual_seed(0)
        x = torch.randn(2, 5, 4, dtype=DT)  # B = 2, T = 5: outputs [10, 3]
        y = torch.randint(0, 3, (2, 5))  # targets [B, T] instead of [B*T]
        m = _Flattens().to(DT).eval()
        a = lk.kfac(m, [(x, y)], "classification", fisher="exact").to_dense()
        b = lk.kfac(_Unflat(m), [(x, y)], "classification", fisher="exact").to_dense()
        return f"accepted: equals the [B, T, C] model's curvature to {rel(a, b):.0e}"

    def flattened_mismatch() -> str:
        x = torch.randn(2, 5, 4, dtype=DT)
        y = torch.randint(0, 3, (2, 4))  # [B, T - 1] targets for [B*T, C] outputs
        lk.kfac(_Flattens().to(DT).eval(), [(x, y)], "classification")
        return "fitted"

    def flattened_odd_rows() -> str:
        class Drop(_Flattens):
            def forward(self, x):
                return super().forward(x)[:-1]  # B*T - 1 rows

        x = torch.randn(2, 5, 4, dtype=DT)
        y = torch.randint(0, 3, (9,))
        lk.kfac(Drop().to(DT).eval(), [(x, y)], "classification")
        return "fitted"

    def flattened_ok() -> str:
        torch.manual_seed(0)
        x = torch.randn(2, 5, 4, dtype=DT)
        y = torch.randint(0, 3, (10,))
        m = _Flattens().to(DT).eval()
        a = lk.kfac(m, [(x, y)], "classification", fisher="exact").to_dense()
        b = lk.kfac(_Unflat(m), [(x, y.reshape(2, 5))], "classification", fisher="exact")
        return f"accepted: equals the [B, T, C] model's curvature to {rel(a, b.to_dense()):.0e}"

    return [
        ("weight tied between nn.Embedding and F.linear (registered once)",
         blocks(_EmbedHead(), _ids_data(), ["emb.weight"])),
        ("... the same with embeddings='diag'",
         blocks(_EmbedHead(), _ids_data(), ["emb.weight"], embeddings="diag")),
        ("position embedding looked up with arange(T) (no batch axis), 2 data",
         blocks(_SharedPositions(), _ids_data(), ["pos.weight"])),
        ("nn.Linear weight also used outside its module call (x * W.sum(0))",
         blocks(_UsedTwiceDifferently(), _cls_data((3,)), ["lin.weight"])),
        ("nn.Embedding(max_norm=1.0)",
         blocks(seq(nn.Embedding(7, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 3)),
                _ids_data(), ["0.weight"])),
        ("nn.Embedding(scale_grad_by_freq=True)",
         blocks(seq(nn.Embedding(7, 4, scale_grad_by_freq=True), nn.Flatten(),
                    nn.Linear(12, 3)), _ids_data(), ["0.weight"])),
        ("nn.Embedding with weight_sharing='reduce'",
         blocks(seq(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)), _ids_data(),
                ["0.weight"], weight_sharing="reduce")),
        ("grouped ConvTranspose2d (groups=2)",
         blocks(seq(nn.ConvTranspose2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 3)),
                _cls_data((2, 1, 1)), ["0.weight"])),
        ("ConvTranspose2d bias",
         blocks(seq(nn.ConvTranspose2d(2, 4, 3), nn.Flatten(), nn.Linear(36, 3)),
                _cls_data((2, 1, 1)), ["0.weight", "0.bias"])),
        ("Conv2d padding_mode='reflect'",
         blocks(seq(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                    nn.Linear(48, 3)), _cls_data((2, 4, 4)), ["0.weight"])),
        ("Conv2d padding='same'",
         blocks(seq(nn.Conv2d(2, 3, 3, padding="same"), nn.Flatten(), nn.Linear(48, 3)),
                _cls_data((2, 4, 4)), ["0.weight"])),
        ("MultiheadAttention with add_zero_attn=True",
         blocks(_Attn(add_zero_attn=True), _cls_data((3, 4)), ["attn.in_proj_weight"])),
        ("MultiheadAttention with separate q, k, v weights (kdim != embed_dim)",
         blocks(_Attn(kdim=3, vdim=3), _cls_data((3, 4)), ["attn.q_proj_weight"])),
        ("LayerNorm / BatchNorm (eval) affine",
         blocks(seq(nn.Linear(6, 4), nn.LayerNorm(4), nn.BatchNorm1d(4), nn.Linear(4, 3)),
                _cls_data((6,)), ["1.weight", "2.weight"])),
        ("BatchNorm1d in train mode (diagonal blocks)", bn_train),
        ("MC Fisher with a tensor sigma_noise",
         reg_noise(mlp(), (6,), fisher="mc")),
        ("tensor sigma_noise with likelihood='classification'",
         lambda: type(lk.KronLaplace(mlp(), "classification", sigma_noise=noise)).__name__),
        ("granularity='diag' prior with per-output noise", tune_diag_noise),
        ("per-output noise with a grouped convolution",
         reg_noise(seq(nn.Conv2d(2, 4, 1, groups=2), nn.Flatten(), nn.Linear(4, 3)),
                   (2, 1, 1), fisher="exact")),
        ("flattened [B*T, C] outputs, targets [B, T]", flattened_bt),
        ("flattened [B*T, C] outputs, targets [B, T-1] (mismatch)", flattened_mismatch),
        ("flattened outputs whose rows are not a multiple of B", flattened_odd_rows),
        ("flattened [B*T, C] outputs, targets [B*T]", flattened_ok),
    ]  # fmt: skip


class _Unflat(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner.lin(x)


class _Attn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        kv = x[..., :3] if self.attn.kdim != 4 else x
        return self.head(self.attn(x, kv, kv, need_weights=False)[0].mean(1))


def refusals() -> list[dict]:
    rows = []
    for case, run in refusal_cases():
        try:
            out = run()
        except (ValueError, TypeError, NotImplementedError) as e:
            out = f"refused ({type(e).__name__}): {str(e).splitlines()[0]}"
        rows.append({"case": case, "result": out})
    return rows


def refusal_table(rows: list[dict]) -> str:
    lines = ["| case | what the library does |", "|---|---|"]
    lines += [f"| {r['case']} | {r['result'].replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    p = C.make_parser(STUDY, __doc__.split("\n")[0], default_seeds=[0])
    p.add_argument("--n-time", type=int, default=256, help="data of the timed fit / epoch")
    p.add_argument("--repeats", type=int, default=3, help="timing: best of this many runs")
    p.add_argument(
        "--only", nargs="+", default=None, help="architectures whose name has one of these"
    )
    args = p.parse_args(argv)
    C.setup(args)
    n_time, repeats = (16, 1) if args.quick else (args.n_time, args.repeats)
    torch.set_default_dtype(DT)  # the architectures are built in float64
    try:
        archs = [a for a in architectures()
                 if not args.only or any(s.lower() in a.name.lower() for s in args.only)]  # fmt: skip
        rows = [run_arch(a, args.quick, n_time, repeats) for a in archs]
        refused = refusals()
    finally:
        torch.set_default_dtype(torch.float32)
    t1, t2 = table(rows), refusal_table(refused)
    print("\n" + t1 + "\n\n" + t2 + "\n", flush=True)
    config = {"quick": args.quick, "n_time": n_time, "repeats": repeats,
              "threads": torch.get_num_threads()}  # fmt: skip
    C.write_results(
        args.out,
        STUDY,
        "Architectures: fit, tune, predict",
        [("Fit, tune, predict", t1), ("What is refused or left diagonal", t2)],
        {"rows": rows, "refusals": refused},
        config,
    )
    return {"rows": rows, "refusals": refused}


if __name__ == "__main__":
    main()
