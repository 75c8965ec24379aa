import pytest
import torch

# Tests use small tensors: one thread avoids OpenMP oversubscription on small shared CPUs
# (measured 100x slowdowns of small ops with 2 threads on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_dtype(request):
    """Seed every test and set the default dtype it asks for (module-level ``DEFAULT_DTYPE``,
    float32 otherwise), restoring it afterwards so no module leaks its dtype into another."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(request.module, "DEFAULT_DTYPE", torch.float32))
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
