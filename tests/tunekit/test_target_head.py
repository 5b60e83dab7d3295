"""The LM head on target positions only (tunekit.models.heads, tunekit.train.loss) against
transformers' own ``model(**batch).loss`` and its gradients: padded and packed batches, LoRA on the
head, tied heads, final-logit soft-capping, prompt tuning, a DDP-style wrapper, FSDP2 with the head
in its own unit, and evaluation."""

from __future__ import annotations

import pytest
import torch
from _tiny import VOCAB, tiny_bert, tiny_inputs, tiny_llama
from _tolerances import FP32_EXACT, max_abs_diff
from transformers import Gemma2Config, Gemma2ForCausalLM

from tunekit.adapters import LoRAConfig, PromptConfig, inject_adapters
from tunekit.models.attention import register_tunekit_attention
from tunekit.models.heads import next_token_targets, supports_target_head, target_positions
from tunekit.train.loss import batch_tokens, causal_lm_loss, evaluation_loss, model_loss

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _padded_batch():
    batch = tiny_inputs("llama", batch=3, length=9)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[:, :3] = -100  # a masked prompt
    return {**batch, "labels": labels}


def _packed_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2]])
    labels = ids.clone()
    labels[position_ids == 0] = -100  # each example's first label, as tunekit's packer sets it
    labels[1, 9:] = -100  # a padded tail
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels}


def _loss_and_grads(model, batch, loss_fn):
    model.zero_grad()
    loss = loss_fn(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def _stock(model, batch):
    return model(**batch, use_cache=False).loss


def _ours(model, batch):
    return causal_lm_loss(model, batch, {"use_cache": False})


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert max_abs_diff(la, lb) <= FP32_EXACT, (la, lb)
    assert len(ga) == len(gb) > 0
    assert all(max_abs_diff(x, y) <= FP32_EXACT for x, y in zip(ga, gb))


def _lora_llama(**kw):
    model = tiny_llama(**kw)
    inject_adapters(model, LoRAConfig(rank=4, init="random", target_modules=ALL_LINEAR))
    return model


@pytest.mark.parametrize("attn", ["sdpa", "tunekit"])
@pytest.mark.parametrize("make_batch", [_padded_batch, _packed_batch], ids=["padded", "packed"])
def test_target_loss_and_grads_equal_the_model_loss_with_lora_on_the_head(attn, make_batch):
    register_tunekit_attention()
    model, batch = _lora_llama(attn_implementation=attn), make_batch()
    _assert_same(_loss_and_grads(model, batch, _ours), _loss_and_grads(model, batch, _stock))


def test_the_head_runs_on_target_positions_only():
    model, batch = tiny_llama(), _padded_batch()
    rows = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[:2]))
    picked = target_positions(model, batch, {"use_cache": False})
    n = int((batch["labels"][:, 1:] != -100).sum())
    assert rows == [(1, n)] and picked.logits.shape == (n, VOCAB)
    assert torch.equal(picked.targets, batch["labels"][:, 1:][batch["labels"][:, 1:] != -100])


def test_soft_capped_and_tied_head_matches_gemma2():
    # Gemma 2 ties the head to the embeddings and soft-caps the final logits inside its forward.
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0,
                       pad_token_id=0, attn_implementation="eager")
    model = Gemma2ForCausalLM(cfg).eval()
    batch = _padded_batch()
    with torch.no_grad():
        capped = target_positions(model, batch, {"use_cache": False}).logits
    assert capped.abs().max() < 5.0  # the cap was applied to the gathered logits
    _assert_same(_loss_and_grads(model, batch, _ours), _loss_and_grads(model, batch, _stock))


def test_prompt_tuning_virtual_tokens_get_no_targets():
    model = tiny_llama()
    inject_adapters(model, PromptConfig(num_virtual_tokens=3))
    batch = _padded_batch()
    _assert_same(_loss_and_grads(model, batch, _ours), _loss_and_grads(model, batch, _stock))
    assert next_token_targets(torch.tensor([[-100, 5, 6]]), 5).tolist() == [[-100, -100, 5, 6, -100]]


class _Wrapper(torch.nn.Module):
    """A DDP-style wrapper: the HF model in ``.module``, its own forward in front."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, **kwargs):
        self.calls += 1
        return self.module(**kwargs)


def test_wrapped_model_runs_the_wrapper_forward():
    inner, batch = _lora_llama(), _padded_batch()
    wrapped = _Wrapper(inner)
    assert supports_target_head(wrapped)
    _assert_same(_loss_and_grads(wrapped, batch, _ours), _loss_and_grads(inner, batch, _stock))
    assert wrapped.calls == 1  # the wrapper's own forward ran


def test_fsdp2_with_the_head_in_its_own_unit(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    reference, batch = _lora_llama(), _padded_batch()
    expected = _loss_and_grads(reference, batch, _stock)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = _lora_llama()
        model.load_state_dict(reference.state_dict())
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard([model.model.norm, model.lm_head])  # tunekit's fsdp units: final norm + head
        fully_shard(model)
        loss = _ours(model, batch)
        assert type(model.lm_head.base_layer.weight).__name__ == "DTensor"  # resharded after the forward
        loss.backward()  # FSDP2 writes the sharded parameters' .grad in its post-backward hooks
        grads = [p.grad.full_tensor() for p in model.parameters() if p.requires_grad]
        _assert_same((loss, grads), expected)
    finally:
        dist.destroy_process_group()


def test_model_loss_uses_the_target_head_for_causal_lm_only():
    lm, batch = tiny_llama(), _padded_batch()
    stock = _stock(lm, batch)
    heads = []
    lm.lm_head.register_forward_hook(lambda _m, args, _out: heads.append(args[0].shape[1]))
    assert max_abs_diff(model_loss(lm, batch, {"use_cache": False}, "causal_lm"), stock) <= FP32_EXACT
    assert model_loss(lm, batch, {"use_cache": False}) == stock  # no task: the model's own loss, every position
    assert heads == [int((batch["labels"][:, 1:] != -100).sum()), batch["labels"].shape[1]]


def test_evaluation_loss_returns_logits_only_when_read():
    lm, batch = tiny_llama(), _padded_batch()
    with torch.no_grad():
        stock = lm(**batch, use_cache=False)
        loss, logits = evaluation_loss(lm, batch, "causal_lm", {"use_cache": False})
        assert logits is None and max_abs_diff(loss, stock.loss) <= FP32_EXACT
        loss, logits = evaluation_loss(lm, batch, "causal_lm", {"use_cache": False}, need_logits=True)
        assert max_abs_diff(logits, stock.logits) == 0 and max_abs_diff(loss, stock.loss) == 0
        cls = tiny_bert()
        inputs = {**tiny_inputs("bert"), "labels": torch.tensor([0, 2])}
        loss, logits = evaluation_loss(cls, inputs, "seq_cls")
        ref = cls(**inputs)
        assert max_abs_diff(logits, ref.logits) == 0 and max_abs_diff(loss, ref.loss) == 0


def test_batch_tokens_counts_real_tokens_of_padded_and_packed_batches():
    padded = _padded_batch()
    assert batch_tokens(padded) == int(padded["attention_mask"].sum())
    packed = _packed_batch()
    assert batch_tokens(packed) == 24 - 3  # row 1's last run [0, 1, 2] has no target: the padded tail
    full = {**packed, "labels": packed["input_ids"]}
    assert batch_tokens(full) == 24


@pytest.mark.parametrize("prompt_tokens", [0, 3])
def test_dense_targets_slices_what_the_mask_selects_when_every_label_is_a_target(prompt_tokens):
    """The estimator's static-shape selection: on labels that are all targets it must give
    transformers' own loss and gradients (prompt tuning's virtual tokens included)."""
    from tunekit.models.heads import dense_targets

    torch.manual_seed(0)
    model = tiny_llama()
    if prompt_tokens:
        inject_adapters(model, PromptConfig(num_virtual_tokens=prompt_tokens))
    else:
        inject_adapters(model, LoRAConfig(rank=4, target_modules=ALL_LINEAR))
    batch = tiny_inputs("llama", batch=2, length=7)
    batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"].clone()}
    with dense_targets():
        ours = _loss_and_grads(model, batch, _ours)
    _assert_same(ours, _loss_and_grads(model, batch, _stock))
