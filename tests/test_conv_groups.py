"""Grouped convolutions (depthwise included): one Kronecker block per group, held as one
GroupedKronBlock (issue 15 item 1). Ground truth (float64): the block algebra against dense
block-diagonal matrices; a grouped convolution equals the same groups as separate ungrouped
convolutions (today's path) to 1e-12; one position of one datum gives the exact GGN block; several
positions give KFAC-expand / -reduce built by hand from F.unfold patches; EKFAC eigenvalues equal
the per-example-gradient definition; EWC diagonal, checkpoints, online Laplace match dense."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _dense import Crash, assert_penalty_is_quadratic, exact_ggn, jacobian, make_data, rel_err
from torch import nn

import laplace_kron as lk
from laplace_kron.continual import OnlineLaplace
from laplace_kron.curvature import CurvatureFitter
from laplace_kron.kron import KronBlock
from laplace_kron.kron_groups import GroupedKronBlock

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


def _psd(*shape):
    X = torch.randn(*shape[:-1], shape[-1] + 2)
    return X @ X.mT


@pytest.mark.parametrize("ekfac", [False, True])
def test_grouped_block_algebra_matches_dense(ekfac):
    torch.manual_seed(0)
    g, o, i = 3, 2, 4  # weight [6, 3, 1] + joint bias: [3, 2, 3 + 1]
    G, A = _psd(g, o, o), _psd(g, i, i)
    E = torch.rand(g, o, i) if ekfac else None
    blk = GroupedKronBlock(G, A, ["w", "b"], [(6, 3, 1), (6,)], True, E)
    # dense reference: block-diagonal kron in the matrix view's (g, o, i) order -> param order
    QG, QA = blk.eig_G.vectors, blk.eig_A.vectors
    lam = blk.eigvals()
    parts = [
        torch.kron(QG[j], QA[j]) @ torch.diag(lam[j].flatten()) @ torch.kron(QG[j], QA[j]).T
        for j in range(g)
    ]
    if not ekfac:
        torch.testing.assert_close(parts[1], torch.kron(G[1], A[1]))
    K = torch.block_diag(*parts)
    mat_idx = torch.arange(blk.n_params)
    perm = blk.param_permutation()  # vec_param[perm] = mat.flatten()
    dense = torch.empty_like(K)
    dense[perm.unsqueeze(1), perm.unsqueeze(0)] = K
    torch.testing.assert_close(blk.to_dense(), dense)
    # the parameter order: the weight first, then the bias (joint column of each group)
    v = torch.randn(2, blk.n_params)
    w, b = blk.mat_to_params(blk.vec_to_mat(v))
    torch.testing.assert_close(torch.cat([w.flatten(1), b.flatten(1)], 1), v)
    assert perm[mat_idx.reshape(g, o, i)[1, 0, -1]] == 6 * 3 + 1 * 2  # bias of channel 2
    Lam = 0.7 * dense + 0.3 * torch.eye(blk.n_params)
    m = blk.vec_to_mat(v)
    for got, want in [
        (blk.matvec(m, 0.7, 0.3), v @ Lam),
        (blk.inv_matvec(m, 0.7, 0.3), v @ torch.linalg.inv(Lam)),
    ]:
        torch.testing.assert_close(blk.mat_to_vec(got), want)
    R = blk.mat_to_vec(blk.inv_sqrt_matvec(blk.vec_to_mat(torch.eye(blk.n_params)), 0.7, 0.3))
    torch.testing.assert_close(R @ R.T, torch.linalg.inv(Lam))
    torch.testing.assert_close(blk.logdet(0.7, 0.3), torch.logdet(Lam))
    torch.testing.assert_close(blk.trace(0.7, 0.3), Lam.trace())
    torch.testing.assert_close(blk.quadratic(m, 0.7, 0.3), ((v @ Lam) * v).sum(-1))
    # one group is the ungrouped block
    one = GroupedKronBlock(G[:1], A[:1], ["w"], [(2, 4)], False, None if E is None else E[:1])
    ref = KronBlock(G[0], A[0], ["w"], [(2, 4)], False, None if E is None else E[0])
    assert rel_err(one.to_dense(0.5, 0.2), ref.to_dense(0.5, 0.2)) < 1e-12
    assert abs(float(one.logdet(0.5, 0.2) - ref.logdet(0.5, 0.2))) < 1e-12


class Grouped(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Split(nn.Module):
    """The groups of ``conv`` as separate ungrouped convolutions (same weights)."""

    def __init__(self, conv, head):
        super().__init__()
        g = conv.groups
        o, i = conv.out_channels // g, conv.in_channels // g
        kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        self.parts = nn.ModuleList(
            [nn.Conv2d(i, o, conv.kernel_size, bias=conv.bias is not None, **kw) for _ in range(g)]
        )
        with torch.no_grad():
            for j, p in enumerate(self.parts):
                p.weight.copy_(conv.weight[j * o : (j + 1) * o])
                if conv.bias is not None:
                    p.bias.copy_(conv.bias[j * o : (j + 1) * o])
        self.i = i
        self.head = copy.deepcopy(head)

    def forward(self, x):
        xs = x.split(self.i, dim=1)
        h = torch.cat([p(xj) for p, xj in zip(self.parts, xs)], dim=1)
        return self.head(torch.tanh(h).flatten(1))


def _grouped_model(groups=2, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, stride=1, padding=0, groups=groups)
    model = Grouped(conv).eval()
    model(torch.zeros(1, 4, 5, 5))
    return model


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("separate_bias", [False, True])
def test_grouped_equals_separate_ungrouped_convolutions(weight_sharing, separate_bias):
    model = _grouped_model()
    split = Split(model.conv, model.head).eval()
    # 24 data > 19 columns: full-rank reduce factors (a degenerate eigenspace would make the
    # EKFAC eigenvalues depend on the basis chosen in it)
    x, y = make_data("classification", 24, 3, (4, 5, 5))
    kw = dict(fisher="exact", weight_sharing=weight_sharing, separate_bias=separate_bias)
    data = [(x[:13], y[:13]), (x[13:], y[13:])]
    for fit in (lk.kfac, lk.ekfac):
        grouped = fit(model, data, "classification", modules=["conv"], **kw)
        parts = fit(split, data, "classification", modules=["parts"], **kw)
        per = 1 if separate_bias else 0  # separate: [w, b] blocks per part
        gb = [b for b in grouped.blocks if isinstance(b, GroupedKronBlock)]
        assert len(gb) == (2 if separate_bias else 1)
        for k, blk in enumerate(gb):
            refs = [parts.blocks[j * (1 + per) + k] for j in range(2)]
            for j, ref in enumerate(refs):
                assert rel_err(blk.G[j], ref.G) < 1e-12
                if ref.A is not None:
                    assert rel_err(blk.A[j], ref.A) < 1e-12
                if fit is lk.ekfac:
                    assert rel_err(blk.eigenvalues[j], ref.eigenvalues) < 1e-10
        if separate_bias and fit is lk.kfac:  # the weight block is their block diagonal
            w = torch.block_diag(parts.blocks[0].to_dense(), parts.blocks[2].to_dense())
            assert rel_err(gb[0].to_dense(), w) < 1e-12


@pytest.mark.parametrize(
    "conv,shape",
    [
        (lambda: nn.Conv2d(3, 3, 3, groups=3), (3, 3, 3)),  # depthwise, one output pixel
        (lambda: nn.Conv1d(4, 6, 3, groups=2), (4, 3)),
        (lambda: nn.Conv3d(2, 4, 2, groups=2), (2, 2, 2, 2)),
    ],
)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_single_position_grouped_block_is_the_exact_ggn(conv, shape, likelihood):
    torch.manual_seed(0)
    model = Grouped(conv()).eval()
    model(torch.zeros(1, *shape))
    x, y = make_data(likelihood, 1, 3, shape)
    for sep in (False, True):
        curv = lk.kfac(model, [(x, y)], likelihood, fisher="exact", separate_bias=sep)
        blocks = [b for b in curv.blocks if isinstance(b, GroupedKronBlock)]
        assert len(blocks) == (2 if sep else 1)
        for b in curv.blocks:
            H = exact_ggn(model, x, b.param_names, likelihood)
            if not isinstance(b, GroupedKronBlock):
                assert rel_err(b.to_dense(), H) < 1e-12, b.param_names
                continue
            # each group's block (the exact GGN couples the groups; KFAC drops that)
            perm, dense = b.param_permutation().reshape(b.groups, -1), b.to_dense()
            for idx in perm:
                sub = (idx.unsqueeze(1), idx.unsqueeze(0))
                assert rel_err(dense[sub], H[sub]) < 1e-12, b.param_names
            off = torch.ones_like(dense, dtype=torch.bool)
            for idx in perm:
                off[idx.unsqueeze(1), idx.unsqueeze(0)] = False
            assert (dense[off] == 0).all()


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_grouped_factors_match_hand_built_kfac(weight_sharing):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 2, stride=1, padding=1, dilation=2, groups=4)  # depthwise
    model = Grouped(conv).eval()
    model(torch.zeros(1, 4, 4, 4))
    x, y = make_data("regression", 3, 3, (4, 4, 4))
    curv = lk.kfac(
        model,
        [(x, y)],
        "regression",
        fisher="exact",
        weight_sharing=weight_sharing,
        modules=["conv"],
    )
    (blk,) = curv.blocks
    z = conv(x).detach()  # [B, 4, H, W]
    J = torch.func.vmap(
        torch.func.jacrev(lambda zz: model.head(torch.tanh(zz[None]).flatten(1))[0])
    )(z)
    g = J.transpose(0, 1).flatten(3).mT  # regression (S = I): [K, B, T, 4]
    a = F.unfold(x, 2, dilation=2, padding=1).mT  # [B, T, 4 * 4], columns (c, k)
    B, T = a.shape[:2]
    a = torch.cat([a.unflatten(-1, (4, 4)), torch.ones(B, T, 4, 1)], -1)  # [B, T, g, 5]
    g = g.unflatten(-1, (4, 1))
    if weight_sharing == "expand":
        A = torch.einsum("btgi,btgj->gij", a, a) / (B * T)
        G = torch.einsum("kbtgi,kbtgj->gij", g, g)
    else:
        am, gs = a.mean(1), g.sum(2)
        A = torch.einsum("bgi,bgj->gij", am, am) / B
        G = torch.einsum("kbgi,kbgj->gij", gs, gs)
    torch.testing.assert_close(blk.A, A)
    torch.testing.assert_close(blk.G, G)


def test_grouped_ekfac_eigenvalues_and_ewc_diagonal_are_the_definition():
    model = _grouped_model()
    x, y = make_data("regression", 3, 3, (4, 5, 5))
    e = lk.ekfac(model, [(x, y)], "regression", fisher="exact")
    blk = next(b for b in e.blocks if isinstance(b, GroupedKronBlock))
    J = torch.cat([jacobian(model, x[n : n + 1], blk.param_names) for n in range(3)])
    mats = blk.vec_to_mat(J.flatten(0, 1))  # [N C, g, o, i]
    ref = (blk.eig_G.vectors.mT @ mats @ blk.eig_A.vectors).square().sum(0)
    torch.testing.assert_close(blk.eigenvalues, ref, rtol=1e-10, atol=1e-13)
    opts = lk.curvature.CurvatureOptions(fisher="exact")
    diag, _ = lk.curvature.fit_diagonal(model, [(x, y)], "regression", opts)
    H = exact_ggn(model, x, list(diag), "regression").diagonal()
    torch.testing.assert_close(torch.cat([v.flatten() for v in diag.values()]), H)


def test_grouped_checkpoint_resume_and_empty_rank_shapes(tmp_path, monkeypatch):
    model = _grouped_model()
    x, y = make_data("classification", 8, 3, (4, 5, 5))
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)]
    path = tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        CurvatureFitter(model, "classification", fisher="exact").fit_ekfac(
            Crash(batches, 5), checkpoint=path, checkpoint_every=1
        )
    resumed = CurvatureFitter(model, "classification", fisher="exact").fit_ekfac(
        batches, checkpoint=path, checkpoint_every=1
    )
    ref = lk.ekfac(model, batches, "classification", fisher="exact")
    assert rel_err(resumed.to_dense(), ref.to_dense()) < 1e-12
    # a rank without data creates zero sums of the grouped shapes before the all-reduce
    from laplace_kron.curvature import state as state_mod

    monkeypatch.setattr(state_mod.dist_utils, "all_reduce_sum_", lambda ts: None)
    monkeypatch.setattr(state_mod.dist_utils, "all_reduce_max_", lambda ts: None)
    fitter = CurvatureFitter(model, "classification", fisher="exact")
    st = state_mod.FitState(fitter.specs, torch.float64, torch.device("cpu"), distributed=True)
    st.all_reduce_kfac()
    assert [tuple(t.shape) for t in st.A_sum] == [(2, 19, 19), (55, 55)]
    assert [tuple(t.shape) for t in st.G_sum] == [(2, 3, 3), (3, 3)]


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_online_laplace_with_grouped_blocks(curvature, tmp_path):
    model = _grouped_model()
    ol = OnlineLaplace(model, "classification", curvature=curvature, fisher="exact", max_terms=1)
    for t in range(2):  # the second task merges into one term per block
        x, y = make_data("classification", 4, 3, (4, 5, 5), seed=t)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ol.consolidate([(x, y)])
    H = ol.to_dense()
    state = ol.state_dict()
    ol2 = OnlineLaplace(copy.deepcopy(model), "classification", curvature=curvature)
    ol2.load_state_dict(state)
    torch.testing.assert_close(ol2.to_dense(), H)
    Lam = H + ol.prior_precision * torch.eye(H.shape[0])
    assert_penalty_is_quadratic(ol, model, Lam)


def test_optim_refuses_grouped_layers():
    model = _grouped_model()
    lk.optim.KFAC(model, eps=0.1).remove()  # default: the grouped conv keeps its plain gradient
    with pytest.raises(ValueError, match="groups=1"):
        lk.optim.KFAC(model, eps=0.1, modules=["conv"])
