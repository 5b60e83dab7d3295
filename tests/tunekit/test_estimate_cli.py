"""``tunekit estimate``: every cookbook recipe offline, the flags, JSON, the plot, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _tiny import tiny_llama

from tunekit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "cookbook").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_cookbook_recipe_estimates_offline(recipe, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Hub ids resolve to the shipped snapshots
    monkeypatch.chdir(ROOT)
    assert main(["estimate", str(recipe.relative_to(ROOT))]) == 0
    out = capsys.readouterr().out
    assert ("recommended: " in out or "no fit: " in out) and "single GPU" in out


def test_quickstart_counts_equal_tunekits_own_training_log(capsys, monkeypatch):
    # README, quickstart: "trainable params: 75,268 || all params: 22,790,024" (4 topic labels).
    monkeypatch.chdir(ROOT)
    assert main(["estimate", "cookbook/quickstart.yaml", "--num-labels", "4", "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["trainable"], model["parameters"]) == (75_268, 22_790_024)


def test_json_rows_add_up_and_flags_override_the_yaml(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = ["estimate", "cookbook/llama3_lora.yaml", "--gpus", "2", "--gpu-memory", "24GB", "--seq-len", "256",
            "--batch", "1", "--no-grad-checkpointing", "--tp-size", "2", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["seq_len"] == 256 and plan["settings"]["grad_checkpointing"] is False
    assert plan["devices"]["count"] == 2 and plan["devices"]["memory"] == 24 * 2**30
    terms = ("frozen_weights", "trainable_weights", "gradients", "optimizer_states", "activations", "temporaries")
    for row in plan["rows"]:
        if row["supported"]:
            assert row["peak"] == sum(row[t] for t in terms)
    assert {row["layout"]["strategy"] for row in plan["rows"]} >= {"ddp", "fsdp", "deepspeed", "tp"}
    assert plan["recommended"] == {"strategy": "ddp"}


def test_a_model_folder_with_method_flags(tmp_path, capsys):
    tiny_llama(num_hidden_layers=3).config.save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--method", "qlora", "--rank", "4", "--target-modules", "all-linear",
                 "--seq-len", "64", "--gpu-memory", "1GiB", "--optimizer", "adamw_8bit", "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["method"] == "lora" and model["quantized"] == "nf4" and model["trainable"] > 0


def test_plot_writes_a_png(tmp_path, capsys):
    tiny_llama().config.save_pretrained(tmp_path)
    out = tmp_path / "plan.png"
    assert main(["estimate", str(tmp_path), "--seq-len", "32", "--gpus", "2", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot written to" in capsys.readouterr().out


def test_matplotlib_is_imported_only_for_a_plot():
    code = "import sys, tunekit.cli, tunekit.estimate.report; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize(("argv", "needle"), [
    (["{empty}"], "holds no config.json"),
    (["{unknown}"], "model_type 'no-such-arch' is not an architecture"),
    (["{tiny}", "--gpu-memory", "lots"], "--gpu-memory 'lots' is not a size"),
    (["{tiny}", "--gpus", "6", "--tp-size", "3"], "does not divide num_attention_heads=4"),
    (["{tiny}", "train.lr=1"], "apply to a finetune YAML only"),
    (["cookbook/quickstart.yaml", "train.nope=1"], "unknown key train.nope"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "empty").mkdir()
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}), encoding="utf-8")
    tiny_llama().config.save_pretrained(tmp_path / "tiny")
    argv = [a.format(empty=tmp_path / "empty", unknown=tmp_path / "unknown", tiny=tmp_path / "tiny") for a in argv]
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_help_explains_every_option(capsys):
    assert main(["estimate", "-h"]) == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices["estimate"]
    for action in sub._actions:
        assert action.help, action.dest
        assert (action.option_strings[0] if action.option_strings else action.metavar or action.dest) in text


def test_yaml_defaults_are_read_as_finetune_runs_them(tmp_path):
    # model.attn_implementation: auto and data.packing: null are the config's defaults; the fast path
    # (tunekit.models.fastpath) packs causal-LM rows unless the adapter is prefix / prompt tuning.
    from tunekit.config import load_config
    from tunekit.estimate import from_finetune_config

    tiny_llama().config.save_pretrained(tmp_path)
    base = {"model": {"name_or_path": str(tmp_path)}, "data": {"format": "text", "train_files": ["x.jsonl"]}}
    spec, settings, _ = from_finetune_config(load_config(base))
    assert spec.attn == "sdpa" and settings.shape.packed is True  # auto: varlen or the loaded SDPA
    prefix = {**base, "adapter": {"method": "prefix", "num_virtual_tokens": 4}}
    assert from_finetune_config(load_config(prefix))[1].shape.packed is False
    unpacked = {**base, "data": {**base["data"], "packing": False}}
    assert from_finetune_config(load_config(unpacked))[1].shape.packed is False
