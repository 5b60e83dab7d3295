"""What the tensor-parallel tests run on each rank, and the single-process references.

``run_tp`` trains one (architecture, method) after another with tunekit's ``Trainer`` on a
``tp`` / ``fsdp_tp`` strategy (all on one process group), recording per step the gradients
the optimizer is given (after the explicit partial-sum reduction and clipping, gathered
whole in the canonical layout), the collectives ``optimizer_step`` issued, every rank's
local bytes; then it saves the adapter (gathered). ``reference`` runs the same Trainer on one
process with the same global batch and records the gradients at the same point.
``count_collectives`` counts one forward and one backward of a split model with and
without adapters (``CommDebugMode``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from _dist_helpers import gather_objects, strategy_for, toy_data, train, train_config
from _tiny import VOCAB, tiny_gpt2, tiny_llama
from torch.distributed.tensor.debug import CommDebugMode

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, PromptConfig, inject_adapters

PROJECTIONS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
LAYERS = 2
STEPS, BATCH, ACCUM, LR = 3, 2, 2, 1e-3


def base_model(arch: str) -> torch.nn.Module:
    """The tiny base of ``arch`` (seeded; no dropout, so one process and TP see the same function)."""
    torch.manual_seed(0)
    if arch == "llama":
        return tiny_llama()
    if arch == "gpt2":
        return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(  # GQA 4:2
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0))


def adapter_config(arch: str, method: str):
    if method in ("lora", "dora"):
        return LoRAConfig(rank=4, alpha=8, init="random", target_modules=PROJECTIONS[arch], use_dora=method == "dora")
    if method == "prefix":
        return PrefixConfig(num_virtual_tokens=3)
    if method == "prompt":
        return PromptConfig(num_virtual_tokens=3)
    return BottleneckConfig(hidden_size=8, init="random")


def build(arch: str, method: str) -> torch.nn.Module:
    model = base_model(arch)
    torch.manual_seed(1)
    inject_adapters(model, adapter_config(arch, method))
    return model.train()


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def rank_bytes(model: torch.nn.Module) -> dict[str, int]:
    """This rank's local parameter bytes (frozen ones with the buffers, as the estimator counts them)."""
    params = list(model.parameters())
    return {"frozen": sum(_local_bytes(p) for p in params if not p.requires_grad)
            + sum(_local_bytes(b) for b in model.buffers()),
            "trainable": sum(_local_bytes(p) for p in params if p.requires_grad)}


def _record_steps(strategy, record: dict) -> None:
    """Wrap ``strategy.optimizer_step``: the partial gradients it finds, its collectives, the gradients it steps with."""
    from tunekit.distributed.tp_grads import _is_partial

    step = strategy.optimizer_step

    def counted_step(max_grad_norm):
        optimizer, params = strategy.optimizer, dict(strategy.model.named_parameters())
        torch_step, seen = optimizer.step, {}

        def recording_step(*args, **kwargs):
            seen.update({n: p.grad.detach().clone() for n, p in params.items() if p.requires_grad})
            return torch_step(*args, **kwargs)  # local math only (counted apart below)

        record["partial_factors"].append(sum(_is_partial(p.grad) for p in params.values() if p.requires_grad))
        optimizer.step = recording_step
        try:
            with CommDebugMode() as comm:
                outcome = step(max_grad_norm)
        finally:
            optimizer.step = torch_step
        record["step_collectives"].append(_comm_counts(comm))
        whole = getattr(strategy, "canonical", lambda _name, grad: grad)  # one process: already whole
        record["grads"].append({n: whole(n, g).cpu().clone() for n, g in seen.items()})
        return outcome

    strategy.optimizer_step = counted_step


def _new_record() -> dict:
    return {"grads": [], "partial_factors": [], "step_collectives": []}


def _config(accum: int, fused: bool):
    return train_config(STEPS, BATCH, accum, lr=LR).model_copy(update={"fused_cross_entropy": fused})


def run_one(arch: str, method: str, distributed: dict, out: Path, fused: bool = False,
            tag: str = "") -> tuple[object, dict]:
    """Train ``arch`` + ``method`` under ``distributed`` on this rank, save the adapter; (strategy, record)."""
    from tunekit.distributed.adapter_save import save_gathered_adapter

    cfg = _config(ACCUM, fused)
    strategy = strategy_for(cfg, **distributed)
    record = _new_record()
    _record_steps(strategy, record)
    name = f"{arch}-{method}{'-fused' * fused}{tag}"
    result = train(strategy, build(arch, method), toy_data("lora"), cfg, out / f"{name}-run")
    record["losses"] = result["losses"]
    record["bytes"] = gather_objects(rank_bytes(strategy.model))
    record["coordinates"] = gather_objects(dict(zip(strategy.runtime.mesh.mesh_dim_names,
                                                    strategy.runtime.mesh.get_coordinate())))
    save_gathered_adapter(strategy, out / name)
    return strategy, record


def run_tp(case: dict) -> dict:
    """Every (arch, method) of ``case["runs"]`` under ``case["distributed"]``, then the collective counts per arch."""
    out, results, first = Path(case["out"]), {}, None
    for arch, method in case["runs"]:
        strategy, results[f"{arch}-{method}"] = run_one(arch, method, case["distributed"], out)
        first = first or strategy  # the first one owns the process group
    if case.get("sequence_parallel"):  # norms and residuals on sequence shards between the TP regions
        _, results["llama-lora-sp"] = run_one("llama", "lora", {**case["distributed"], "sequence_parallel": True},
                                              out, tag="-sp")
        results["sp-comms"] = count_collectives("llama", "lora", first.runtime.tp_mesh, sequence_parallel=True)
    if case.get("encoders"):
        results["encoders"] = {arch: encoder_step(arch, first.runtime) for arch in ("bert", "t5")}
    if case.get("fused"):  # train.fused_cross_entropy: the head stays whole on every rank
        _, results["llama-lora-fused"] = run_one("llama", "lora", case["distributed"], out, fused=True)
        results["fused-comms"] = count_fused_collectives(first.runtime.tp_mesh)
    for i, job in enumerate(case.get("jobs", ())):  # resume runs (train_llama) on the same process group
        results[f"job-{i}"] = {k: v for k, v in train_llama(**job).items() if k != "strategy"}
    for arch in case.get("count", ()):
        results[f"{arch}-comms"] = {kind: count_collectives(arch, kind, first.runtime.tp_mesh)
                                    for kind in ("base", "lora", "dora")}
    first.close()
    return results


def _comm_counts(comm: CommDebugMode) -> dict[str, int]:
    return {str(op).split(".")[-1].rstrip("_"): n for op, n in comm.get_comm_counts().items()}


def count_collectives(arch: str, kind: str, mesh, sequence_parallel: bool = False) -> dict[str, dict[str, int]]:
    """Collectives of one forward and one backward of ``arch`` split over ``mesh``: the plain base, or with adapters.

    The input embeddings require grad in every case, so the backward runs through every
    layer (the plain base trains nothing of its own).
    """
    from tunekit.distributed.tensor_parallel import parallelize

    model = base_model(arch) if kind == "base" else build(arch, kind)
    if kind == "base":
        model.requires_grad_(False)
    parallelize(model, mesh, sequence_parallel=sequence_parallel)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with CommDebugMode() as forward:
        loss = model(inputs_embeds=embeds, labels=ids).loss
    with CommDebugMode() as backward:
        loss.backward()
    return {"forward": _comm_counts(forward), "backward": _comm_counts(backward)}


def count_fused_collectives(mesh) -> dict[str, int]:
    """Collectives of one forward of the fused head + cross-entropy loss on a split LoRA Llama."""
    from tunekit.distributed.tensor_parallel import parallelize
    from tunekit.models.kernels import fused_causal_lm_loss

    model = build("llama", "lora")
    parallelize(model, mesh)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with CommDebugMode() as forward:
        fused_causal_lm_loss(model, {"input_ids": ids, "labels": ids})
    return _comm_counts(forward)


def reference(arch: str, method: str, out: Path, dp: int = 1, fused: bool = False) -> dict:
    """One process on the global batch of ``dp`` data-parallel ranks: losses, the gradients stepped with, the adapter."""
    from tunekit.adapters import save_adapters

    cfg = _config(ACCUM * dp, fused)
    strategy = strategy_for(cfg)
    record = _new_record()
    _record_steps(strategy, record)
    name = f"{arch}-{method}{'-fused' * fused}"
    result = train(strategy, build(arch, method), toy_data("lora"), cfg, out / f"{name}-run")
    record["losses"] = result["losses"]
    record["bytes"] = rank_bytes(strategy.model)
    save_adapters(strategy.model, out / name)
    return record


# ---------------------------------------------------------------- BERT / T5: one forward and backward

def encoder_model(arch: str) -> torch.nn.Module:
    """A tiny BERT classifier or T5 (no dropout) with LoRA on every linear layer (the plan's and the rest)."""
    from _tiny import tiny_bert, tiny_t5

    torch.manual_seed(0)
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if arch == "bert" else \
        tiny_t5(dropout_rate=0.0)
    torch.manual_seed(1)
    inject_adapters(model, LoRAConfig(rank=4, alpha=8, init="random", target_modules="all-linear"))
    return model.train()


def encoder_batch(arch: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = torch.tensor([0, 2]) if arch == "bert" else torch.randint(3, VOCAB, (2, 5), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encoder_step(arch: str, runtime=None) -> dict:
    """The loss of one batch and every trainable gradient, whole; split by a ``tp`` strategy on ``runtime``."""
    from tunekit.distributed import DistributedOptions, make_strategy

    model = encoder_model(arch)
    strategy = None
    if runtime is not None:
        strategy = make_strategy(DistributedOptions(strategy="tp", tp_size=runtime.shape.tp), runtime)
        model, _ = strategy.prepare(model, lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad]))
    loss = model(**encoder_batch(arch)).loss
    loss.backward()
    if strategy is not None:
        strategy.reduce_gradients()
    whole = getattr(strategy, "canonical", lambda _name, grad: grad)
    return {"loss": float(loss), "grads": {n: whole(n, p.grad).cpu().clone() for n, p in model.named_parameters()
                                          if p.requires_grad}}


# ---------------------------------------------------------------- resume across mesh shapes

RESUME_STEPS, RESUME_ROWS = 4, 40


def train_llama(distributed: dict, batch_size: int, accum: int, out: str, resume: str = "never") -> dict:
    """One rank: LoRA Llama, ``RESUME_STEPS`` steps (a checkpoint every 2), from ``resume``; the adapter saved."""
    from tunekit.distributed.adapter_save import save_gathered_adapter

    cfg = train_config(RESUME_STEPS, batch_size, accum, lr=LR, resume=resume, save_every=2)
    strategy = strategy_for(cfg, **distributed)
    result = train(strategy, build("llama", "lora"), toy_data("lora", RESUME_ROWS), cfg, Path(out) / "run")
    save_gathered_adapter(strategy, Path(out) / "adapter")
    return {"losses": result["losses"], "checkpoint": result["checkpoint"], "strategy": strategy}


def train_jobs(jobs: list[dict]) -> list[dict]:
    """``train_llama`` for each job in turn, on one process group (a launch costs seconds of start-up)."""
    results = [train_llama(**job) for job in jobs]
    results[0]["strategy"].close()  # the first one owns the process group
    return [{k: v for k, v in r.items() if k != "strategy"} for r in results]
