"""The quickstart recipe (`make run`) on real MiniLM weights, shortened: it learns, and its adapter predicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunekit.cli import main

REPO = Path(__file__).resolve().parents[2]
TOPICS = {"sports", "food", "technology", "weather"}


@pytest.mark.slow
def test_quickstart_fast_variant_learns_and_predicts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository root
    out = tmp_path / "quickstart"
    assert main(["finetune", "cookbook/quickstart.yaml", "train.max_steps=24", f"output.dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "eval before:" in printed and f"adapter saved to {out / 'adapter'}" in printed
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["before"]["accuracy"] < 0.5 < results["after"]["accuracy"]
    assert main(["generate", str(out / "adapter"), "--prompt", "Heavy snow and strong winds tonight.",
                 "--prompt", "The striker scored in the final minute."]) == 0
    labels = capsys.readouterr().out.split()
    assert labels == ["weather", "sports"]
