"""Merging on disk shard by shard equals merging the model in memory, for LoRA, DoRA, Conv1D and a trained head."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import tiny_gpt2, tiny_llama
from safetensors.torch import load_file

from tunekit.adapters import BottleneckConfig, LoRAConfig, eject_adapters, inject_adapters, save_adapters
from tunekit.adapters.state_merge import merge_state_dict
from tunekit.distributed.merge import base_shards, stream_merge


def _llama_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3))


def _trained_like(model):
    with torch.no_grad():  # a head copy that moved away from the base's
        for name, p in model.named_parameters():
            if p.requires_grad and ".adapters." in name and "lora" not in name:
                p.add_(torch.randn_like(p))
    return model


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in base_shards(folder):
        out.update(load_file(str(folder / name)))
    return out


CASES = {
    "lora": (tiny_llama, LoRAConfig(rank=4, init="random")),
    "dora_rslora": (tiny_llama, LoRAConfig(rank=4, init="random", use_dora=True, use_rslora=True)),
    "gpt2_conv1d": (tiny_gpt2, LoRAConfig(rank=4, init="random", bias="lora_only")),
    "head": (_llama_classifier, LoRAConfig(rank=4, init="random", modules_to_save=["score"])),
}


@pytest.mark.parametrize("name", list(CASES))
def test_stream_merge_equals_merging_the_model_in_memory(name, tmp_path):
    build, cfg = CASES[name]
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(tmp_path / "base", max_shard_size="20KB")  # several shards
    inject_adapters(model, cfg)
    _trained_like(model)
    save_adapters(model, tmp_path / "adapter")
    eject_adapters(model, merge=True).save_pretrained(tmp_path / "reference")  # the single-process merge

    report = stream_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert report.shards == len(base_shards(tmp_path / "base")) > 2
    ours, theirs = _weights(tmp_path / "merged"), _weights(tmp_path / "reference")
    assert sorted(ours) == sorted(theirs)
    changed = [k for k in theirs if not torch.equal(theirs[k], _weights(tmp_path / "base")[k])]
    assert changed, "the adapter changed some weights"
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert (tmp_path / "merged" / "config.json").is_file()


def test_merge_refuses_other_methods_and_foreign_adapters(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="only LoRA / DoRA"):
        merge_state_dict({}, {}, BottleneckConfig(hidden_size=4))
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    other = tiny_llama(hidden_size=64, intermediate_size=128, head_dim=16)
    inject_adapters(other, LoRAConfig(rank=4, init="random"))
    save_adapters(other, tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on another model"):
        stream_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def _write_big_base(root: Path) -> None:
    # 4 shards of 4 x (1024 x 1024) fp32 = 16 MiB each, and a LoRA adapter on every matrix.
    import json

    from safetensors.torch import save_file

    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    index, state = {}, {}
    for shard in range(4):
        tensors = {f"layers.{shard}.{i}.proj.weight": torch.randn(1024, 1024) for i in range(4)}
        save_file(tensors, str(base / f"model-{shard}.safetensors"))
        index.update({k: f"model-{shard}.safetensors" for k in tensors})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for key in index:
        path = "base_model.model." + key.removesuffix(".weight")
        state[path + ".lora_A.weight"], state[path + ".lora_B.weight"] = torch.randn(4, 1024), torch.randn(1024, 4)
    save_file(state, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "target_modules": ["proj"]}))


_MERGE_AND_REPORT_PEAK = """
import sys, threading
from tunekit.distributed.merge import stream_merge

def rss_mib():
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

start, peak, done = rss_mib(), [0.0], threading.Event()

def sample():
    while not done.wait(0.002):
        peak[0] = max(peak[0], rss_mib())

thread = threading.Thread(target=sample)
thread.start()
stream_merge(sys.argv[1] + "/base", sys.argv[1] + "/adapter", sys.argv[1] + "/merged")
done.set()
thread.join()
print(peak[0] - start)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident set size from /proc")
def test_stream_merge_holds_about_one_shard_in_memory(tmp_path):
    # 64 MiB of weights (128 MiB with the merged copy): the merge must never hold the whole model.
    _write_big_base(tmp_path)
    # Anonymous memory (not the page cache of the files read), with glibc returning freed tensors
    # to the system at once: what the merge holds, not what malloc keeps cached.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", _MERGE_AND_REPORT_PEAK, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, encoding="utf-8", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    growth_mib = float(out.stdout.strip().splitlines()[-1])
    assert growth_mib < 3 * 16, f"peak memory grew by {growth_mib:.0f} MiB merging 16 MiB shards"
    assert len(load_file(str(tmp_path / "merged" / "model-3.safetensors"))) == 4
