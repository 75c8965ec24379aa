"""KFAC / EKFAC against the exact GGN (torch.func), hand-built weight-sharing references and
curvlinops."""

import pytest
import torch
from _dense import CNN, MLP, WideCNN, block_mask, exact_ggn, make_data, rel_err
from torch import nn

import laplace_kron as lk
from laplace_kron.curvature import capture, output_gradient_vectors
from laplace_kron.curvature.accumulate import FactorAccumulator

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py

LIKS = [("classification", 3), ("regression", 2), ("binary", 1)]
MODELS = [(MLP, (4,)), (CNN, (2, 6, 6))]


def _single_position_blocks(model, curv):
    """Blocks of layers that see one position per datum (exact for a single datum)."""
    shared = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    shared = {n for n in shared if n == "0"}  # CNN: only the first conv has 9 positions
    return [b for b in curv.blocks if b.param_names[0].split(".")[0] not in shared]


@pytest.mark.parametrize("likelihood,d_out", LIKS)
@pytest.mark.parametrize("Model,x_shape", MODELS)
@pytest.mark.parametrize("separate_bias", [False, True])
def test_kfac_exact_fisher_single_datum_equals_ggn(
    likelihood, d_out, Model, x_shape, separate_bias
):
    model = Model(d_out=d_out)
    x, y = make_data(likelihood, 1, d_out, x_shape)
    curv = lk.kfac(model, [(x, y)], likelihood, fisher="exact", separate_bias=separate_bias)
    ggn = exact_ggn(model, x, curv.param_names, likelihood)
    dense = curv.to_dense()
    blocks = _single_position_blocks(model, curv)
    assert len(blocks) >= 2
    for b in blocks:
        idx = curv.block_index(b)
        assert rel_err(dense[idx][:, idx], ggn[idx][:, idx]) < 1e-12, b.param_names


@pytest.mark.parametrize("likelihood,d_out", LIKS)
@pytest.mark.parametrize("Model,x_shape", MODELS)
def test_ekfac_never_further_from_ggn_than_kfac(likelihood, d_out, Model, x_shape):
    for seed in range(3):
        torch.manual_seed(seed)
        model = Model(d_out=d_out)
        x, y = make_data(likelihood, 16, d_out, x_shape, seed=seed)
        data = [(x[:8], y[:8]), (x[8:], y[8:])]
        k = lk.kfac(model, data, likelihood, fisher="exact")
        e = lk.ekfac(model, data, likelihood, fisher="exact")
        ggn = exact_ggn(model, x, k.param_names, likelihood)
        dk, de = k.to_dense(), e.to_dense()
        for bk in k.blocks:
            idx = k.block_index(bk)
            ref = ggn[idx][:, idx]
            err_k = (dk[idx][:, idx] - ref).norm()
            err_e = (de[idx][:, idx] - ref).norm()
            assert err_e <= err_k * (1 + 1e-10) + 1e-12, (bk.param_names, err_e, err_k)


def test_ekfac_single_position_single_datum_is_exact():
    model = MLP(d_out=3)
    x, y = make_data("classification", 1, 3)
    e = lk.ekfac(model, [(x, y)], "classification", fisher="exact")
    ggn = exact_ggn(model, x, e.param_names, "classification")
    mask = block_mask(e)
    assert rel_err(e.to_dense(), ggn * mask) < 1e-10


@pytest.mark.parametrize(
    "likelihood,d_out", [("classification", 4), ("regression", 2), ("binary", 1)]
)
def test_mc_fisher_converges_to_exact(likelihood, d_out):
    model = MLP(d_out=d_out)
    x, y = make_data(likelihood, 20, d_out)
    exact = lk.kfac(model, [(x, y)], likelihood, fisher="exact").to_dense()
    errs = []
    for m in (1, 16, 256):
        gen = torch.Generator().manual_seed(123)
        mc = lk.kfac(model, [(x, y)], likelihood, fisher="mc", mc_samples=m, generator=gen)
        errs.append(rel_err(mc.to_dense(), exact))
    # Monte-Carlo error decays like 1/sqrt(m): a 256x increase should cut it by ~16x.
    assert errs[2] < errs[0] / 5, errs
    assert errs[2] < 0.08, errs


def test_mc_output_vectors_are_unbiased_and_seeded():
    f = torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    gen = torch.Generator().manual_seed(0)
    v = output_gradient_vectors(f, y, "classification", "mc", 20000, gen)
    H = torch.einsum("kbc,kbd->bcd", v, v)
    p = torch.softmax(f, -1)
    ref = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    assert (H - ref).abs().max() < 0.02
    v2 = output_gradient_vectors(
        f, y, "classification", "mc", 20000, torch.Generator().manual_seed(0)
    )
    assert torch.equal(v, v2)


def test_exact_vectors_square_to_hessian():
    f = torch.randn(5, 4)
    y = torch.zeros(5, dtype=torch.long)
    v = output_gradient_vectors(f, y, "classification", "exact")
    p = torch.softmax(f, -1)
    ref = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    torch.testing.assert_close(torch.einsum("kbc,kbd->bcd", v, v), ref)


def test_empirical_fisher_is_sum_of_gradient_outer_products():
    model = MLP(d_out=3)
    x, y = make_data("classification", 1, 3)
    curv = lk.kfac(model, [(x, y)], "classification", fisher="empirical")
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    gvec = torch.cat([g.flatten() for g in grads])
    ref = torch.outer(gvec, gvec) * block_mask(curv)
    assert rel_err(curv.to_dense(), ref) < 1e-12


# ------------------------------------------------------------------ weight sharing [B, T, D]
class SeqNet(nn.Module):
    def __init__(self, d=3, h=4, c=2):
        super().__init__()
        self.lin = nn.Linear(d, h)
        self.head = nn.Linear(h, c)

    def rest(self, z):  # everything after self.lin, as a function of its output z [B, T, h]
        return self.head(torch.tanh(z).mean(dim=1))

    def forward(self, x):
        return self.rest(self.lin(x))


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_weight_sharing_matches_hand_built_reference(weight_sharing):
    model = SeqNet()
    B, T = 5, 7
    x = torch.randn(B, T, 3)
    y = torch.randint(0, 2, (B,))
    curv = lk.kfac(
        model,
        [(x, y)],
        "classification",
        fisher="exact",
        weight_sharing=weight_sharing,
        modules=["lin"],
    )
    # Reference: output-gradients of the shared layer from torch.func, per datum and column.
    z = model.lin(x).detach()
    f = model.rest(z).detach()
    p = torch.softmax(f, -1)
    S = torch.diag_embed(p.sqrt()) - p.unsqueeze(2) * p.sqrt().unsqueeze(1)  # [B, C, K]
    J = torch.func.vmap(torch.func.jacrev(lambda zz: model.rest(zz[None])[0]))(z)  # [B, C, T, h]
    g = torch.einsum("bck,bcth->kbth", S, J)
    a = torch.cat([x, torch.ones(B, T, 1)], dim=-1)
    if weight_sharing == "expand":
        A = torch.einsum("bti,btj->ij", a, a) / (B * T)
        G = torch.einsum("kbti,kbtj->ij", g, g)
    else:
        am, gs = a.mean(1), g.sum(2)
        A = torch.einsum("bi,bj->ij", am, am) / B
        G = torch.einsum("kbi,kbj->ij", gs, gs)
    (blk,) = curv.blocks
    torch.testing.assert_close(blk.A, A)
    torch.testing.assert_close(blk.G, G)


def test_weight_tying_counts_every_call_as_positions():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    model = Tied()
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    curv = lk.kfac(model, [(x, y)], "regression", fisher="exact")
    # per-example gradient of a tied layer sums both calls: EKFAC on one datum must stay PSD and
    # its trace equals the exact GGN's trace (the correction is exact on the diagonal in its basis).
    e = lk.ekfac(model, [(x[:1], y[:1])], "regression", fisher="exact")
    ggn = exact_ggn(model, x[:1], e.param_names, "regression")
    torch.testing.assert_close(e.to_dense().trace(), ggn.trace())
    assert curv.blocks[0].A.shape == (4, 4)


# ------------------------------------------------------------------ curvlinops cross-check
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("likelihood,d_out", LIKS)
@pytest.mark.parametrize("Model,x_shape", MODELS)
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("layout", ["default", "channels_last"])
def test_matches_curvlinops(
    kind, likelihood, d_out, Model, x_shape, weight_sharing, layout, monkeypatch
):
    curvlinops = pytest.importorskip("curvlinops")
    if layout == "channels_last":
        if Model is not CNN:
            pytest.skip("no convolution")
        # Force the channels-last patches (and the permuted Gram) for every convolution.
        monkeypatch.setattr(capture, "_CHANNEL_FIRST_MAX_COLUMNS", 0)
    if kind == "ekfac" and weight_sharing == "reduce" and Model is CNN:
        # reduce-A of the first conv is rank-deficient with few data: the EKFAC eigenbasis is not
        # unique there, so compare on enough data for a unique basis.
        n = 40
    else:
        n = 12
    model = Model(d_out=d_out)
    x, y = make_data(likelihood, n, d_out, x_shape)
    data = [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]
    loss = {
        "classification": nn.CrossEntropyLoss(reduction="sum"),
        "regression": nn.MSELoss(reduction="sum"),
        "binary": nn.BCEWithLogitsLoss(reduction="sum"),
    }[likelihood]
    cl_data = [(xx, yy.reshape(-1, 1) if likelihood == "binary" else yy) for xx, yy in data]
    Op = curvlinops.KFACLinearOperator if kind == "kfac" else curvlinops.EKFACLinearOperator
    params = list(model.parameters())
    op = Op(
        model,
        loss,
        params,
        cl_data,
        fisher_type="type-2",
        kfac_approx=weight_sharing,
        separate_weight_and_bias=True,
        check_deterministic=False,
    )
    ref = op @ torch.eye(sum(p.numel() for p in params))
    if likelihood == "regression":
        ref = ref / 2  # MSELoss(sum) is twice the Gaussian NLL with sigma = 1
    fn = lk.kfac if kind == "kfac" else lk.ekfac
    ours = fn(
        model, data, likelihood, fisher="exact", separate_bias=True, weight_sharing=weight_sharing
    )
    assert rel_err(ours.to_dense(), ref) < 1e-6


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
@pytest.mark.parametrize("separate_bias", [False, True])
def test_patch_layouts_give_the_same_curvature(kind, weight_sharing, separate_bias, monkeypatch):
    """Channels-last patches with a permuted Gram == channel-first patches in weight order."""
    model = WideCNN()
    # Enough data for full-rank factors: EKFAC's eigenbasis is unique only then (see above).
    n = 80 if kind == "ekfac" and weight_sharing == "reduce" else 12
    x, y = make_data("classification", n, 3, (4, 7, 7))
    data = [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]
    fn = lk.kfac if kind == "kfac" else lk.ekfac
    kw = dict(fisher="exact", separate_bias=separate_bias, weight_sharing=weight_sharing)
    results = []
    for limit in (0, 10**6):
        monkeypatch.setattr(capture, "_CHANNEL_FIRST_MAX_COLUMNS", limit)
        results.append(fn(model, data, "classification", **kw).to_dense())
    assert rel_err(results[0], results[1]) < (1e-10 if kind == "ekfac" else 1e-12)


@pytest.mark.parametrize("likelihood,d_out", [("classification", 5), ("regression", 3)])
def test_closed_form_output_layer_G_equals_the_vector_sum(likelihood, d_out, monkeypatch):
    """Exact Fisher: the output layer's G (and EKFAC eigenvalues) in closed form == the sums over
    C backpropagated vectors."""
    model = MLP(d_out=d_out)
    x, y = make_data(likelihood, 30, d_out)
    data = [(x[:15], y[:15]), (x[15:], y[15:])]
    handled = []
    closed_form = FactorAccumulator._closed_form_G

    def spy(self, f):
        done = closed_form(self, f)
        handled.append(done)
        return done

    monkeypatch.setattr(FactorAccumulator, "_closed_form_G", spy)
    fast = lk.kfac(model, data, likelihood, fisher="exact")
    assert handled == [{len(fast.blocks) - 1}] * 2  # the output layer, in both batches
    fast_e = lk.ekfac(model, data, likelihood, fisher="exact", separate_bias=True)
    monkeypatch.setattr(FactorAccumulator, "_closed_form_G", lambda self, f: set())
    monkeypatch.setattr(FactorAccumulator, "_output_layers", lambda self, f: set())
    slow = lk.kfac(model, data, likelihood, fisher="exact")
    for bf, bs in zip(fast.blocks, slow.blocks, strict=True):
        torch.testing.assert_close(bf.G, bs.G, rtol=1e-12, atol=1e-14)
    slow_e = lk.ekfac(model, data, likelihood, fisher="exact", separate_bias=True)
    for bf, bs in zip(fast_e.blocks, slow_e.blocks, strict=True):
        torch.testing.assert_close(bf.eigenvalues, bs.eigenvalues, rtol=1e-10, atol=1e-13)


def test_exact_vectors_in_chunks(monkeypatch):
    """Chunked exact-Fisher vectors are the full set, and a fit over many chunks (the graph kept
    between them) equals the one-chunk fit."""
    from laplace_kron.curvature import likelihoods

    f = torch.randn(6, 7)
    y = torch.randint(0, 7, (6,))
    full = likelihoods.output_gradient_vectors(f, y, "classification", "exact")
    parts = list(
        likelihoods.iter_output_gradient_vectors(f, y, "classification", "exact", max_elements=90)
    )
    assert len(parts) == 4  # 2 vectors of 6 x 7 per chunk
    torch.testing.assert_close(torch.cat(parts), full)
    S = full.permute(1, 2, 0)  # [B, C, K]
    H = torch.diag_embed(torch.softmax(f, -1)) - torch.einsum(
        "bi,bj->bij", torch.softmax(f, -1), torch.softmax(f, -1)
    )
    torch.testing.assert_close(S @ S.transpose(1, 2), H)

    model = CNN(d_out=5)
    x, y = make_data("classification", 8, 5, (2, 6, 6))
    one = lk.ekfac(model, [(x, y)], "classification", fisher="exact").to_dense()
    monkeypatch.setattr(likelihoods, "VECTOR_CHUNK_ELEMENTS", 8 * 5)  # one vector per chunk
    many = lk.ekfac(model, [(x, y)], "classification", fisher="exact").to_dense()
    assert rel_err(many, one) < 1e-12
