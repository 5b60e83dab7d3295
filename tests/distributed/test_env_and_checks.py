"""The job environment (torchrun, SLURM), the mesh, the options, and the refusals before launch."""

from __future__ import annotations

import pytest

from tunekit.distributed.checks import check_before_launch
from tunekit.distributed.env import DistEnv, first_slurm_host, read_env
from tunekit.distributed.mesh import MeshShape, mesh_shape
from tunekit.distributed.options import DistributedOptions

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}


def test_torchrun_variables():
    assert read_env(TORCHRUN) == DistEnv(3, 4, 1, 2, "10.0.0.1", 29400, "torchrun")
    assert read_env(TORCHRUN).num_nodes == 2
    assert read_env({}) == DistEnv()
    with pytest.raises(ValueError, match="RANK"):
        read_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='x'"):
        read_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_slurm_variables():
    env = read_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
                    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"})
    assert env == DistEnv(5, 8, 1, 4, "gpu07", 29500 + 123456 % 10000, "slurm")
    assert read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv()  # an salloc shell: one process
    assert first_slurm_host("a1,b[2-3]") == "a1" and first_slurm_host("n[3,5-7]") == "n3"


def test_mesh_shapes():
    assert mesh_shape(DistributedOptions(strategy="ddp"), 4) == MeshShape(4, 1)
    assert mesh_shape(DistributedOptions(strategy="fsdp"), 4) == MeshShape(1, 4)
    assert mesh_shape(DistributedOptions(strategy="fsdp", dp_replicate=2), 4).dp_size == 4
    with pytest.raises(ValueError, match="does not divide"):
        mesh_shape(DistributedOptions(strategy="fsdp", dp_replicate=3), 4)
    with pytest.raises(ValueError, match="is for strategy fsdp"):
        mesh_shape(DistributedOptions(strategy="ddp", dp_replicate=2), 4)


def test_options_validate_and_map_from_config_sections():
    with pytest.raises(ValueError, match="choose one of none, ddp, fsdp, deepspeed, tp, fsdp_tp"):
        DistributedOptions(strategy="zero3")
    with pytest.raises(ValueError, match="timeout_s"):
        DistributedOptions(timeout_s=0)

    class Section:
        strategy, cpu_offload, tp_size = "fsdp", True, 1

    class Train:
        mixed_precision, gradient_checkpointing, batch_size, max_grad_norm = "bf16", True, 4, None

    options = DistributedOptions.from_configs(Section(), Train())
    assert (options.strategy, options.cpu_offload, options.micro_batch_size, options.max_grad_norm) == ("fsdp", True, 4, None)


@pytest.mark.parametrize(("options", "kwargs", "message"), [
    (DistributedOptions(strategy="deepspeed"), {"nproc": 1}, "shards the model over processes but this run has 1"),
    (DistributedOptions(), {"nproc": 2}, "--nproc 2 needs a multi-process strategy"),
    (DistributedOptions(), {"environ": {"RANK": "1", "WORLD_SIZE": "2"}}, "rank 1 of 2 .* distributed.strategy is none"),
    (DistributedOptions(strategy="deepspeed"), {"nproc": 2, "quantization": "4bit"}, "use strategy fsdp"),
    (DistributedOptions(strategy="deepspeed"), {"nproc": 2, "adapter_method": "prompt"}, "adapter.method=prompt"),
    (DistributedOptions(strategy="fsdp"), {"nproc": 2, "quantization": "8bit"}, "only 4-bit bases"),
    (DistributedOptions(strategy="fsdp", mixed_precision="fp16"), {"nproc": 2}, "use bf16"),
    (DistributedOptions(strategy="ddp", deepspeed_config="ds.json"), {"nproc": 2}, "is for strategy deepspeed"),
    (DistributedOptions(cpu_offload=True), {"nproc": 1}, "cpu_offload needs a sharded strategy"),
    (DistributedOptions(strategy="ddp", cpu_offload=True), {"nproc": 2}, "cpu_offload needs a sharded strategy"),
    (DistributedOptions(strategy="deepspeed", reshard_after_forward=False), {"nproc": 2}, "is for strategy fsdp"),
    (DistributedOptions(strategy="ddp"), {"nproc": 1}, "replicates the model over processes but this run has 1"),
    (DistributedOptions(strategy="ddp"), {"nproc": 2, "fused_cross_entropy": True}, "fused_cross_entropy=true is not"),
])
def test_refusals_before_any_process_starts(options, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        check_before_launch(options, **{"environ": {}, **kwargs})
    assert "\n" not in str(info.value)


def test_deepspeed_missing_is_refused_with_the_install_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'tunekit\[deepspeed\]'"):
        check_before_launch(DistributedOptions(strategy="deepspeed"), nproc=2, environ={})


def test_more_processes_than_gpus_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="--nproc 4 exceeds the 2 GPUs"):
        check_before_launch(DistributedOptions(strategy="ddp"), nproc=4, environ={})


def test_runnable_jobs_pass():
    check_before_launch(DistributedOptions(strategy="fsdp"), nproc=2, quantization="4bit", environ={})
    check_before_launch(DistributedOptions(strategy="ddp"), environ=TORCHRUN)
    check_before_launch(DistributedOptions(), environ={})
