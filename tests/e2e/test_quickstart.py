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


@pytest.mark.slow
def test_tiny_llama_recipe_learns_its_tasks_and_answers_them(tmp_path, monkeypatch, capsys):
    """The offline causal-LM recipe as shipped: its eval loss falls below what answering each question type
    with its most frequent answer gives (~1.37 per loss token), and greedy replies match the data file's own
    answers for most of its rows."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "tiny"
    assert main(["finetune", "cookbook/tiny_llama_instruct.yaml", f"output.dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["after"]["loss"] < 0.5 < results["before"]["loss"]
    rows = [json.loads(line) for line in (REPO / "cookbook/data/word_tasks.jsonl").read_text(encoding="utf-8")
            .splitlines()[:40]]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input") if k in r}) + "\n"
                               for r in rows), encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", str(out / "adapter"), "--file", str(prompts)]) == 0
    replies = [json.loads(line)["output"].strip() for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    assert len(replies) == len(rows)
    right = sum(reply.lower() == row["output"].lower() for reply, row in zip(replies, rows))
    assert right >= 0.8 * len(rows), list(zip(replies, [r["output"] for r in rows]))
