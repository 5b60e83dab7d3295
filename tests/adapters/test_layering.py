"""The import-linter contract "only adapters.hf knows transformers" covers every other adapters module."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tunekit.adapters

ROOT = Path(__file__).resolve().parents[2]


def test_every_adapters_module_outside_hf_is_kept_away_from_transformers():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contract = next(c for c in config["tool"]["importlinter"]["contracts"]
                    if c["name"] == "only adapters.hf knows transformers")
    assert {"transformers", "peft"} <= set(contract["forbidden_modules"])
    package = Path(tunekit.adapters.__file__).parent
    top = {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert {f"tunekit.adapters.{name}" for name in top - {"hf"}} == set(contract["source_modules"])
