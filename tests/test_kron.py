"""Kronecker algebra against dense linear algebra, under exact damping."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from laplace_kron.kron import KronBlock, KronCurvature, symeig

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py


def _psd(d: int, rank: int | None = None, gen=None) -> torch.Tensor:
    X = torch.randn(d, rank or d + 2, generator=gen)
    return X @ X.T


def _block(d_out=3, d_in=4, bias_joint=True, ekfac=False, seed=0) -> KronBlock:
    g = torch.Generator().manual_seed(seed)
    G, A = _psd(d_out, gen=g), _psd(d_in, gen=g)
    if bias_joint:
        names, shapes = ["w", "b"], [(d_out, d_in - 1), (d_out,)]
    else:
        names, shapes = ["w"], [(d_out, d_in)]
    blk = KronBlock(G, A, names, shapes, bias_joint)
    if ekfac:
        blk = blk.with_eigenvalues(torch.rand(d_out, d_in, generator=g) * 5)
    return blk


@pytest.mark.parametrize("ekfac", [False, True])
@pytest.mark.parametrize("bias_joint", [False, True])
def test_block_ops_match_dense(ekfac, bias_joint):
    blk = _block(bias_joint=bias_joint, ekfac=ekfac)
    scale, delta = 0.7, 0.3
    dense = blk.to_dense(scale, delta)
    P = blk.n_params
    v = torch.randn(5, P)
    mat = blk.vec_to_mat(v)
    # matvec, inverse, inverse square root in parameter order
    torch.testing.assert_close(blk.mat_to_vec(blk.matvec(mat, scale, delta)), v @ dense)
    inv = torch.linalg.inv(dense)
    torch.testing.assert_close(blk.mat_to_vec(blk.inv_matvec(mat, scale, delta)), v @ inv)
    S = blk.mat_to_vec(blk.inv_sqrt_matvec(blk.vec_to_mat(torch.eye(P)), scale, delta))
    torch.testing.assert_close(S @ S, inv)  # symmetric inverse square root
    torch.testing.assert_close(S, S.T)
    torch.testing.assert_close(blk.logdet(scale, delta), torch.linalg.slogdet(dense)[1])
    torch.testing.assert_close(blk.trace(scale, delta), dense.trace())
    torch.testing.assert_close(blk.trace_inv(scale, delta), inv.trace())
    torch.testing.assert_close(blk.quadratic(mat, scale, delta), ((v @ dense) * v).sum(-1))


def test_kfac_dense_is_kron_in_parameter_order():
    """Joint [W | b]: to_dense reorders the Kronecker layout into (W.flatten(), b)."""
    blk = _block(d_out=2, d_in=3, bias_joint=True)
    kron = torch.kron(blk.G, blk.A)
    W = torch.arange(4.0).reshape(2, 2)
    b = torch.tensor([10.0, 20.0])
    mat = blk.params_to_mat([W, b])
    assert mat.tolist() == [[0.0, 1.0, 10.0], [2.0, 3.0, 20.0]]
    vec_param = torch.cat([W.flatten(), b])
    torch.testing.assert_close(
        blk.to_dense() @ vec_param, blk.mat_to_vec((kron @ mat.flatten()).reshape(2, 3))
    )


def test_bias_only_block_has_one_factor():
    G = _psd(3)
    blk = KronBlock(G, None, ["b"], [(3,)])
    torch.testing.assert_close(blk.to_dense(2.0, 0.5), 2.0 * G + 0.5 * torch.eye(3))
    torch.testing.assert_close(blk.logdet(2.0, 0.5), torch.logdet(2.0 * G + 0.5 * torch.eye(3)))


def test_symeig_clamps_and_is_psd_for_singular_float32():
    X = torch.randn(50, 3, dtype=torch.float32)
    F = X @ X.T * 1e4  # rank 3, badly conditioned in float32
    eig = symeig(F)
    assert eig.values.dtype == torch.float32
    assert (eig.values >= 0).all()
    blk = KronBlock(F, None, ["b"], [(50,)])
    ld = blk.logdet(1.0, 1e-3)
    assert torch.isfinite(ld)


def test_symeig_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        symeig(torch.full((2, 2), float("nan")))


def test_collection_matches_block_diagonal_dense():
    b1 = _block(3, 4, True, seed=1)
    b2 = _block(2, 5, False, ekfac=True, seed=2)
    b2.param_names = ["v"]
    curv = KronCurvature([b1, b2], ["w", "b", "v"], num_data=10)
    delta = torch.tensor([0.5, 2.0])
    dense = curv.to_dense(1.3, delta)
    assert dense.shape == (22, 22)
    torch.testing.assert_close(dense[:12, 12:], torch.zeros(12, 10))
    v = torch.randn(4, 22)
    torch.testing.assert_close(curv.matvec(v, 1.3, delta), v @ dense)
    torch.testing.assert_close(curv.inv_matvec(v, 1.3, delta), v @ torch.linalg.inv(dense))
    torch.testing.assert_close(curv.logdet(1.3, delta), torch.linalg.slogdet(dense)[1])
    torch.testing.assert_close(curv.trace(1.3, delta), dense.trace())


def test_collection_param_order_differs_from_block_order():
    b1 = _block(3, 4, True, seed=1)  # covers w, b
    b2 = KronBlock(_psd(2), _psd(2), ["v"], [(2, 2)])
    curv = KronCurvature([b1, b2], ["v", "w", "b"], num_data=1)
    dense = curv.to_dense()
    torch.testing.assert_close(dense[:4, :4], b2.to_dense())
    torch.testing.assert_close(dense[4:, 4:], b1.to_dense())


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="do not match"):
        KronBlock(_psd(3), _psd(4), ["w"], [(3, 5)])
    with pytest.raises(ValueError, match="EKFAC eigenvalues"):
        KronBlock(_psd(3), _psd(4), ["w"], [(3, 4)], eigenvalues=torch.ones(4, 3))
    with pytest.raises(ValueError, match="per-block"):
        b = _block()
        KronCurvature([b], ["w", "b"], 1).logdet(1.0, torch.ones(3))


@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(1, 5),
    d_in=st.integers(1, 5),
    delta=st.floats(1e-3, 1e3),
    scale=st.floats(1e-3, 1e3),
    ekfac=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_inverse_and_logdet(d_out, d_in, delta, scale, ekfac, seed):
    g = torch.Generator().manual_seed(seed)
    G, A = _psd(d_out, rank=1, gen=g), _psd(d_in, gen=g)  # G singular: damping must handle it
    blk = KronBlock(G, A, ["w"], [(d_out, d_in)])
    if ekfac:
        blk = blk.with_eigenvalues(torch.rand(d_out, d_in, generator=g))
    dense = blk.to_dense(scale, delta)
    P = blk.n_params
    eye = blk.vec_to_mat(torch.eye(P))
    prod = blk.mat_to_vec(blk.inv_matvec(blk.matvec(eye, scale, delta), scale, delta))
    torch.testing.assert_close(prod, torch.eye(P), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        blk.logdet(scale, delta), torch.linalg.slogdet(dense)[1], atol=1e-8, rtol=1e-8
    )
    assert (torch.linalg.eigvalsh(dense) > 0).all()
