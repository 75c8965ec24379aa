"""Cross-check against laplace-torch 0.3 (test-only oracle; skipped when it is not installed)."""

import pytest
import torch
from _dense import MLP, make_data

import laplace_kron as lk

DEFAULT_DTYPE = torch.float64  # applied per test by conftest.py

try:  # test-only oracle; a broken torchvision next to it raises RuntimeError, not ImportError
    import laplace
    from laplace import curvature
except Exception as exc:  # noqa: BLE001
    pytest.skip(f"laplace-torch unavailable: {exc!r}", allow_module_level=True)


@pytest.mark.parametrize("backend", ["CurvlinopsGGN", "AsdlGGN"])
@pytest.mark.parametrize("likelihood,d_out", [("classification", 3), ("regression", 2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_evidence_matches_laplace_torch(backend, likelihood, d_out, temperature):
    model = MLP(d_out=d_out)
    x, y = make_data(likelihood, 32, d_out)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    sigma = 0.8 if likelihood == "regression" else 1.0
    ref = laplace.Laplace(
        model,
        likelihood,
        subset_of_weights="all",
        hessian_structure="kron",
        backend=getattr(curvature, backend),
        prior_precision=0.7,
        sigma_noise=sigma,
        temperature=temperature,
    )
    ref.fit(loader)
    # laplace-torch keeps weight and bias in separate Kronecker blocks
    la = lk.KronLaplace(
        model,
        likelihood,
        fisher="exact",
        separate_bias=True,
        prior_precision=0.7,
        sigma_noise=sigma,
        temperature=temperature,
    ).fit(loader)
    ev_ref = float(ref.log_marginal_likelihood())
    assert abs(float(la.log_marginal_likelihood()) - ev_ref) < 1e-10 * abs(ev_ref)
    delta = torch.tensor(2.5)
    ev_ref = float(ref.log_marginal_likelihood(prior_precision=delta))
    assert abs(float(la.log_marginal_likelihood(delta)) - ev_ref) < 1e-10 * abs(ev_ref)
