"""What the tensor-parallel tests run on each rank, and the single-process references.

``run_tp`` trains one (architecture, method) after another on the same process group with
the trainer's loop (``_dist_helpers.train``), recording per step the gradients as
``optimizer_step`` sees them after its explicit partial-sum reduction (gathered whole),
the collectives that step issued, and this rank's local bytes; then it saves the adapter
(gathered) and, on request, a sharded checkpoint. ``reference`` runs the same loop on one
process and records the gradients at the same point (before clipping).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from _dist_helpers import gather_objects, toy_data, train
from _tiny import VOCAB, tiny_gpt2, tiny_llama
from torch.distributed.tensor.debug import CommDebugMode

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, inject_adapters
from tunekit.distributed import DistributedOptions, make_strategy

PROJECTIONS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
COLWISE = {"llama": 5, "qwen2": 5, "gpt2": 2}
"""Colwise plan layers per block (their input gradients are all-reduced in backward)."""
ROWWISE = {"llama": 2, "qwen2": 2, "gpt2": 2}
"""Rowwise plan layers per block (their outputs are all-reduced in forward)."""
LAYERS = 2
STEPS, BATCH, ACCUM, LR = 3, 2, 2, 1e-3


def base_model(arch: str) -> torch.nn.Module:
    """The tiny base of ``arch`` (seeded; no dropout, so one process and TP see the same function)."""
    torch.manual_seed(0)
    if arch == "llama":
        return tiny_llama()
    if arch == "gpt2":
        return tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0))


def adapter_config(arch: str, method: str):
    if method in ("lora", "dora"):
        return LoRAConfig(rank=4, alpha=8, init="random", target_modules=PROJECTIONS[arch], use_dora=method == "dora")
    if method == "prefix":
        return PrefixConfig(num_virtual_tokens=3)
    return BottleneckConfig(hidden_size=8, init="random")


def build(arch: str, method: str) -> torch.nn.Module:
    model = base_model(arch)
    torch.manual_seed(1)
    inject_adapters(model, adapter_config(arch, method))
    return model.train()


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def rank_bytes(model: torch.nn.Module, optimizer) -> dict[str, int]:
    """This rank's local bytes by kind (the estimator's ``RankBytes`` fields)."""
    params = list(model.parameters())
    return {
        "frozen": sum(_local_bytes(p) for p in params if not p.requires_grad)
        + sum(_local_bytes(b) for b in model.buffers()),
        "trainable": sum(_local_bytes(p) for p in params if p.requires_grad),
        "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
    }


def _record_steps(strategy, record: dict) -> None:
    """Wrap ``strategy.optimizer_step``: its collectives, the gradients the optimizer is given, this rank's bytes.

    The gradients are copied (locally) inside the torch optimizer's step, i.e. after the
    explicit reduction and clipping, and gathered whole after the counted block.
    """
    from tunekit.distributed.tp_grads import _is_partial

    step, seen = strategy.optimizer_step, {}

    def counted_step(max_grad_norm):
        optimizer, params = strategy.optimizer, dict(strategy.model.named_parameters())
        torch_step = optimizer.step

        def recording_step(*args, **kwargs):
            seen.update({n: p.grad.detach().clone() for n, p in params.items() if p.requires_grad})
            with CommDebugMode() as inner:
                out = torch_step(*args, **kwargs)
            record["optimizer_collectives"].append(inner.get_total_counts())
            return out

        record["partial_factors"].append(sum(_is_partial(p.grad) for p in params.values() if p.requires_grad))
        optimizer.step = recording_step
        try:
            with CommDebugMode() as comm:
                outcome = step(max_grad_norm)
        finally:
            optimizer.step = torch_step
        record["step_collectives"].append(comm.get_total_counts() - record["optimizer_collectives"][-1])
        whole = getattr(strategy, "canonical", lambda _name, grad: grad)  # one process: already whole
        record["grads"].append({n: whole(n, g).cpu().clone() for n, g in seen.items()})
        record["bytes"] = rank_bytes(strategy.model, strategy.optimizer)
        return outcome

    strategy.optimizer_step = counted_step


def run_one(arch: str, method: str, options: DistributedOptions, out: Path, checkpoint: bool = False):
    """Train ``arch`` + ``method`` under ``options`` on this rank; returns (strategy, record)."""
    from tunekit.distributed.adapter_save import save_gathered_adapter
    from tunekit.distributed.checkpoint import save_sharded_checkpoint

    strategy = make_strategy(options)
    record = {"grads": [], "partial_factors": [], "step_collectives": [], "optimizer_collectives": []}
    _record_steps(strategy, record)
    result = train(strategy, build(arch, method), toy_data("lora"), steps=STEPS, batch_size=BATCH,
                   accum=ACCUM, lr=LR)
    record["losses"] = result["losses"]
    record["bytes"] = gather_objects(record["bytes"])
    save_gathered_adapter(strategy, out / f"{arch}-{method}")
    if checkpoint:
        record["checkpoint"] = str(save_sharded_checkpoint(
            out / f"{arch}-{method}-checkpoints", STEPS, strategy=strategy, scheduler=result["scheduler"],
            progress={"samples_in_epoch": result["samples_in_epoch"]}, config={}, keep_last=None))
    return strategy, record


def run_tp(case: dict) -> dict:
    """Every (arch, method) of ``case["runs"]`` under ``case["options"]``, then the collective counts per arch."""
    options = DistributedOptions(**case["options"])
    out, results, strategy = Path(case["out"]), {}, None
    for arch, method in case["runs"]:
        strategy, results[f"{arch}-{method}"] = run_one(arch, method, options, out, checkpoint=arch == "gpt2")
    for arch in case.get("count", ()):
        results[f"{arch}-comms"] = {kind: count_collectives(arch, kind, strategy.runtime.tp_mesh)
                                    for kind in ("base", "lora", "dora")}
    if case.get("encoders"):
        results["encoders"] = encoder_grads(options)
    make_strategy(options).close()  # leaves the process group (a strategy object holds nothing else)
    return results


def _comm_counts(comm: CommDebugMode) -> dict[str, int]:
    return {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}


def count_collectives(arch: str, kind: str, mesh) -> dict[str, dict[str, int]]:
    """Collectives of one forward and one backward of ``arch`` split over ``mesh``: the plain base, or with adapters.

    The input embeddings require grad in every case, so the backward runs through every
    layer (the plain base trains nothing of its own).
    """
    from tunekit.distributed.tensor_parallel import parallelize

    model = base_model(arch) if kind == "base" else build(arch, kind)
    if kind == "base":
        model.requires_grad_(False)
    parallelize(model, mesh)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    with CommDebugMode() as forward:
        loss = model(inputs_embeds=embeds, labels=ids).loss
    with CommDebugMode() as backward:
        loss.backward()
    return {"forward": _comm_counts(forward), "backward": _comm_counts(backward)}


def reference(arch: str, method: str, out: Path, dp: int = 1) -> dict:
    """One process on the global batch of ``dp`` data-parallel ranks: losses, gradients before clipping, the adapter."""
    from tunekit.adapters import save_adapters

    strategy = make_strategy(DistributedOptions())
    record = {"grads": [], "partial_factors": [], "step_collectives": [], "optimizer_collectives": []}
    _record_steps(strategy, record)
    result = train(strategy, build(arch, method), toy_data("lora"), steps=STEPS, batch_size=BATCH,
                   accum=ACCUM * dp, lr=LR)
    record["losses"] = result["losses"]
    record["model"] = strategy.model
    save_adapters(strategy.model, out / f"{arch}-{method}")
    return record


# ---------------------------------------------------------------- BERT / T5: one forward and backward

def encoder_model(arch: str) -> torch.nn.Module:
    """A tiny BERT classifier or T5 with LoRA on every linear layer (the plan's, the pooler's, the classifier's)."""
    from _tiny import tiny_bert, tiny_t5

    torch.manual_seed(0)
    model = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if arch == "bert" else tiny_t5(
        dropout_rate=0.0)
    torch.manual_seed(1)
    inject_adapters(model, LoRAConfig(rank=4, alpha=8, init="random", target_modules="all-linear"))
    return model.train()


def encoder_batch(arch: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    if arch == "bert":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2])}
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, VOCAB, (2, 5), generator=g)}


def loss_and_grads(model: torch.nn.Module, arch: str, strategy=None) -> dict:
    """The loss of one batch and every trainable gradient, whole (after the explicit partial-sum reduction)."""
    loss = model(**encoder_batch(arch)).loss
    loss.backward()
    if strategy is not None:
        strategy.reduce_gradients()
    whole = getattr(strategy, "canonical", lambda _name, grad: grad)
    return {"loss": float(loss), "grads": {n: whole(n, p.grad).cpu().clone() for n, p in model.named_parameters()
                                          if p.requires_grad}}


def encoder_grads(options: DistributedOptions) -> dict:
    """``loss_and_grads`` of BERT and T5 split by ``options``' strategy."""
    out = {}
    for arch in ("bert", "t5"):
        strategy = make_strategy(options)
        model, _ = strategy.prepare(encoder_model(arch), lambda m: torch.optim.SGD(
            [p for p in m.parameters() if p.requires_grad], lr=0.0))
        out[arch] = loss_and_grads(model, arch, strategy)
    return out


# ---------------------------------------------------------------- resume across mesh shapes

RESUME_ROWS = 50
"""Rows of the resume runs' data (4 steps of a global batch of 8 without wrapping)."""


def train_llama(options: dict, steps: int, accum: int, out: str, resume_from: str | None = None,
                checkpoint: bool = False) -> dict:
    """One rank: LoRA Llama trained ``steps`` steps under ``options`` (from ``resume_from``), adapter saved to ``out``."""
    from tunekit.distributed.adapter_save import save_gathered_adapter
    from tunekit.distributed.checkpoint import save_sharded_checkpoint

    strategy = make_strategy(DistributedOptions(**options))
    result = train(strategy, build("llama", "lora"), toy_data("lora", RESUME_ROWS), steps=steps, batch_size=BATCH,
                   accum=accum, lr=LR, resume_from=resume_from)
    save_gathered_adapter(strategy, Path(out) / "adapter")
    record = {"losses": result["losses"]}
    if checkpoint:
        record["checkpoint"] = str(save_sharded_checkpoint(
            Path(out) / "checkpoints", steps, strategy=strategy, scheduler=result["scheduler"],
            progress={"samples_in_epoch": result["samples_in_epoch"]}, config={}, keep_last=None))
    return record


def train_jobs(jobs: list[dict]) -> list[dict]:
    """``train_llama`` for each job in turn, on one process group (a launch costs seconds of start-up)."""
    results = [train_llama(**job) for job in jobs]
    make_strategy(DistributedOptions(**jobs[-1]["options"])).close()
    return results
