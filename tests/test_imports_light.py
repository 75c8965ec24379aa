"""``import laplace_kron`` loads the library only: no demo wing, no plotting, no SciPy.

Checked in a fresh interpreter, since this test session has long imported all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Modules (and their submodules) that `import laplace_kron` must not load: the demo wing is the
# top layer (it imports the library, never the reverse) and its plotting and data dependencies are
# not needed to fit or predict.
HEAVY = [
    "matplotlib",
    "laplace_kron.plots",
    "laplace_kron.demo",
    "laplace_kron.datasets",
    "laplace_kron.cli",
    "sklearn",
    "scipy",
]


def _loaded_after(statement: str) -> list[str]:
    """Names in ``sys.modules`` (of ``HEAVY`` or below them) after ``statement`` in a new
    interpreter that imports the package from this checkout."""
    code = (
        "import json, sys\n"
        f"{statement}\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if any(m == h or m.startswith(h + '.') for h in heavy))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_laplace_kron_is_light():
    assert _loaded_after("import laplace_kron") == []


def test_the_check_sees_the_demo_wing():
    # the same check does see the heavy modules once the demo is imported
    loaded = _loaded_after("import laplace_kron.demo")
    assert {"laplace_kron.demo", "laplace_kron.plots", "matplotlib"} <= set(loaded)
