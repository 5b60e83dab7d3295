"""LoRA on 2 gloo processes under each strategy: the Trainer equals one process on the same global batch.

Each launch checks several things at once (a launch costs start-up time): the per-step
losses (ranks hold uneven numbers of targets), the gathered adapter file against the one
the single-process Trainer's run saves, the bytes the save gathered, the checkpoint's
contents (no frozen tensor), that saving un-gathered shards is refused, and for DeepSpeed
that its checkpoints and the single-process ones resume each other (2 -> 1 and 1 -> 2).
``tests/e2e/test_finetune_multiprocess.py`` runs the same strategies through
``tunekit finetune --nproc 2``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _dist_helpers import build_model, rank0_filled, replicas, run_case, single_process, strategy_for, toy_data, train, train_config
from _tolerances import DIST_LOSS_REL, DIST_RESUME_OTHER_WORLD, FP32_EXACT
from safetensors.torch import load_file

import tunekit
from tunekit.adapters import save_adapters
from tunekit.distributed.checkpoint import checkpoint_keys
from tunekit.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, BATCH, ACCUM = 3, 2, 2
CASES = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "fsdp_offload": {"strategy": "fsdp", "cpu_offload": True},
    # ZeRO-2-like (layers stay gathered to backward), each layer recomputed in backward
    "fsdp_zero2_checkpointing": {"strategy": "fsdp", "reshard_after_forward": False, "gradient_checkpointing": True},
    "deepspeed": {"strategy": "deepspeed"},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("reference")
    strategy, result = single_process("lora", steps=STEPS, batch_size=BATCH, accum=ACCUM * 2, out=folder / "run",
                                      save_every=1)
    save_adapters(strategy.model, folder / "adapter")  # the single-process format, written by the public API
    # Keys as the model's state dict spells them (what a checkpoint would hold)
    state = build_model("lora").state_dict(keep_vars=True)
    result["trainable"] = sorted(k for k, v in state.items() if v.requires_grad)
    result["frozen"] = sorted(k for k, v in state.items() if not v.requires_grad)
    assert len(result["frozen"]) > len(result["trainable"]) > 0
    result["adapter"] = folder / "adapter"
    result["step_1"] = str(folder / "run" / "checkpoints" / "step-1")
    return result


def _deepspeed_user_config(folder: Path) -> str:
    # A user's own DeepSpeed file: its comms logger counts the gathers (an oracle independent of
    # tunekit), and a persistence threshold of 0 shards even tiny adapters, so the save must gather them.
    path = folder / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0},
                                "comms_logger": {"enabled": True, "prof_all": True}}), encoding="utf-8")
    return str(path)


def _assert_same_adapter(folder: Path, reference: Path) -> None:
    ours, theirs = load_file(str(folder / "adapter_model.safetensors")), load_file(str(reference / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape
        assert (ours[key] - theirs[key]).abs().max().item() <= FP32_EXACT, key
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert config == json.loads((reference / "adapter_config.json").read_text(encoding="utf-8"))


def _assert_checkpoint_holds_trainable_only(checkpoint: Path, reference: dict) -> None:
    keys = checkpoint_keys(checkpoint / "state")  # DCP keys: "model.<state-dict key>" and "optim.<...>"
    model_keys = {k.removeprefix("model.") for k in keys if k.startswith("model.")}
    assert model_keys == set(reference["trainable"]), "exactly the trainable tensors, no frozen one"
    optimized = {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}
    assert optimized == set(reference["trainable"]), "optimizer state for the trainable tensors only"


def _assert_close(losses, expected, adapter: Path, expected_adapter: Path, tol: float) -> None:
    for ours, theirs in zip(losses, expected, strict=True):
        assert abs(ours - theirs) <= tol * abs(theirs)
    ours, theirs = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(expected_adapter / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert (ours[key] - value).abs().max().item() <= tol, key


@pytest.mark.parametrize("name", list(CASES))
def test_lora_on_two_processes_equals_one_process(name, reference, tmp_path):
    case = {**CASES[name], "kind": "lora", "steps": STEPS, "batch_size": BATCH, "accum": ACCUM, "out": str(tmp_path)}
    if case["strategy"] == "deepspeed":
        case.update(deepspeed_config=_deepspeed_user_config(tmp_path), save_every=1, also_resume=reference["step_1"])
    result = launch(run_case, case, nproc=2, echo=False)

    rank0, rank1 = result["targets"]
    assert all(a != b for a, b in zip(rank0, rank1)), "the data should give the ranks uneven target counts"
    for ours, theirs in zip(result["losses"], reference["losses"], strict=True):
        assert abs(ours - theirs) <= DIST_LOSS_REL * abs(theirs)
    _assert_same_adapter(tmp_path / "adapter", reference["adapter"])
    _assert_checkpoint_holds_trainable_only(Path(result["checkpoint"]), reference)

    adapter = result["adapter_bytes"]
    assert adapter == sum(t.numel() * t.element_size() for t in load_file(str(reference["adapter"] / "adapter_model.safetensors")).values())
    if case["strategy"] == "ddp":
        assert result["gathered_bytes"] == 0 and result["refused"] is None  # replicas: nothing to gather
    else:
        counted = result["ds_logged_gather_bytes"] if case["strategy"] == "deepspeed" else result["gathered_bytes"]
        assert 0 < counted <= 2 * adapter, (counted, adapter)
        assert "has shape" in result["refused"]  # a shard where the gathered tensor belongs
    if case["strategy"] == "deepspeed":
        _assert_deepspeed_checkpoints_resume_across_world_sizes(result, reference, tmp_path)


def _assert_deepspeed_checkpoints_resume_across_world_sizes(result: dict, reference: dict, tmp_path: Path) -> None:
    # 1 -> 2: inside the launch, DeepSpeed resumed the single-process run's step-1 checkpoint to the end.
    _assert_close(result["resumed_losses"], reference["losses"], tmp_path / "resumed-adapter",
                  reference["adapter"], DIST_RESUME_OTHER_WORLD)
    # 2 -> 1: one process resumes DeepSpeed's step-1 checkpoint to the end.
    step_1 = str(Path(result["checkpoint"]).parent / "step-1")
    cfg = train_config(STEPS, BATCH, ACCUM * 2, resume=step_1)
    strategy = strategy_for(cfg)
    resumed = train(strategy, build_model("lora"), toy_data("lora"), cfg, tmp_path / "one")
    save_adapters(strategy.model, tmp_path / "one-adapter")
    _assert_close(resumed["losses"], result["losses"], tmp_path / "one-adapter", tmp_path / "adapter",
                  DIST_RESUME_OTHER_WORLD)


def test_adapters_start_identical_on_every_rank_and_a_differing_base_is_refused():
    result = launch(replicas, "adapters", nproc=2, echo=False)
    assert result == {"before_differ": True, "equal_to_rank0": True, "checksums_agree": True}
    with pytest.raises(tunekit.DistributedError, match="differs between rank 0 and rank 1"):
        launch(replicas, "base", nproc=2, echo=False)


@pytest.mark.parametrize("kind,cpu_offload", [("lora", False), ("head", True), ("lora_bf16_base", False)])
def test_fsdp_fills_a_meta_device_rank_from_rank_0_bit_for_bit(kind, cpu_offload):
    """distributed.fill_from_rank0: rank 1 never loads the base; after sharding, every parameter (base, adapters,
    a new head) and buffer (RoPE's inv_freq) is rank 0's, and both ranks compute rank 0's unsharded logits."""
    for rank, result in enumerate(launch(rank0_filled, kind, cpu_offload, nproc=2, echo=False)):
        assert result["params_equal"] and result["buffers_equal"] and result["count"] > 20, rank
        assert result["logits_gap"] <= FP32_EXACT, rank
