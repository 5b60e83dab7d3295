"""End to end, in-process: `tunekit finetune` on tiny saved models for every task x adapter method,
then the saved adapter reloaded, merged (`tunekit merge`) and used (`tunekit generate`)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from _tiny_runs import ADAPTERS, eval_reloaded, run_config
from _tolerances import FP32_EXACT, max_abs_diff

from tunekit.cli import main
from tunekit.config import load_config
from tunekit.inference import load_adapted

TASKS = ["causal_lm", "seq_cls", "seq2seq"]
# T5 runs take over 2 s of CPU each (measured): slow, still in `make test`.
RUNS = [pytest.param(task, method, id=f"{task}-{method}", marks=[pytest.mark.slow] if task == "seq2seq" else [])
        for task in TASKS for method in ADAPTERS]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(task, method)`` -> (config dict, output dir), each finetuned once per module."""
    root, done = tmp_path_factory.mktemp("e2e"), {}

    def get(task: str, method: str):
        if (task, method) not in done:
            cfg = run_config(root, task, method)
            path = root / f"{task}-{method}.yaml"
            path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
            assert main(["finetune", str(path)]) == 0
            done[task, method] = cfg, root / f"run-{task}-{method}"
        return done[task, method]

    return get


@pytest.mark.parametrize(("task", "method"), RUNS)
def test_finetune_learns_saves_and_reloads(run, task, method):
    cfg, out = run(task, method)
    for name in ("resolved_config.yaml", "metrics.jsonl", "results.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tunekit_base.json"):
        assert (out / name).is_file(), name
    # the config as run: the one given, with data.packing's default resolved (packing where exact)
    packs = task == "causal_lm" and method not in ("prefix", "prompt")
    assert load_config(out / "resolved_config.yaml") == load_config(cfg, [f"data.packing={str(packs).lower()}"])
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert torch.isfinite(torch.tensor(results["after"]["loss"]))
    assert results["after"]["loss"] < results["before"]["loss"]
    train_losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines())
                    if r.get("split") == "train"]
    assert len(train_losses) == cfg["train"]["max_steps"] and train_losses[-1] < train_losses[0]
    reloaded = eval_reloaded(cfg, out / "adapter")
    assert abs(reloaded["loss"] - results["after"]["loss"]) <= FP32_EXACT


@pytest.mark.parametrize("task", ["causal_lm", "seq_cls"])
def test_merge_output_loads_with_plain_transformers(run, tmp_path, task, capsys):
    import transformers

    cfg, out = run(task, "lora")
    base = ["--base", cfg["model"]["name_or_path"]] if task == "causal_lm" else []  # explicit or recorded
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged"), *base]) == 0
    assert "merged model written to" in capsys.readouterr().out
    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "seq_cls": transformers.AutoModelForSequenceClassification}[task]
    plain = auto.from_pretrained(tmp_path / "merged").eval()
    adapted = load_adapted(out / "adapter").model
    assert not any("tunekit" in type(m).__module__ for m in plain.modules())
    ids = torch.tensor([[1, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        assert max_abs_diff(plain(input_ids=ids).logits, adapted(input_ids=ids).logits) <= FP32_EXACT


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_generate_prints_text_for_lm_adapters(run, capsys, method):
    _, out = run("causal_lm", method)
    capsys.readouterr()  # the fixture's training run, if it ran now
    loaded = load_adapted(out / "adapter")
    assert main(["generate", str(out / "adapter"), "--prompt", "repeat cat", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    # the instruction template of the run ("{prompt}: ") is applied, then greedy decoding
    inputs = loaded.tokenizer("repeat cat: ", return_tensors="pt")
    expected = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert printed == loaded.tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"


def test_generate_prints_labels_for_classifiers(run, capsys):
    _, out = run("seq_cls", "lora")
    assert main(["generate", str(out / "adapter"), "--prompt", "cat dog red", "--prompt", "sun rain big"]) == 0
    assert set(capsys.readouterr().out.split()) <= {"animal", "other"}


def test_generate_on_a_plain_seq2seq_folder(run, tmp_path, capsys):
    _, out = run("seq2seq", "lora")
    assert main(["merge", str(out / "adapter"), "--out", str(tmp_path / "t5")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "t5"), "--prompt", "red cat sun", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
