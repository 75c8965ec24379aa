"""Generate docs/api.md from the docstrings (offline; standard library + the package only).

Run: ``.venv/bin/python docs/gen_api.py`` (``make docs``). The test suite checks that the
committed docs/api.md is up to date.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from pathlib import Path

# The library's modules in layer order (lowest first), as tests/test_layering.py ranks them; the
# demo wing and the command line are left out (they are programs, not API).
LAYERS = [
    "laplace_kron",
    "laplace_kron.constants",
    "laplace_kron.io",
    "laplace_kron.validation",
    "laplace_kron.spectrum",
    "laplace_kron.links",
    "laplace_kron.metrics",
    "laplace_kron.distributed",
    "laplace_kron.diagblock",
    "laplace_kron.factors",
    "laplace_kron.kron",
    "laplace_kron.kron_groups",
    "laplace_kron.kron_sum",
    "laplace_kron.block_state",
    "laplace_kron.output_noise",
    "laplace_kron.diagprior",
    "laplace_kron.curvature",
    "laplace_kron.posterior",
    "laplace_kron.sampling",
    "laplace_kron.glm",
    "laplace_kron.predictive",
    "laplace_kron.marglik",
    "laplace_kron.laplace",
    "laplace_kron.online_precision",
    "laplace_kron.continual",
    "laplace_kron.optim",
    "laplace_kron.training",
    "laplace_kron.plots",
    "laplace_kron.datasets",
]


def _modules() -> list[str]:
    """:data:`LAYERS` with the curvature package expanded into its modules (those that exist)."""
    out = []
    for name in LAYERS:
        if importlib.util.find_spec(name) is None:
            continue
        out.append(name)
        if name == "laplace_kron.curvature":
            pkg = importlib.import_module(name)
            subs = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__))
            out += [f"{name}.{m}" for m in subs if not m.startswith("_")]
    return out


MODULES = _modules()


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "(no docstring)")


def _public_methods(cls) -> list[tuple[str, object]]:
    out = []
    for name, member in cls.__dict__.items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            out.append((name, member))
        elif inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)):
            out.append((name, getattr(cls, name)))
    return out


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `docs/gen_api.py`; do not edit by hand.",
        "",
    ]
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        lines += [f"## `{mod_name}`", "", _doc(mod).split("\n\n")[0], ""]
        if mod_name == "laplace_kron":
            lines += ["Exports: " + ", ".join(f"`{n}`" for n in mod.__all__), ""]
            continue
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isclass(obj):
                lines += [f"### class `{name}{_signature(obj)}`", "", _doc(obj), ""]
                for mname, member in _public_methods(obj):
                    if isinstance(member, property):
                        lines += [f"- **`{mname}`** (property): {_doc(member).splitlines()[0]}"]
                    else:
                        first = _doc(member).splitlines()[0]
                        lines += [f"- **`{mname}{_signature(member)}`**: {first}"]
                lines.append("")
            elif callable(obj):
                lines += [f"### `{name}{_signature(obj)}`", "", _doc(obj), ""]
            else:
                lines += [f"### `{name}` = `{obj!r}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(__file__).with_name("api.md")
    text = render()
    if "--check" in argv:
        if not path.exists() or path.read_text() != text:
            print("docs/api.md is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
