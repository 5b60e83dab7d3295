"""The Python API: tunekit.finetune(dict | YAML path | FinetuneConfig) -> FinetuneResult."""

from __future__ import annotations

import pytest
import torch
import yaml
from _tiny_runs import run_config
from _tolerances import FP32_EXACT, max_abs_diff
from transformers import AutoModelForCausalLM

import tunekit
from tunekit.cli import main
from tunekit.inference import load_adapted

IDS = torch.tensor([[1, 30, 40, 50, 60]])


def test_finetune_dict_with_merged_output(tmp_path, capsys):
    cfg = run_config(tmp_path, "causal_lm", "lora")
    cfg["output"]["save_merged"] = True
    result = tunekit.finetune(cfg)
    assert isinstance(result, tunekit.FinetuneResult)
    assert result.metrics["loss"] < result.metrics_before["loss"]
    assert result.metrics_file.is_file() and result.config_file.name == "resolved_config.yaml"
    printed = capsys.readouterr().out
    assert f"adapter saved to {result.adapter_dir}" in printed
    # The final metrics are shown twice: the last evaluation's log line, and beside the metrics before.
    loss = result.metrics["loss"]
    after_training = printed.split(f"train step {result.train.global_step}/")[-1].splitlines()[1:]
    shown = [line for line in after_training if f"loss {loss:.4g}" in line or f"loss {loss:.4f}" in line]
    assert len(shown) == 2 and shown[1].startswith("eval after:"), shown
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    adapted = load_adapted(result.adapter_dir).model
    with torch.no_grad():
        assert max_abs_diff(merged(input_ids=IDS).logits, adapted(input_ids=IDS).logits) <= FP32_EXACT


def test_from_config_base_is_saved_so_the_adapter_reloads(tmp_path):
    cfg = run_config(tmp_path, "causal_lm", "lora")
    tiny = cfg["model"]["name_or_path"]
    cfg["model"] = {"from_config": True, "model_type": "llama", "tokenizer": tiny,
                    "config_overrides": {"vocab_size": 96, "hidden_size": 16, "intermediate_size": 32,
                                         "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = tunekit.finetune(str(path), ["train.max_steps=2"])
    assert (result.output_dir / "base" / "config.json").is_file()
    reloaded = load_adapted(result.adapter_dir).model
    assert reloaded.config.hidden_size == 16 and result.train.global_step == 2


@pytest.mark.parametrize(("override", "env", "needle"), [
    # a sharding strategy on one process
    ("distributed.strategy=fsdp", {}, "distributed.strategy=fsdp shards the model over processes but this run has 1"),
    ("hub.push=true", {}, "hub.push=true"),
    # an external launcher's processes would each train the same rows into the same folder
    ("train.lr=0.01", {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "distributed.strategy: none"),
    ("train.lr=0.01", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "WORLD_SIZE=2"),
])
def test_what_this_version_cannot_run_is_refused_before_loading(tmp_path, capsys, monkeypatch, override, env,
                                                                  needle):
    cfg = run_config(tmp_path, "causal_lm", "lora")
    cfg["model"]["name_or_path"] = str(tmp_path / "never-loaded")
    cfg["hub"] = {"repo_id": "me/x"}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()  # drop the tiny model's save progress
    assert main(["finetune", str(path), override]) == 2  # a refused config
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("config error:")
    assert not (tmp_path / "run-causal_lm-lora").exists()


def test_qlora_run_with_checkpointing_then_unquantized_merge(tmp_path, capsys):
    # The run evaluates before training: with bitsandbytes' CPU inference repacking left on,
    # that eval would leave the 4-bit layers giving zero gradients (loss would not move).
    cfg = run_config(tmp_path, "causal_lm", "lora")
    cfg["model"]["quantization"] = {"bits": 4, "compute_dtype": "fp32"}
    cfg["train"]["gradient_checkpointing"] = True
    result = tunekit.finetune(cfg)
    assert result.metrics["loss"] < result.metrics_before["loss"]
    assert all(r["grad_norm"] > 0 for r in result.train.history if r.get("split") == "train")
    reloaded = load_adapted(result.adapter_dir).model
    assert type(reloaded.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    capsys.readouterr()
    assert main(["merge", str(result.adapter_dir), "--out", str(tmp_path / "merged")]) == 0
    # merged into the dequantized 4-bit weights it trained against, not streamed from the fp32 files
    assert "loaded whole: the adapter was trained on a quantized base" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert merged.dtype == torch.float32
