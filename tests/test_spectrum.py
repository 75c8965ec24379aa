"""The fast paths against dense ground truth: eigh without zero rows, the compressed spectrum and
its one-pass evidence gradient, channels-last patches with reused buffers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import laplace_kron.spectrum as spectrum_mod
from laplace_kron.curvature.capture import (
    Workspace,
    native_patches,
    native_to_weight_order,
    unfold_input,
)
from laplace_kron.kron import symeig
from laplace_kron.spectrum import Spectrum

DEFAULT_DTYPE = torch.float64


def _psd_with_dead_rows(n: int, rank: int, dead: list[int]) -> torch.Tensor:
    x = torch.randn(rank, n)
    x[:, dead] = 0.0
    return x.T @ x


@pytest.mark.parametrize("dead", [[], [0], [1, 4, 5], list(range(0, 12, 2))])
def test_symeig_skips_zero_rows_exactly(dead):
    M = _psd_with_dead_rows(12, 20, dead)
    eig = symeig(M)
    V, lam = eig.vectors, eig.values
    assert torch.allclose(V.T @ V, torch.eye(12), atol=1e-12)
    assert torch.allclose((V * lam) @ V.T, M, atol=1e-10)
    ref = torch.linalg.eigvalsh(M).clamp_min(0)
    assert torch.allclose(lam.sort().values, ref.sort().values, atol=1e-10)
    assert int((lam == 0).sum()) >= len(dead)
    # The zero rows get unit eigenvectors: no mixing of dead and live coordinates.
    for i in dead:
        col = V[i].abs().argmax()
        assert V[i, col] == 1.0 and lam[col] == 0.0


def _dense_sums(eigs, sizes, c, deltas):
    out = {"log": [], "r": [], "r2": [], "lr": []}
    start = 0
    for size, d in zip(sizes, deltas.tolist()):
        lam = eigs[start : start + size]
        start += size
        t = c * lam + d
        out["log"].append(torch.log(t).sum())
        out["r"].append((1 / t).sum())
        out["r2"].append((1 / t**2).sum())
        out["lr"].append((lam / t).sum())
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("chunk", [3, 1 << 17])
def test_spectrum_sums_match_dense(monkeypatch, chunk):
    monkeypatch.setattr(spectrum_mod, "_CHUNK", chunk)
    blocks = [torch.rand(3, 4), torch.rand(7), torch.rand(2, 5)]
    blocks[0][1] = 0.0  # a zero row of G: a whole row of zero Kronecker eigenvalues
    blocks[2][:, 0] = 0.0
    blocks[1][:] = 0.0  # a block with only zero eigenvalues
    sq = torch.rand(3)
    spec = Spectrum.from_blocks(blocks, sq)
    dense = torch.cat([b.flatten() for b in blocks])
    assert spec.n_params == dense.numel() and spec.eigs.numel() == int((dense > 0).sum())
    assert torch.equal(spec.eigs.sort().values, dense[dense > 0].sort().values)
    assert spec.n_zero.tolist() == [4.0, 7.0, 2.0]  # a zero row of 4, a zero block, a column of 2
    deltas = torch.tensor([0.3, 2.0, 1e-3])
    got = spec.sums(1.7, deltas, ("log", "r", "r2", "lr"))
    ref = _dense_sums(dense, [b.numel() for b in blocks], 1.7, deltas)
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-13), k


def test_spectrum_logdet_gradient_is_exact():
    blocks = [torch.rand(4, 3), torch.rand(6)]
    blocks[0][0] = 0.0
    spec = Spectrum.from_blocks(blocks, torch.ones(2))
    c = torch.tensor(0.7, requires_grad=True)
    d = torch.tensor([0.5, 1.5], requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, d: spec.logdet(c, d), (c, d))
    dense = torch.cat([b.flatten() for b in blocks])
    ids = torch.tensor([0] * 12 + [1] * 6)
    assert torch.allclose(spec.logdet(c, d), torch.log(c * dense + d[ids]).sum(), rtol=1e-14)


CONVS = {
    "conv": lambda: nn.Conv2d(3, 4, 3),
    "conv-1ch-strided-dilated-padded": lambda: nn.Conv2d(
        1, 2, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)
    ),
    "conv-16ch-stride2": lambda: nn.Conv2d(16, 8, 3, padding=1, stride=2),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2),
    "linear": lambda: nn.Linear(5, 3),
}


@pytest.mark.parametrize("name", list(CONVS))
def test_native_patches_match_unfold_and_reuse_buffers(name):
    module = CONVS[name]()
    shape = {nn.Conv2d: (2, module.weight.shape[1], 9, 8), nn.Conv1d: (2, 4, 11)}
    shape = shape.get(type(module), (2, 7, 5))
    ws = Workspace()
    for _ in range(2):  # the second call reuses (and must fully overwrite) the buffers
        x = torch.randn(*shape)
        native = native_patches(module, x, ws, "k")
        idx = native_to_weight_order(module)
        a = native if idx is None else native[..., idx]
        assert torch.equal(a, unfold_input(module, x))
        W = module.weight.reshape(module.weight.shape[0], -1)
        y = module(x)
        ref = y if isinstance(module, nn.Linear) else y.flatten(2).transpose(1, 2)
        assert torch.allclose(a @ W.T + module.bias, ref, atol=1e-12)
    if isinstance(module, nn.Conv2d):
        unfolded = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        assert torch.equal(unfold_input(module, x), unfolded.transpose(1, 2))


def test_symeig_zero_diagonal_of_a_non_psd_matrix_uses_the_full_matrix():
    M = torch.tensor([[0.0, 1.0], [1.0, 2.0]])  # indefinite: no row may be dropped
    eig = symeig(M)
    ref = torch.linalg.eigvalsh(M).clamp_min(0)
    assert torch.allclose(eig.values.sort().values, ref.sort().values)
