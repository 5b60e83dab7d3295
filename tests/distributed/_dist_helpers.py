"""What the multi-process tests run: tiny models, toy data, and tunekit's ``Trainer`` on a strategy.

``train`` runs the real training loop (``Trainer(..., strategy=...).fit()``) and also
returns what the tests compare: the per-step global losses it logged, the local target
counts of each rank, the prepared model's logits before any step, and its checkpoints.
``run_case`` is one rank's whole job (train, gathered adapter save, internals); the tests
compare rank 0's result with the same Trainer run by one process on the same global
batch (batch x accumulation x processes).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from _tiny import VOCAB, tiny_llama
from _train_data import ToyCls, ToyLM

from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, inject_adapters
from tunekit.distributed import DistributedOptions, make_strategy
from tunekit.train import TrainConfig, Trainer
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
    # The classifier evaluates (its new head lives in FSDP's root unit, left gathered by an eval forward).
    return ToyCls(n=rows, n_eval=5) if kind == "head" else ToyLM(n=rows, n_eval=0, max_len=10)


def train_config(steps: int, batch_size: int, accum: int, *, resume: str = "never", save_every: int | None = None,
                 gradient_checkpointing: bool = False, lr: float = 1e-2) -> TrainConfig:
    """A constant-lr AdamW run logging every step (a run stopped early and resumed matches an uninterrupted one)."""
    return TrainConfig(max_steps=steps, batch_size=batch_size, grad_accum_steps=accum, lr=lr, scheduler="constant",
                       log_every=1, save_every=save_every or steps, keep_last=None, resume=resume,
                       gradient_checkpointing=gradient_checkpointing)


def strategy_for(cfg: TrainConfig, strategy: str = "none", **distributed):
    """The strategy ``strategy`` built as ``finetune`` builds it, from a distributed section and ``cfg``."""
    section = SimpleNamespace(strategy=strategy, **distributed)
    return make_strategy(DistributedOptions.from_configs(section, cfg))


def local_targets(trainer: Trainer, steps: int) -> list[int]:
    """Targets this rank's micro-batches hold in each of the first ``steps`` steps."""
    data = trainer.data
    return [sum(target_count(data.collate([data.train[i] for i in m.rows]), data.task)
                for m in window if not m.placeholder) for window in trainer.windows(0)[:steps]]


def train(strategy, model, data, cfg: TrainConfig, out: str | Path) -> dict:
    """``Trainer.fit`` on ``strategy``; returns the global per-step losses, grad norms, this rank's target counts,
    the prepared model's logits on two rows before any step, and the last checkpoint."""
    trainer = Trainer(model, data, cfg, out, strategy=strategy)
    with torch.no_grad():  # train mode: bitsandbytes' CPU 4-bit path stays on its exact fp32 dequantize
        batch = strategy.to_device(data.collate([data.train[0], data.train[1]]))
        probe = trainer.wrapped(**batch).logits.cpu()
    result = trainer.fit()
    steps = [h for h in result.history if h["split"] == "train"]
    return {"losses": [h["loss"] for h in steps], "grad_norms": [h["grad_norm"] for h in steps],
            "local_targets": local_targets(trainer, cfg.max_steps), "probe_logits": probe,
            "checkpoint": str(result.checkpoint_dir)}


def single_process(kind: str, *, steps: int, batch_size: int, accum: int = 1, base_dir: str | None = None,
                   rows: int = 22, out: str | Path, save_every: int | None = None) -> tuple[Any, dict]:
    """The reference: one process on the same global batch; returns (strategy, results).

    N ranks of batch B x accum A run the forwards one process runs with batch B x accum N*A
    (the same rows in each forward, so even padding-dependent rounding agrees).
    """
    cfg = train_config(steps, batch_size, accum, save_every=save_every)
    strategy = strategy_for(cfg)
    result = train(strategy, build_model(kind, base_dir=base_dir), toy_data(kind, rows), cfg, out)
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
    """One rank's job: train ``case["steps"]`` steps (checkpointing), save the adapter; rank 0's result returns.

    ``case["resume_from"]``: a checkpoint to continue from; ``case["also_resume"]``: after the run, a
    second Trainer on the same strategy kind resumes this checkpoint (written by another run) to the end.
    """
    from tunekit.distributed.adapter_save import save_gathered_adapter

    cfg = train_config(case["steps"], case["batch_size"], case["accum"], resume=case.get("resume_from") or "never",
                       save_every=case.get("save_every"), gradient_checkpointing=case.get("gradient_checkpointing", False))
    distributed = {k: case[k] for k in ("cpu_offload", "reshard_after_forward", "deepspeed_config") if k in case}
    strategy = strategy_for(cfg, case["strategy"], **distributed)
    out = Path(case["out"])
    model = build_model(case["kind"], base_dir=case.get("base_dir"))
    result = train(strategy, model, toy_data(case["kind"], case.get("rows", 22)), cfg, out / "run")
    before = _ds_gather_bytes()
    save = save_gathered_adapter(strategy, out / "adapter")
    result["gathered_bytes"] = save.gathered_bytes
    result["adapter_bytes"] = save.adapter_bytes
    result["ds_logged_gather_bytes"] = _ds_gather_bytes() - before
    result["targets"] = gather_objects(result.pop("local_targets"))
    if case["strategy"] == "fsdp":
        result["local_sizes"] = gather_objects(local_sizes(strategy.model))
    result["refused"] = _save_of_shards_is_refused(strategy, out / "refused")
    if case.get("also_resume"):
        again = strategy_for(cfg, case["strategy"], **distributed)
        cfg = cfg.model_copy(update={"resume": case["also_resume"]})
        resumed = train(again, build_model(case["kind"]), toy_data(case["kind"], case.get("rows", 22)), cfg,
                        out / "resumed")
        save_gathered_adapter(again, out / "resumed-adapter")
        result["resumed_losses"] = resumed["losses"]
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


def train_then(fate: str, out: str, timeout_s: float = 300.0) -> None:
    """One FSDP step on 2 ranks, then rank 1 is SIGKILLed ("kill") or hangs ("hang") while rank 0 trains on."""
    import os
    import signal
    import time

    cfg = train_config(1, 2, 1)
    strategy = strategy_for(cfg, "fsdp", timeout_s=timeout_s)
    train(strategy, build_model("lora"), toy_data("lora"), cfg, out)
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


def rank0_filled(kind: str, cpu_offload: bool) -> dict:
    """Rank 0 builds ``kind`` for real, rank 1 on the meta device; FSDP2 shards both and fills them from rank 0.

    Returns, for each rank (a list in rank order): whether each gathered parameter and every buffer equals
    rank 0's tensor before sharding bit for bit, and how far its logits are from rank 0's unsharded model's.
    """
    from tunekit.distributed.rank0_fill import check_signatures, signatures

    strategy = make_strategy(DistributedOptions(strategy="fsdp", cpu_offload=cpu_offload))
    rank0 = strategy.runtime.rank == 0
    with contextlib.nullcontext() if rank0 else torch.device("meta"):
        model = build_model(kind)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    before = {}
    if rank0:
        with torch.no_grad():
            before = {"logits": model.eval()(input_ids=ids).logits,
                      **{n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}}
        model.train()
    reference = gather_objects(signatures(model))[0]
    if not rank0:
        check_signatures(model, reference)
    strategy.base_on_rank0_only = True
    strategy.prepare(model, lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1))
    expected = gather_objects({k: v for k, v in before.items()})[0]
    with torch.no_grad():  # gathered before the forward (after it the root unit holds plain gathered tensors)
        params = {n: p.full_tensor().cpu() for n, p in model.named_parameters()}
        logits = model.eval()(input_ids=ids).logits
    buffers = {n: b.cpu() for n, b in model.named_buffers()}
    mine = {"params_equal": all(params[n].equal(expected[n]) for n in params),
            "buffers_equal": bool(buffers) and all(buffers[n].equal(expected[n]) for n in buffers),
            "logits_gap": (logits.cpu() - expected["logits"]).abs().max().item(), "count": len(params) + len(buffers)}
    every_rank = gather_objects(mine)
    strategy.close()
    return every_rank
