"""The fast configuration — tunekit attention, kernel-backed modules, fused linear+CE, packing —
trains exactly like the stock one: same per-step losses and eval loss through `tunekit.finetune`."""

from __future__ import annotations

import pytest
from _tiny_runs import run_config
from _tolerances import FP32_EXACT

import tunekit

FAST = ["model.attn_implementation=tunekit", "model.kernels=true", "train.fused_cross_entropy=true"]


@pytest.mark.slow
def test_fast_path_and_packing_train_like_stock(tmp_path):
    curves = {}
    for name, overrides in (("stock", []), ("fast", FAST)):
        for packing in (False, True):
            cfg = run_config(tmp_path, "causal_lm", "lora", steps=5)
            cfg["output"]["dir"] = str(tmp_path / f"{name}-{packing}")
            cfg["data"]["packing"] = packing
            result = tunekit.finetune(cfg, overrides)
            losses = [h["loss"] for h in result.train.history if h["split"] == "train"]
            curves[name, packing] = (losses, result.metrics["loss"])
    stock_losses, stock_eval = curves["stock", False]
    assert stock_losses[-1] < stock_losses[0]
    for key, (losses, eval_loss) in curves.items():
        assert len(losses) == len(stock_losses), key
        assert all(abs(a - b) <= FP32_EXACT for a, b in zip(losses, stock_losses)), (key, losses, stock_losses)
        assert abs(eval_loss - stock_eval) <= FP32_EXACT, key
