"""A pushed repo loads from its Hub id, through the snippets of its own model card, with the same weights.

The loading runs in a child process whose huggingface_hub is imported with
HF_ENDPOINT pointing at the stand-in (it reads the variable only at import);
the references are computed here from the local run folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _hub_runs import SENTINEL, base_dir, finished_run, shared_runs
from _tolerances import FP32_EXACT, max_abs_diff
from hub_server import HubServer, child_env, use_in_process
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
INPUT_IDS = [[5, 17, 33, 60, 41, 8], [9, 12, 70, 3, 44, 21]]
CHECKER = Path(__file__).parents[1] / "support" / "hub_load_check.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = shared_runs(tmp_path_factory)
    return {"llama": finished_run(root, "causal_lm", save_merged=True), "bert": finished_run(root, "seq_cls"),
            "bottleneck": finished_run(root, "causal_lm", "bottleneck")}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(INPUT_IDS)).logits


def _tunekit_reference(run: Path) -> tuple[torch.Tensor, dict]:
    from tunekit.adapters import adapter_state_dict
    from tunekit.inference import load_adapted

    loaded = load_adapted(run / "adapter")
    return _logits(loaded.model), adapter_state_dict(loaded.model)


def _peft_reference(run: Path, auto: str, labels: int | None = None) -> torch.Tensor:
    import transformers
    from peft import PeftModel

    kwargs = {"num_labels": labels, "ignore_mismatched_sizes": True} if labels else {}
    base = getattr(transformers, auto).from_pretrained(base_dir(run), **kwargs)
    return _logits(PeftModel.from_pretrained(base, run / "adapter"))


def test_pushed_repos_load_with_tunekit_peft_and_transformers(runs, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    with HubServer(token=SENTINEL) as hub:
        use_in_process(monkeypatch, hub)
        from tunekit.hub import push_to_hub

        hub.seed("tiny/llama", base_dir(runs["llama"]))
        hub.seed("tiny/bert", base_dir(runs["bert"]))
        push_to_hub(runs["llama"], "alice/llama-lora", base_model="tiny/llama")
        push_to_hub(runs["llama"], "alice/llama-merged", merged=True, base_model="tiny/llama")
        push_to_hub(runs["bert"], "alice/bert-lora", base_model="tiny/bert")
        push_to_hub(runs["bottleneck"], "alice/llama-bottleneck", base_model="tiny/llama")
        jobs = [{"repo": r, "input_ids": INPUT_IDS} for r in
                ("alice/llama-lora", "alice/llama-merged", "alice/bert-lora", "alice/llama-bottleneck")]
        out = tmp_path / "loaded.safetensors"
        done = subprocess.run([sys.executable, str(CHECKER), str(out), json.dumps(jobs)], capture_output=True,
                              text=True, env=child_env(hub, tmp_path / "hf-home"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = load_file(out)
    for name, repo, labels in (("llama", "alice/llama-lora", None), ("bert", "alice/bert-lora", 2),
                               ("bottleneck", "alice/llama-bottleneck", None)):
        logits, state = _tunekit_reference(runs[name])
        saved = load_file(runs[name] / "adapter" / "adapter_model.safetensors")
        assert torch.equal(loaded[f"{repo}|tunekit|logits"], logits)
        assert saved.keys() == state.keys()
        for key, value in saved.items():
            assert torch.equal(loaded[f"{repo}|tunekit|state|{key}"], value)
        if name == "bottleneck":  # a tunekit-only method: the card has no PEFT snippet
            assert f"{repo}|peft|logits" not in loaded
            continue
        auto = "AutoModelForSequenceClassification" if name == "bert" else "AutoModelForCausalLM"
        assert torch.equal(loaded[f"{repo}|peft|logits"], _peft_reference(runs[name], auto, labels))
        assert max_abs_diff(loaded[f"{repo}|peft|logits"], logits) <= FP32_EXACT
        for key, value in saved.items():  # PEFT drops the adapter name from its keys, as in the file
            assert torch.equal(loaded[f"{repo}|peft|state|{key}"], value)
    merged = AutoModelForCausalLM.from_pretrained(runs["llama"] / "merged")
    assert torch.equal(loaded["alice/llama-merged|transformers|logits"], _logits(merged))
