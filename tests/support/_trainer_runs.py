"""Short LoRA runs of the Trainer on a tiny Llama, and weight comparisons, shared by the trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from _tiny import tiny_llama
from _train_data import ToyLM

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer

# Dropout > 0 makes the trajectory depend on the torch RNG, so resume must restore it too.
LORA = dict(rank=4, dropout=0.1, init="random")
CFG = dict(max_steps=6, batch_size=3, grad_accum_steps=2, lr=1e-2, scheduler="cosine", warmup_steps=2, log_every=1)


def lora_model(seed: int = 0) -> torch.nn.Module:
    """The same tiny LoRA Llama for every call with the same ``seed``."""
    torch.manual_seed(seed)
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(**LORA))
    return model


def lora_trainer(out, data=None, run_config=None, **cfg) -> tuple[torch.nn.Module, Trainer]:
    """A Trainer of ``lora_model()`` on ``ToyLM(n=10)`` with ``CFG`` updated by ``cfg``."""
    model = lora_model()
    return model, Trainer(model, data or ToyLM(n=10), TrainConfig(**{**CFG, **cfg}), out, run_config=run_config)


def run(out, data=None, run_config=None, **cfg):
    """``(model, TrainResult)`` of a full ``lora_trainer`` run."""
    model, trainer = lora_trainer(out, data, run_config, **cfg)
    return model, trainer.fit()


def learner() -> tuple[torch.nn.Module, ToyLM]:
    """A LoRA llama that learns its data within 10 steps, and data whose eval rows are its train rows.

    LoRA on lm_head too: a random tiny model's logits barely move through attention alone.
    """
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "lm_head"]))
    data = ToyLM(n=8, n_eval=0)
    data.eval = data.train
    return model, data


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    assert max((a[n].float() - b[n].float()).abs().max().item() for n in a) <= tol


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
