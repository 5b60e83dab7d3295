"""Low-precision bases through the trainer: a bf16 base and a bitsandbytes nf4 (QLoRA) base.

For each: the loss falls, the adapters stay fp32 (the base stays as loaded), and a run resumed
from a mid-run checkpoint ends with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import pytest
import torch
from _tiny import tiny_llama
from _train_data import ToyLM
from _trainer_runs import assert_same_weights, trainable

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer

BASES = ["bf16", "nf4"]
CFG = dict(batch_size=4, lr=3e-2, log_every=1, scheduler="cosine", warmup_steps=1)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    torch.manual_seed(0)
    # bitsandbytes' CPU 4-bit path needs in_features >= its 64-element quantization block
    tiny_llama(hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(folder)
    return folder


def adapted(kind: str, folder, dropout: float = 0.0) -> torch.nn.Module:
    """The saved tiny Llama as a ``kind`` base with LoRA on attention and the head (random B: not identity)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    if kind == "bf16":
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    else:
        pytest.importorskip("bitsandbytes")
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32)
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    torch.manual_seed(0)
    inject_adapters(model, LoRAConfig(rank=4, target_modules=["q_proj", "v_proj", "lm_head"], dropout=dropout))
    return model


def frozen(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("kind", BASES)
def test_training_lowers_the_loss_with_fp32_adapters_on_a_frozen_low_precision_base(tmp_path, saved_llama, kind):
    model = adapted(kind, saved_llama)
    base_dtype = model.model.layers[0].self_attn.k_proj.weight.dtype
    assert base_dtype == (torch.bfloat16 if kind == "bf16" else torch.uint8)
    base = frozen(model)
    data = ToyLM(n=8, n_eval=0)
    data.eval = data.train
    trainer = Trainer(model, data, TrainConfig(max_steps=8, resume="never", **CFG), tmp_path)
    before = trainer.evaluate()["loss"]
    result = trainer.fit()
    assert result.final_metrics["loss"] < before - 0.5, (before, result.final_metrics)
    assert {p.dtype for p in trainable(model).values()} == {torch.float32}
    assert all(torch.equal(p, base[n]) for n, p in frozen(model).items())


@pytest.mark.parametrize("kind", BASES)
def test_resume_on_a_low_precision_base_is_exact(tmp_path, saved_llama, kind):
    data = ToyLM(n=8)
    runs = {}
    for name, steps, extra in [("full", 4, {}), ("cut", 2, {"save_every": 2}), ("cut", 4, {})]:
        model = adapted(kind, saved_llama, dropout=0.1)  # dropout: the RNG must be restored too
        Trainer(model, data, TrainConfig(max_steps=steps, **CFG, **extra), tmp_path / name).fit()
        runs[name] = trainable(model)
    assert_same_weights(runs["full"], runs["cut"], tol=0.0)
