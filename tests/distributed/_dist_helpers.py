"""What the multi-process tests run: tiny models, toy data, and the training loop the trainer will run.

``train`` drives the strategy interface exactly as the trainer will (phase 2): rank
windows from the global order, placeholders at weight 0, the global target count
all-reduced before backward, token-weighted micro-batch losses, one optimizer step.
``run_case`` is one rank's whole job (train, checkpoint, save); the tests compare
rank 0's result with the same loop run by one process on the same global batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _tiny import VOCAB, tiny_llama
from _train_data import ToyCls, ToyLM

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, inject_adapters
from tunekit.distributed import DistributedOptions, make_strategy
from tunekit.distributed.data import finite_loss_batch, rank_windows
from tunekit.train.loss import target_count

ADAPTERS = {
    "lora": lambda: LoRAConfig(rank=4, alpha=8, init="random"),
    "dora": lambda: LoRAConfig(rank=4, alpha=8, init="random", use_dora=True),
    "prefix": lambda: PrefixConfig(num_virtual_tokens=3),
    "bottleneck": lambda: BottleneckConfig(hidden_size=8, init="random"),
    "head": lambda: LoRAConfig(rank=4, alpha=8, init="random", modules_to_save=["score"]),
    "qlora": lambda: LoRAConfig(rank=4, alpha=8, init="random", target_modules="all-linear"),
    "lora_bf16_base": lambda: LoRAConfig(rank=4, alpha=8, init="random"),
}
QLORA_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}  # bitsandbytes' CPU block is 64


def save_qlora_base(folder: Path) -> Path:
    torch.manual_seed(0)
    tiny_llama(**QLORA_SHAPE).save_pretrained(folder)
    return folder


def build_model(kind: str, *, base_dir: str | None = None, adapter_seed: int = 0, base_seed: int = 0):
    """A tiny Llama (a classifier for "head", a 4-bit one from ``base_dir`` for "qlora") with adapter ``kind``."""
    torch.manual_seed(base_seed)
    if kind == "qlora":
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    elif kind == "head":
        from transformers import LlamaConfig, LlamaForSequenceClassification

        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, num_labels=3))
    else:
        model = tiny_llama()
    if kind == "lora_bf16_base":
        model.to(torch.bfloat16)  # the adapters beside it are created in fp32
    torch.manual_seed(adapter_seed)
    inject_adapters(model, ADAPTERS[kind]())
    return model.train()


def toy_data(kind: str, rows: int = 22):
    """Rows of varied length and prompt masking: ranks get uneven numbers of targets."""
    return ToyCls(n=rows, n_eval=0) if kind == "head" else ToyLM(n=rows, n_eval=0, max_len=10)


def train(strategy, model, data, *, steps: int, batch_size: int, accum: int, lr: float = 1e-2,
          max_grad_norm: float | None = 1.0, resume_from: str | None = None) -> dict:
    """The trainer's step loop on ``strategy``; returns per-step global losses, grad norms and local target counts.

    ``resume_from``: a sharded checkpoint folder; training goes on from its data position.
    Also returns ``probe_logits``: the prepared model's logits on the first two rows, before any step.
    """
    from tunekit.distributed.checkpoint import load_sharded_checkpoint
    from tunekit.distributed.data import resume_step

    model, optimizer = strategy.prepare(
        model, lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - 0.05 * s)
    with torch.no_grad():  # train mode: bitsandbytes' CPU 4-bit path stays on its exact fp32 dequantize
        probe = model(**strategy.to_device(data.collate([data.train[0], data.train[1]]))).logits.cpu()
    global_batch = batch_size * accum * strategy.dp_size
    start = 0
    if resume_from is not None:
        progress = load_sharded_checkpoint(resume_from, strategy=strategy, scheduler=scheduler)
        start = resume_step(progress["samples_in_epoch"], global_batch)
    windows = rank_windows(data.train_order(0, 0), batch_size=batch_size, grad_accum_steps=accum,
                           dp_size=strategy.dp_size, dp_rank=strategy.dp_rank, start_step=start)
    out = {"losses": [], "grad_norms": [], "local_targets": []}
    for window in windows[:steps]:
        batches, counts = [], []
        for micro in window:
            batch = data.collate([data.train[i] for i in micro.rows])
            n = 0 if micro.placeholder else target_count(batch, data.task)
            batches.append(strategy.to_device(batch if n else finite_loss_batch(batch, data.task)))
            counts.append(n)
        total = strategy.all_reduce_sums({"targets": sum(counts)})["targets"]
        loss_sum = 0.0
        for i, (batch, n) in enumerate(zip(batches, counts)):
            with strategy.sync_gradients(i == len(batches) - 1), strategy.autocast():
                loss = model(**batch).loss
            strategy.backward(loss, n / total)
            loss_sum += float(loss.detach()) * n
        outcome = strategy.optimizer_step(max_grad_norm)
        if outcome.stepped:
            scheduler.step()
        strategy.zero_grad()
        sums = strategy.all_reduce_sums({"loss_sum": loss_sum, "targets": sum(counts)})
        out["losses"].append(sums["loss_sum"] / sums["targets"])
        out["grad_norms"].append(outcome.grad_norm)
        out["local_targets"].append(sum(counts))
    out["scheduler"] = scheduler
    out["probe_logits"] = probe
    out["samples_in_epoch"] = (start + len(out["losses"])) * global_batch
    return out


def single_process(kind: str, *, steps: int, batch_size: int, accum: int = 1, base_dir: str | None = None,
                   rows: int = 22, **train_kw) -> tuple[Any, dict]:
    """The reference: one process on the same global batch; returns (strategy, results).

    N ranks of batch B x accum A run the forwards one process runs with batch B x accum N*A
    (the same rows in each forward, so even padding-dependent rounding agrees).
    """
    strategy = make_strategy(DistributedOptions())
    result = train(strategy, build_model(kind, base_dir=base_dir), toy_data(kind, rows), steps=steps,
                   batch_size=batch_size, accum=accum, **train_kw)
    return strategy, result


def gather_objects(value: Any) -> list[Any]:
    """``value`` from every rank (rank order)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def local_sizes(model) -> dict[str, tuple[int, tuple, str, bool]]:
    """Parameter name -> (local elements, global shape, dtype, trainable) on this rank."""
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        out[name] = (local.numel(), tuple(p.shape), str(p.dtype), p.requires_grad)
    return out


def run_case(case: dict) -> dict:
    """One rank's job: train ``case["steps"]`` steps, save the adapter, write a checkpoint; rank 0's result returns."""
    from tunekit.distributed.adapter_save import save_gathered_adapter
    from tunekit.distributed.checkpoint import save_sharded_checkpoint

    options = DistributedOptions(strategy=case["strategy"], cpu_offload=case.get("cpu_offload", False),
                                 micro_batch_size=case["batch_size"], deepspeed_config=case.get("ds_config"),
                                 gradient_checkpointing=case.get("gradient_checkpointing", False),
                                 reshard_after_forward=case.get("reshard_after_forward", True))
    strategy = make_strategy(options)
    out = Path(case["out"])
    model = build_model(case["kind"], base_dir=case.get("base_dir"))
    result = train(strategy, model, toy_data(case["kind"], case.get("rows", 22)), steps=case["steps"],
                   batch_size=case["batch_size"], accum=case["accum"], resume_from=case.get("resume_from"))
    before = _ds_gather_bytes()
    save = save_gathered_adapter(strategy, out / "adapter")
    result["gathered_bytes"] = save.gathered_bytes
    result["adapter_bytes"] = save.adapter_bytes
    result["ds_logged_gather_bytes"] = _ds_gather_bytes() - before
    result["checkpoint"] = str(save_sharded_checkpoint(
        out / "checkpoints", case["steps"], strategy=strategy, scheduler=result.pop("scheduler"),
        progress={"samples_in_epoch": result.pop("samples_in_epoch")}, config={}, keep_last=None))
    result["targets"] = gather_objects(result.pop("local_targets"))
    if case["strategy"] == "fsdp":
        result["local_sizes"] = gather_objects(local_sizes(strategy.model))
    result["refused"] = _save_of_shards_is_refused(strategy, out / "refused")
    strategy.close()
    return result


def _ds_gather_bytes() -> int:
    """All-gathered bytes DeepSpeed's own comms logger recorded so far (0 without DeepSpeed or the logger)."""
    import sys

    comm = sys.modules.get("deepspeed.comm.comm")
    logger = getattr(comm, "comms_logger", None)
    if logger is None:
        return 0
    return sum(size * record[0] for name, sizes in logger.comms_dict.items() if "all_gather" in name
               for size, record in sizes.items())


def _save_of_shards_is_refused(strategy, folder: Path) -> str | None:
    """Save the adapter from this rank's *local* tensors (the classic ZeRO-3 bug): the error message, or None."""
    from tunekit.distributed.adapter_save import save_gathered_adapter
    from tunekit.distributed.strategy import Gathered

    def local_view():
        tensors = {}
        for name, p in strategy.model.named_parameters():
            if p.requires_grad:
                local = p.to_local() if hasattr(p, "to_local") else p.detach()
                tensors[name] = local.detach().cpu().clone()
        return Gathered(tensors)

    strategy.gather_trainable = local_view
    try:
        save_gathered_adapter(strategy, folder)
    except ValueError as err:
        return None if folder.exists() else str(err)
    finally:
        del strategy.gather_trainable
    return None


# ---------------------------------------------------------------- workers for the launch tests

def greet(prefix: str) -> str:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    print(f"{prefix} from rank {rank}")
    dist.barrier()
    return f"{prefix} {rank} of {dist.get_world_size()}"


def fail_on_rank_one() -> None:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise ValueError("data.train_files is empty on this node")
    dist.barrier()  # rank 0 waits here for a rank that is gone: "connection closed", a consequence


def train_then(fate: str, timeout_s: float = 300.0) -> None:
    """One FSDP step on 2 ranks, then rank 1 is SIGKILLed ("kill") or hangs ("hang") while rank 0 trains on."""
    import os
    import signal
    import time

    strategy = make_strategy(DistributedOptions(strategy="fsdp", timeout_s=timeout_s))
    model = build_model("lora")
    data = toy_data("lora")
    train(strategy, model, data, steps=1, batch_size=2, accum=1)
    if strategy.runtime.rank == 1:
        if fate == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    strategy.barrier()


def cli_main(argv: list[str]) -> int:
    """A CLI-shaped entry point: rank 1 prints a one-line error and returns 2, like tunekit's CLI."""
    import sys

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        print(f"error: {argv[0]} is not a config file", file=sys.stderr)
        return 2
    dist.barrier()
    return 0


def sleep_forever() -> None:
    import time

    time.sleep(3600)


def replicas(mode: str) -> dict:
    """Ranks build adapters from different seeds ("adapters") or different bases ("base"), then prepare for FSDP."""
    strategy = make_strategy(DistributedOptions(strategy="fsdp"))
    rank = strategy.runtime.rank
    model = build_model("lora", adapter_seed=rank, base_seed=rank if mode == "base" else 0)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = gather_objects(trainable)
    strategy.prepare(model, lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1))
    # The shards hold rank 0's adapters on every rank: gathered, they are rank 0's tensors exactly.
    gathered = strategy.gather_trainable().tensors
    checksums = gather_objects(parameter_checksums_of(gathered))
    strategy.close()
    return {"before_differ": any(not before[0][n].equal(before[1][n]) for n in before[0]),
            "equal_to_rank0": all(gathered[n].equal(before[0][n]) for n in gathered),
            "checksums_agree": checksums[0].equal(checksums[1])}


def parameter_checksums_of(tensors: dict) -> torch.Tensor:
    return torch.stack([torch.stack([t.double().sum(), (t.double() ** 2).sum()]) for _, t in sorted(tensors.items())])


def strategy_none_under_a_launcher() -> None:
    make_strategy(DistributedOptions(strategy="none"))
