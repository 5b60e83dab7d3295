"""`tunekit finetune` and its run folder: a failed command changes nothing there, a resumed
model.from_config run keeps its saved base, and a run without eval data says what its metrics are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from _tiny_runs import eval_reloaded, run_config
from _tolerances import FP32_EXACT
from _trainer_runs import snapshot

import tunekit
from tunekit.cli import main


def from_config_run(tmp: Path, steps: int = 2) -> tuple[dict, Path, Path]:
    """(config, its YAML file, run folder) of a tiny random-weight Llama run that checkpoints at its end."""
    cfg = run_config(tmp, "causal_lm", "lora", steps=steps)
    cfg["model"] = {"from_config": True, "model_type": "llama", "tokenizer": cfg["model"]["name_or_path"],
                    "config_overrides": {"vocab_size": 96, "hidden_size": 16, "intermediate_size": 32,
                                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}}
    cfg["train"]["save_every"] = steps
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return cfg, path, Path(cfg["output"]["dir"])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cfg, path, out = from_config_run(tmp_path_factory.mktemp("finished"))
    assert main(["finetune", str(path)]) == 0
    return path, out


# (overrides, damage the checkpoint first, what the one-line error names)
FAILURES = [
    (["data.train_files=[/no/such/train.jsonl]"], False, "/no/such/train.jsonl"),
    (["adapter.target_modules=[no_such_proj]"], False, "no_such_proj"),
    (["model.tokenizer=/no/such/tokenizer"], False, "model.tokenizer"),
    (["train.lr=0.5"], False, "train.lr: 0.01 -> 0.5"),
    (["train.resume=never"], False, "train.overwrite_checkpoints=true"),
    ([], True, "is damaged (state/__0_0.distcp"),
]


@pytest.mark.parametrize(("overrides", "damage", "needle"), FAILURES, ids=[f[2] for f in FAILURES])
def test_a_failed_finetune_leaves_the_run_folder_as_it_was(finished, capsys, overrides, damage, needle):
    path, out = finished
    weights = out / "checkpoints" / "step-2" / "state" / "__0_0.distcp"
    intact = weights.read_bytes()
    if damage:
        weights.write_bytes(intact[: len(intact) // 2])
    before = snapshot(out)
    capsys.readouterr()
    try:
        assert main(["finetune", str(path), *overrides]) == 1
    finally:
        weights.write_bytes(intact)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the load bars
    assert len(errors) == 1 and needle in errors[0], errors
    after = snapshot(out)
    if damage:
        after["checkpoints/step-2/state/__0_0.distcp"] = intact[: len(intact) // 2]
    assert after == before


def test_a_resumed_from_config_run_reloads_its_saved_base(tmp_path, capsys):
    cfg, path, out = from_config_run(tmp_path)
    assert main(["finetune", str(path)]) == 0
    base = snapshot(out / "base")
    capsys.readouterr()
    # The seed also orders the data: a changed seed is refused unless asked for...
    assert main(["finetune", str(path), "train.seed=1", "train.max_steps=4"]) == 1
    assert "train.seed: 0 -> 1" in capsys.readouterr().err
    # ...and then applied to the rest of the run, on the base the checkpoints were trained on.
    result = tunekit.finetune(str(path), ["train.seed=1", "train.max_steps=4", "train.resume_with_changes=true"])
    assert result.train.global_step == 4
    assert snapshot(out / "base") == base
    reloaded = eval_reloaded({**cfg, "train": {**cfg["train"], "seed": 1}}, result.adapter_dir)
    assert abs(reloaded["loss"] - result.metrics["loss"]) <= FP32_EXACT
    # A changed architecture cannot be applied to a saved base: refused even when changes are allowed.
    with pytest.raises(ValueError, match=r"model.config_overrides changed.*keeps the base"):
        tunekit.finetune(str(path), ["model.config_overrides.hidden_size=32", "train.resume_with_changes=true"])


def test_without_eval_data_the_metrics_are_called_the_last_training_step(tmp_path, capsys):
    cfg = run_config(tmp_path, "causal_lm", "lora", steps=3)
    del cfg["data"]["eval_files"]
    result = tunekit.finetune(cfg)
    out = Path(cfg["output"]["dir"])
    last = [r for r in map(json.loads, (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
            if r["split"] == "train"][-1]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["before"] is None and results["after"] is None
    timing = ("split", "elapsed_s", "wall_time")  # when the line was logged, not a metric of the step
    assert results["last_train_step"] == {k: v for k, v in last.items() if k not in timing}
    assert result.metrics_split == "train" and result.metrics["loss"] == last["loss"]
    printed = capsys.readouterr().out
    assert f"last training step (no eval data): loss {last['loss']:.4f}" in printed and "eval after" not in printed
