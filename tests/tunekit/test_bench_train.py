"""Smoke tests of bench/train.py on a tiny Llama: the report has every row, sane numbers and equal work.

No timing assertions: only that both contenders ran the same job (same tokens) and, starting from the
same weights on the same data, reached the same loss (PEFT + transformers.Trainer is the oracle).
"""

import importlib.util
import json
import math
from pathlib import Path

import torch
from _tolerances import FP32_EXACT, max_abs_diff

_PATH = Path(__file__).resolve().parents[2] / "bench" / "train.py"
TINY = ["--steps", "2", "--warmup", "1", "--seq-len", "16", "--batch", "2", "--hidden", "64", "--layers", "2"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_has_both_rows_with_equal_tokens_and_losses(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert _bench().main([*TINY, "--repeats", "1", "--no-fused", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert list(summary) == ["peer", "tunekit"]
    for row in summary.values():
        for key in ("s_per_step", "tokens_per_s", "peak_rss_mib", "init_loss", "final_loss", "train_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert summary["peer"]["tokens"] == summary["tunekit"]["tokens"] == 2 * 16 * (1 + 2)
    assert abs(summary["peer"]["final_loss"] - summary["tunekit"]["final_loss"]) <= FP32_EXACT
    table = capsys.readouterr().out
    assert "| peer |" in table and "| tunekit | " in table and "(x" in table


def test_fused_cross_entropy_worker_matches_peer():
    bench = _bench()
    spec = {"steps": 2, "warmup": 1, "seq_len": 16, "batch": 2, "hidden": 64, "layers": 2,
            "threads": torch.get_num_threads()}
    peer, fused = bench.worker("peer", spec), bench.worker("tunekit+fused_ce", spec)
    assert peer["tokens"] == fused["tokens"] == 2 * 16 * 3
    assert abs(peer["train_loss"] - fused["train_loss"]) <= FP32_EXACT
    assert abs(peer["final_loss"] - fused["final_loss"]) <= FP32_EXACT


def test_lora_reset_gives_peft_and_tunekit_the_same_matrices():
    from peft import LoraConfig, get_peft_model

    from tunekit.adapters import LoRAConfig, inject_adapters

    bench = _bench()
    spec = {"hidden": 64, "layers": 2, "seq_len": 16}
    theirs = get_peft_model(bench.build_model(spec), LoraConfig(r=8, target_modules=bench.TARGETS))
    ours = bench.build_model(spec)
    inject_adapters(ours, LoRAConfig(rank=8, target_modules=bench.TARGETS))
    assert bench.reset_lora(theirs) == bench.reset_lora(ours) == 2 * 4 * 2
    batch = bench.Collate()(bench.synthetic_rows(spec, 2, seed=3))
    with torch.no_grad():
        assert max_abs_diff(theirs(**batch).logits, ours(**batch).logits) <= FP32_EXACT  # B = 0: both are the base
    a_theirs = [p for n, p in theirs.named_parameters() if "lora_A" in n]
    a_ours = [p for n, p in ours.named_parameters() if "lora_A" in n]
    assert all(torch.equal(x, y) for x, y in zip(a_theirs, a_ours, strict=True))
