"""The install maps adapters/ and kernels/ under tunekit, and importing stays cheap."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_no_top_level_kernels_or_adapters_package(tmp_path):
    code = (
        "import importlib.util as u, tunekit.adapters, tunekit.kernels;"
        "print(u.find_spec('kernels'), u.find_spec('adapters'));"
        "import transformers; print('transformers ok')"
    )
    assert _run(code, tmp_path).splitlines() == ["None None", "transformers ok"]


def test_repository_root_is_not_on_sys_path():
    roots = {Path(p).resolve() for p in sys.path if p}
    assert REPO not in roots and (REPO / "tests") not in roots


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {"tunekit": "tunekit", "adapters": "tunekit.adapters", "kernels": "tunekit.kernels"}
    found = set()
    for folder, package in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((package, *rel)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"


def test_import_is_cheap_and_side_effect_free(tmp_path):
    code = (
        "import sys, tunekit, tunekit.kernels, tunekit.adapters;"
        "print(sorted(m for m in ('triton', 'datasets', 'accelerate', 'tunekit.train') if m in sys.modules))"
    )
    assert _run(code, tmp_path) == "[]"
