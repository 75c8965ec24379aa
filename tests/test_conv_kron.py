"""Kronecker blocks of nn.Conv3d and the transposed convolutions (issue 15 item 1).

Ground truth (float64): a layer that sees one position of one datum gets the exact GGN block
(torch.func); with several positions the factors equal KFAC-expand / -reduce built by hand from
patches made another way (a convolution against an identity kernel; a transposed convolution's
output patches from the Jacobian of one input position); EKFAC eigenvalues equal the dense
per-example-gradient definition; evidence, GLM predictive and sampling on a small CNN match dense.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from _dense import exact_ggn, jacobian, make_data, rel_err
from torch import nn

import laplace_kron as lk
from laplace_kron.kron import DiagBlock, KronBlock

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


def conv3d_net(d_out=3):
    """Conv3d with stride / padding / dilation (18 positions) -> Conv3d seeing one position."""
    return nn.Sequential(
        nn.Conv3d(2, 3, (2, 3, 3), stride=(2, 1, 2), padding=(0, 1, 1), dilation=(1, 2, 1)),
        nn.Tanh(),  # [3, 2, 3, 3]
        nn.Conv3d(3, 4, (2, 3, 3)),  # one position
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4, d_out),
    )


def convt_net(d_out=3):
    """ConvTranspose2d on a 1 x 1 input (one position) -> ConvTranspose2d with stride, padding,
    output_padding (9 positions) -> Linear."""
    return nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3),  # 1x1 -> 3x3
        nn.Tanh(),
        nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1),  # 3x3 -> 6x6
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(72, d_out),
    )


def convt1d_net(d_out=2):
    """ConvTranspose1d whose output_padding exceeds its stride (dilation 3): more unfolded
    windows than input positions, cropped."""
    return nn.Sequential(
        nn.ConvTranspose1d(2, 3, 2, stride=1, dilation=3, output_padding=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(d_out),
    )


CASES = {
    "conv3d": (conv3d_net, (2, 4, 5, 5)),
    "convt2d": (convt_net, (3, 1, 1)),
    "convt1d": (convt1d_net, (2, 4)),
}


def _model(name, seed=0):
    Net, shape = CASES[name]
    torch.manual_seed(seed)
    model = Net()
    model(torch.zeros(1, *shape))  # materialise a lazy layer
    return model.eval(), shape


@pytest.mark.parametrize("likelihood,d_out", [("classification", 3), ("regression", 2)])
@pytest.mark.parametrize("name", ["conv3d", "convt2d"])
def test_single_position_blocks_are_the_exact_ggn(name, likelihood, d_out):
    Net, shape = CASES[name]
    torch.manual_seed(0)
    model = Net(d_out).eval()
    x, y = make_data(likelihood, 1, d_out, shape)
    for sep in (False, True):
        curv = lk.kfac(model, [(x, y)], likelihood, fisher="exact", separate_bias=sep)
        first = next(b for b in curv.blocks if "0.weight" in b.param_names)
        assert isinstance(first, KronBlock)  # a Kronecker block, not diagonal
        # every layer but the first conv3d (18 positions) / second convT (9) sees one position
        many = "0." if name == "conv3d" else "2.weight"
        for b in curv.blocks:
            if isinstance(b, KronBlock) and not b.param_names[0].startswith(many):
                H = exact_ggn(model, x, b.param_names, likelihood)
                assert rel_err(b.to_dense(), H) < 1e-12, b.param_names
        # a transposed convolution's bias is a diagonal block with the exact GGN diagonal
        for b in curv.blocks:
            if isinstance(b, DiagBlock):
                assert name == "convt2d" and b.param_names[0].endswith(".bias")
                H = exact_ggn(model, x, b.param_names, likelihood)
                torch.testing.assert_close(b.values.flatten(), H.diagonal())


def _layer_gradients(model, i, x):
    """Regression (S = I): output-gradients of layer ``i``'s output, ``[C, B, *out]``."""
    z = model[: i + 1](x).detach()
    rest = model[i + 1 :]
    J = torch.func.vmap(torch.func.jacrev(lambda zz: rest(zz[None])[0]))(z)  # [B, C, *out]
    return J.transpose(0, 1)


def _conv3d_patches(m, x):
    """Patches by a convolution against an identity kernel, ``[B, T, C_in prod(k)]``."""
    D = m.weight[0].numel()
    eye = torch.eye(D).reshape(D, *m.weight.shape[1:])
    return F.conv3d(x, eye, None, m.stride, m.padding, m.dilation).flatten(2).mT


def _convt_output_patches(m, x, gy):
    """``u'_p[o, k] = dL/dW[i, o, k]`` of input position ``p`` alone: the Jacobian of
    ``<gy, conv_transpose(e_p, W)>`` for a one-hot input ``e_p`` on channel 0. ``[B, T, d]``."""
    spatial = x.shape[2:]
    T = math.prod(spatial)
    E = torch.zeros(T, m.in_channels, T)
    E[torch.arange(T), 0, torch.arange(T)] = 1.0
    E = E.reshape(T, m.in_channels, *spatial)
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[len(spatial)]

    def inner(W, g):  # [T]
        y = conv(E, W, None, m.stride, m.padding, m.output_padding, 1, m.dilation)
        return (y * g).flatten(1).sum(1)

    rows = []
    for g in gy.flatten(0, 1):  # one output-gradient at a time
        jac = torch.func.jacrev(inner)(m.weight.detach(), g)  # [T, C_in, C_out, *k]
        rows.append(jac[:, 0].flatten(1))
    return torch.stack(rows).unflatten(0, gy.shape[:2])  # [K, B, T, d]


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("name", ["conv3d", "convt2d", "convt1d"])
def test_factors_match_hand_built_kfac(name, weight_sharing):
    model, shape = _model(name)
    x, y = make_data("regression", 4, 2 if name == "convt1d" else 3, shape)
    i = 2 if name == "convt2d" else 0
    m = model[i]
    curv = lk.kfac(
        model,
        [(x[:3], y[:3]), (x[3:], y[3:])],
        "regression",
        fisher="exact",
        weight_sharing=weight_sharing,
        modules=[str(i)],
        separate_bias=True,
    )
    xin = model[:i](x).detach()
    gy = _layer_gradients(model, i, x)  # [K, B, C_out, *S_out]
    if name == "conv3d":
        a = _conv3d_patches(m, xin)
        g = gy.flatten(3).mT  # [K, B, T, C_out]
    else:
        a = xin.flatten(2).mT  # input positions, C_in
        g = _convt_output_patches(m, xin, gy)
    B, T = a.shape[:2]
    if weight_sharing == "expand":
        A = torch.einsum("bti,btj->ij", a, a) / (B * T)
        G = torch.einsum("kbti,kbtj->ij", g, g)
    else:
        am, gs = a.mean(1), g.sum(2)
        A = am.T @ am / B
        G = torch.einsum("kbi,kbj->ij", gs, gs)
    w = curv.blocks[0]
    assert w.param_names == [f"{i}.weight"]
    if name == "conv3d":
        torch.testing.assert_close(w.G, G)
        torch.testing.assert_close(w.A, A)
        gb = gy.flatten(3).sum(-1) if weight_sharing == "reduce" else gy.flatten(3).mT
        Gb = torch.einsum("...i,...j->ij", gb, gb)
        torch.testing.assert_close(curv.blocks[1].G, Gb)
    else:  # weight [C_in, C_out, *k]: the block A (x) G in W.flatten() order
        torch.testing.assert_close(w.G, A)
        torch.testing.assert_close(w.A, G)
        assert isinstance(curv.blocks[1], DiagBlock)


@pytest.mark.parametrize("name", ["conv3d", "convt2d"])
def test_ekfac_eigenvalues_are_the_per_example_definition(name):
    model, shape = _model(name)
    x, y = make_data("regression", 3, 3, shape)
    e = lk.ekfac(model, [(x, y)], "regression", fisher="exact", separate_bias=True)
    for b in e.blocks:
        if not isinstance(b, KronBlock):
            continue
        # per-example, per-output gradients (S = I): E = sum (Q_G^T mat(grad) Q_A)^2
        J = torch.cat([jacobian(model, x[n : n + 1], b.param_names) for n in range(3)])
        mats = b.vec_to_mat(J.flatten(0, 1))
        ref = (b.eig_G.vectors.T @ mats @ b.eig_A.vectors).square().sum(0)
        torch.testing.assert_close(b.eigenvalues, ref, rtol=1e-10, atol=1e-13)


class SmallCNN(nn.Module):
    """Conv3d, ConvTranspose2d (bias diagonal), a depthwise Conv2d (grouped) and a head."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv3d(1, 2, (2, 2, 2))  # [1, 2, 3, 3] -> [2, 1, 2, 2]
        self.ct = nn.ConvTranspose2d(2, 3, 2, stride=2)  # [2, 2, 2] -> [3, 4, 4]
        self.dw = nn.Conv2d(3, 3, 3, groups=3)  # -> [3, 2, 2]
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.c3(x)).squeeze(2)
        h = torch.tanh(self.dw(torch.tanh(self.ct(h))))
        return self.head(h.flatten(1))


@pytest.fixture(scope="module")
def fitted():
    old = torch.get_default_dtype()  # module fixtures run before conftest's per-test dtype
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x, y = make_data("classification", 5, 3, (1, 2, 3, 3))
    la = lk.KronLaplace(model, "classification", fisher="exact", curvature="ekfac").fit([(x, y)])
    la.prior_precision = torch.linspace(0.5, 2.0, la.n_blocks)
    yield la, x
    torch.set_default_dtype(old)


def test_coverage_of_the_small_cnn(fitted):
    la, _ = fitted
    kinds = {b.param_names[0]: type(b).__name__ for b in la.curvature.blocks}
    assert kinds["c3.weight"] == kinds["ct.weight"] == kinds["head.weight"] == "KronBlock"
    assert kinds["ct.bias"] == "DiagBlock"
    assert kinds["dw.weight"] == "GroupedKronBlock"  # joint with dw.bias


def test_evidence_glm_and_sampling_match_dense(fitted, tmp_path):
    la, x = fitted
    curv = la.curvature
    deltas = la.block_deltas()
    dvec = torch.cat([d.expand(b.n_params) for b, d in zip(curv.blocks, deltas)])
    Lam = curv.to_dense() + torch.diag(dvec)
    torch.testing.assert_close(la.posterior_precision.to_dense(), Lam, rtol=1e-10, atol=1e-12)
    Sig = torch.linalg.inv(Lam)
    theta = la.mean
    evidence = -curv.loss - 0.5 * (dvec * theta**2).sum() + 0.5 * dvec.log().sum()
    evidence = evidence - 0.5 * torch.logdet(Lam)
    torch.testing.assert_close(la.log_marginal_likelihood(), evidence, rtol=1e-10, atol=1e-10)
    M = curv.inv_sqrt_matvec(torch.eye(curv.n_params), *la.damping())
    torch.testing.assert_close(M @ M.T, Sig, rtol=1e-9, atol=1e-12)
    J = jacobian(la.model, x, la.param_names)
    ref = J @ Sig @ J.mT
    for kw in ({}, {"vectorize": False}, {"chunk_size": 40}):
        torch.testing.assert_close(lk.predictive.functional_covariance(la, x, **kw), ref)
    for method in ("glm_mc", "nn"):
        p = la.predict(x, method=method, n_samples=3, generator=torch.Generator().manual_seed(0))
        assert p.shape == (5, 3) and torch.allclose(p.sum(-1), torch.ones(5))
    # save / load roundtrip
    path = tmp_path / "la.pt"
    la.save(path)
    lb = lk.KronLaplace.load(path, la.model)
    torch.testing.assert_close(lb.posterior_precision.to_dense(), la.posterior_precision.to_dense())
    torch.testing.assert_close(lb.log_marginal_likelihood(), la.log_marginal_likelihood())


@pytest.mark.parametrize("name", ["conv3d", "convt2d", "convt1d"])
def test_ewc_diagonal_of_new_layers_is_exact(name):
    """The diagonal GGN (EWC) reads the same captured rows: equal to the exact diagonal."""
    model, shape = _model(name)
    x, y = make_data("regression", 3, 2 if name == "convt1d" else 3, shape)
    opts = lk.curvature.CurvatureOptions(fisher="exact")
    got, n = lk.curvature.fit_diagonal(model, [(x[:2], y[:2]), (x[2:], y[2:])], "regression", opts)
    assert n == 3
    H = exact_ggn(model, x, list(got), "regression").diagonal()
    torch.testing.assert_close(torch.cat([v.flatten() for v in got.values()]), H)


def test_optim_preconditioners_refuse_the_new_layers():
    model, _ = _model("conv3d")
    lk.optim.KFAC(model, eps=0.1).remove()  # default: the Conv3d layers keep plain gradients
    with pytest.raises(ValueError, match="nn.Conv1d and nn.Conv2d \\(groups=1\\) only"):
        lk.optim.KFAC(model, eps=0.1, modules=["0"])
