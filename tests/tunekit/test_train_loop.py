"""The training step and evaluation, each checked against a hand-written reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from _tiny import tiny_bert, tiny_llama
from _tolerances import FP32_EXACT, max_abs_diff
from _train_data import ToyCls, ToyLM
from _trainer_runs import learner, trainable

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer


def lora_llama(**lora) -> torch.nn.Module:
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=4, init="random", **lora))
    return model


def sgd_cfg(**kw) -> TrainConfig:
    """One plain-SGD step at lr 1: the update IS minus the gradient, so weights compare gradients."""
    base = dict(optimizer="sgd", lr=1.0, scheduler="constant", max_grad_norm=None, max_steps=1, resume="never")
    return TrainConfig(**{**base, **kw})


def reference_grads(model, batch) -> dict[str, torch.Tensor]:
    """Gradients of the model's own loss on one batch, computed without the trainer."""
    model = copy.deepcopy(model).train()
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def reference_lm_loss(model, rows) -> float:
    """Mean next-token cross-entropy over every target of ``rows``, one unpadded row at a time."""
    total, count = 0.0, 0
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(row["labels"][1:])
        total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / count


def test_lora_training_lowers_eval_loss_and_keeps_base_frozen(tmp_path):
    model, data = learner()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=3e-2, log_every=5, resume="never")
    trainer = Trainer(model, data, cfg, tmp_path)
    before = trainer.evaluate()["loss"]
    result = trainer.fit()
    assert result.final_metrics["loss"] < before - 1.0
    assert result.global_step == 10 and result.epochs_completed == 5
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_optimizer_holds_exactly_the_trainable_params(tmp_path):
    model = lora_llama()
    trainer = Trainer(model, ToyLM(), TrainConfig(resume="never"), tmp_path)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert 0 < len(in_opt) < len(list(model.parameters()))


def test_accumulation_2x2_equals_batch_4_and_the_full_batch_gradient(tmp_path):
    data = ToyLM(n=4)
    torch.manual_seed(0)
    model = lora_llama()
    start = trainable(model)
    runs = {}
    for bs, accum in [(2, 2), (4, 1)]:
        m = copy.deepcopy(model)
        Trainer(m, data, sgd_cfg(batch_size=bs, grad_accum_steps=accum), tmp_path / f"{bs}x{accum}").fit()
        runs[bs] = trainable(m)
    order = data.train_order(0, 0)
    ref = reference_grads(model, data.collate([data.train[i] for i in order]))
    for name, w0 in start.items():
        assert max_abs_diff(runs[2][name], runs[4][name]) < FP32_EXACT
        assert max_abs_diff(w0 - runs[4][name], ref[name]) < FP32_EXACT
    # The rows hold different numbers of targets, so a mean of per-micro-batch means would differ.
    assert max(max_abs_diff(w0 - runs[2][n], torch.zeros_like(w0)) for n, w0 in start.items()) > 1e-3


def test_grad_clipping_scales_the_update_to_max_norm(tmp_path):
    data, model = ToyLM(n=4), lora_llama()
    start = trainable(model)
    ref = reference_grads(model, data.collate([data.train[i] for i in data.train_order(0, 0)]))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in ref.values()]))
    result = Trainer(model, data, sgd_cfg(batch_size=4, max_grad_norm=1e-3, log_every=1), tmp_path).fit()
    assert result.history[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    coef = 1e-3 / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s formula
    for name, p in trainable(model).items():
        assert max_abs_diff(start[name] - p, ref[name] * coef) < FP32_EXACT * 1e-2


def test_bf16_mixed_precision_runs_matmuls_in_bf16_on_cpu(tmp_path):
    model = lora_llama()
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    cfg = TrainConfig(max_steps=2, batch_size=4, lr=1e-2, mixed_precision="bf16", resume="never")
    result = Trainer(model, ToyLM(n=8), cfg, tmp_path).fit()
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert torch.isfinite(torch.tensor(result.final_metrics["loss"]))


def test_fp16_on_cpu_is_refused_not_silently_fp32(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(ValueError, match="fp16.*needs a CUDA GPU"):
        Trainer(lora_llama(), ToyLM(), TrainConfig(mixed_precision="fp16"), tmp_path)


def test_gradient_checkpointing_recomputes_and_matches(tmp_path):
    data = ToyLM(n=4)
    model = lora_llama()
    results = {}
    for on in (False, True):
        m = copy.deepcopy(model)
        calls = []
        # A pre-hook: non-reentrant recompute stops as soon as the saved tensors exist again (early_stop),
        # which is inside the MLP, so a forward (post) hook would not see the second call.
        m.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        r = Trainer(m, data, sgd_cfg(batch_size=4, gradient_checkpointing=on, log_every=1), tmp_path / str(on)).fit()
        results[on] = (r.history[0]["loss"], trainable(m), len(calls))
    (loss_off, w_off, calls_off), (loss_on, w_on, calls_on) = results[False], results[True]
    assert calls_on > calls_off  # the checkpointed layer really ran forward again in backward
    assert loss_on == pytest.approx(loss_off, abs=FP32_EXACT)
    assert all(max_abs_diff(w_on[n], w_off[n]) < FP32_EXACT for n in w_off)


def test_gradient_checkpointing_unsupported_model_is_a_clear_error(tmp_path):
    model = lora_llama()
    model.supports_gradient_checkpointing = False
    with pytest.raises(ValueError, match="gradient_checkpointing=false"):
        Trainer(model, ToyLM(), TrainConfig(gradient_checkpointing=True), tmp_path)


def test_evaluate_seq_cls_accuracy_and_loss_match_a_reference(tmp_path):
    model, data = tiny_bert(num_labels=3), ToyCls(n_eval=11)
    inject_adapters(model, LoRAConfig(rank=4, modules_to_save=["classifier"]))
    metrics = Trainer(model, data, TrainConfig(eval_batch_size=4), tmp_path).evaluate()
    with torch.no_grad():
        logits = torch.cat([model(**data.collate([r])).logits for r in data.eval])
    labels = torch.tensor([r["labels"] for r in data.eval])
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), abs=FP32_EXACT)


def test_evaluate_lm_loss_is_token_weighted_over_batches(tmp_path):
    model, data = lora_llama(), ToyLM(n_eval=7)
    metrics = Trainer(model, data, TrainConfig(eval_batch_size=3), tmp_path).evaluate()
    reference = reference_lm_loss(model, data.eval)
    assert metrics["loss"] == pytest.approx(reference, abs=FP32_EXACT)
    assert metrics["perplexity"] == pytest.approx(torch.tensor(reference).exp().item(), rel=1e-5)


def test_early_stopping_triggers_after_patience(tmp_path):
    # Training lowers the loss, so with "max" every evaluation after the first is a non-improvement.
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=3e-2, eval_every=1, early_stopping_patience=2,
                      early_stopping_mode="max", resume="never")
    torch.manual_seed(0)
    model, data = learner()
    result = Trainer(model, data, cfg, tmp_path / "stopped").fit()
    assert result.stopped_early and result.global_step == 3 and result.best_step == 1
    assert [h["step"] for h in result.history if h["split"] == "eval"] == [1, 2, 3]

    # The best weights (step 1) come back, as transformers' load_best_model_at_end does.
    torch.manual_seed(0)
    one_step_model, data = learner()
    one_step = Trainer(one_step_model, data, cfg.model_copy(update={"max_steps": 1}), tmp_path / "one").fit()
    assert trainable(model).keys() == trainable(one_step_model).keys()
    assert all(torch.equal(a, b) for a, b in zip(trainable(model).values(), trainable(one_step_model).values()))
    assert result.final_metrics == result.best_metrics == one_step.final_metrics


def test_unknown_early_stopping_metric_names_the_choices(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=4, eval_every=1, early_stopping_metric="f1", resume="never")
    with pytest.raises(ValueError, match=r"early_stopping_metric='f1'.*\['loss', 'perplexity'\]"):
        Trainer(lora_llama(), ToyLM(n=8), cfg, tmp_path).fit()


def test_fused_cross_entropy_needs_causal_lm(tmp_path):
    model = tiny_bert()
    inject_adapters(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="fused_cross_entropy is for causal_lm"):
        Trainer(model, ToyCls(), TrainConfig(fused_cross_entropy=True), tmp_path)


def test_fused_cross_entropy_matches_the_model_loss(tmp_path):
    pytest.importorskip("tunekit.models.kernels").fused_causal_lm_loss  # noqa: B018 - lands with the kernels task
    data, model = ToyLM(n=4), lora_llama()
    runs = {}
    for fused in (False, True):
        m = copy.deepcopy(model)
        r = Trainer(m, data, sgd_cfg(batch_size=4, fused_cross_entropy=fused, log_every=1), tmp_path / str(fused)).fit()
        runs[fused] = (r.history[0]["loss"], trainable(m))
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-4)
    assert all(max_abs_diff(runs[True][1][n], runs[False][1][n]) < 1e-4 for n in runs[False][1])


def test_fused_evaluation_matches_the_reference_loss_without_full_vocabulary_logits(tmp_path):
    pytest.importorskip("tunekit.models.kernels").fused_causal_lm_loss  # noqa: B018
    model, data = lora_llama(), ToyLM(n_eval=7)
    head_positions = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: head_positions.append(out.shape[1]))
    metrics = Trainer(model, data, TrainConfig(eval_batch_size=3, fused_cross_entropy=True), tmp_path).evaluate()
    assert head_positions and set(head_positions) == {0}  # the head never produced (B, T, V) logits
    assert metrics["loss"] == pytest.approx(reference_lm_loss(model, data.eval), abs=1e-5)


def test_a_multi_process_launch_is_refused_without_a_strategy(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"distributed.strategy: none trains in one process.*WORLD_SIZE=2"):
        Trainer(lora_llama(), ToyLM(), TrainConfig(), tmp_path)
    # A caller that brings its own strategy decided how the processes share the work: not refused.
    from tunekit.distributed import DistEnv, DistributedOptions, make_strategy, start_runtime

    options = DistributedOptions()
    Trainer(lora_llama(), ToyLM(), TrainConfig(), tmp_path,
            strategy=make_strategy(options, start_runtime(options, DistEnv())))
    # The strategy replaced the old wrap_model hook; passing it says so.
    with pytest.raises(TypeError, match=r"wrap_model=\.\.\.\) is gone: pass strategy="):
        Trainer(lora_llama(), ToyLM(), TrainConfig(), tmp_path, wrap_model=lambda model: model)


def test_real_data_bundle_packed_step_equals_unpacked_step(tmp_path):
    # End to end with tunekit.data: one SGD step over all examples, packed or not, moves the weights
    # identically (token-weighted loss; the bundle's forward_kwargs reach the model).
    from _tiny import tiny_tokenizer, write_rows

    from tunekit.data import DataConfig, build_dataset

    rows = [{"text": f"row {i}: " + " ".join("abcdefgh"[: 2 + i % 5])} for i in range(8)]
    files = [write_rows(tmp_path / "train.jsonl", rows)]
    model = lora_llama()
    weights = {}
    for packing in (False, True):
        data = build_dataset(DataConfig(train_files=files, format="text", packing=packing, max_seq_len=64),
                             tiny_tokenizer(), seed=0)
        m = copy.deepcopy(model)
        Trainer(m, data, sgd_cfg(batch_size=8, lr=0.5), tmp_path / str(packing)).fit()
        weights[packing] = trainable(m)
    assert len(data.train) < 8  # packing did pack
    start = trainable(model)
    for name, w in weights[False].items():
        assert max_abs_diff(w, weights[True][name]) < FP32_EXACT
        assert max_abs_diff(w, start[name]) > 0
