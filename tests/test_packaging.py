"""The wheel ships every package: each directory of fastllm/ with an __init__.py is listed in pyproject.toml
(the list is explicit because kernels/ is mapped into fastllm.kernels)."""
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"fastllm." + ".".join(p.parent.relative_to(ROOT / "fastllm").parts)
             for p in (ROOT / "fastllm").rglob("__init__.py") if p.parent != ROOT / "fastllm"}
    found |= {"fastllm", "fastllm.kernels"}
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"
