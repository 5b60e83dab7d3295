"""The ``distributed:`` config section: validation with one-line errors, refusals at config time and
before launch (exit 2), ``--print-config`` showing the DeepSpeed JSON, ``--nproc`` flags."""

from __future__ import annotations

import json

import pytest
import yaml
from _tiny_runs import run_config, save_tiny

from tunekit.cli import main
from tunekit.config import distributed_options, load_config
from tunekit.distributed.deepspeed_zero import generated_config


@pytest.fixture
def config_file(tmp_path):
    cfg = run_config(tmp_path, "causal_lm", "lora")
    cfg["model"]["name_or_path"] = str(tmp_path / "never-loaded")  # nothing below may load it
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.parametrize(("overrides", "needle"), [
    (["distributed.strategy=zero3"], "distributed.strategy"),
    (["distributed.timeout_s=0"], "distributed.timeout_s"),
    (["distributed.dp_replicate=0"], "distributed.dp_replicate"),
    (["distributed.dp_replicate=2", "distributed.strategy=ddp"], "dp_replicate=2 is for strategy fsdp"),
    (["distributed.tp_size=2"], "are for strategy tp or fsdp_tp, not 'none'"),
    (["distributed.strategy=tp"], "needs distributed.tp_size of 2 or more (got 1)"),
    (["distributed.strategy=tp", "distributed.tp_size=2", "distributed.cpu_offload=true"], "cpu_offload is not"),
    (["distributed.strategy=tp", "distributed.tp_size=2", "model.quantization.bits=4"], "quantization state"),
    (["distributed.strategy=tp", "distributed.tp_size=2", "adapter={method: prompt, num_virtual_tokens: 4}",
      "distributed.sequence_parallel=true"], "sequence_parallel supports adapter.method=lora only"),
    (["distributed.strategy=deepspeed", "model.quantization.bits=4"], "use strategy fsdp"),
    (["distributed.strategy=deepspeed", "adapter={method: prompt, num_virtual_tokens: 4}"], "adapter.method=prompt"),
    (["distributed.cpu_offload=true", "distributed.strategy=ddp"], "cpu_offload needs a sharded strategy"),
    (["distributed.strategy=fsdp", "train.fused_cross_entropy=true"], "fused_cross_entropy=true is not supported"),
    (["distributed.strategy=fsdp_tp", "distributed.tp_size=2", "train.fused_cross_entropy=true"],
     "fused_cross_entropy=true is not supported"),
    (["distributed.deepspeed_config=ds.json"], "is for strategy deepspeed"),
    # refused before any process starts
    (["distributed.strategy=fsdp", "--nproc", "1"], "this run has 1"),
    (["--nproc", "2"], "--nproc 2 needs a multi-process strategy"),
    (["distributed.strategy=fsdp", "distributed.dp_replicate=3", "--nproc", "2"], "does not divide the 2"),
    (["--nnodes", "2"], "go with --nproc N"),
])
def test_what_cannot_work_is_one_line_exit_2_before_anything_starts(config_file, capsys, overrides, needle):
    assert main(["finetune", str(config_file), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.fixture
def tiny_base_config_file(tmp_path):
    cfg = run_config(tmp_path, "causal_lm", "lora")  # its tiny Llama: 4 heads, 2 KV heads, MLP 64
    save_tiny("gpt2", tmp_path / "tiny-gpt2")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.parametrize(("overrides", "needle"), [
    (["distributed.strategy=tp", "distributed.tp_size=3", "--nproc", "3"],
     "tp_size=3 does not divide num_attention_heads=4 of this llama model"),
    (["distributed.strategy=tp", "distributed.tp_size=4", "--nproc", "4"],
     "tp_size=4 does not divide num_key_value_heads=2"),
    (["distributed.strategy=fsdp_tp", "distributed.tp_size=2", "--nproc", "3"], "tp_size=2 does not divide the 3"),
    (["distributed.strategy=tp", "distributed.tp_size=2", "distributed.sequence_parallel=true",
      "model.name_or_path={tmp}/tiny-gpt2", "--nproc", "2"], "sequence_parallel has no plan for model_type 'gpt2'"),
    (["distributed.strategy=tp", "distributed.tp_size=2", "distributed.sequence_parallel=true", "data.max_seq_len=47",
      "--nproc", "2"], "data.max_seq_len=47 is not a multiple of 2"),
])
def test_tensor_parallel_sizes_are_checked_before_any_process_starts(tiny_base_config_file, capsys, overrides,
                                                                      needle):
    # The base's sizes come from its config.json alone: no process starts, no weight loads.
    overrides = [o.replace("{tmp}", str(tiny_base_config_file.parent)) for o in overrides]
    assert main(["finetune", str(tiny_base_config_file), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_the_section_maps_onto_the_strategy_options(config_file):
    cfg = load_config(config_file, ["distributed.strategy=fsdp", "distributed.cpu_offload=true",
                                    "distributed.reshard_after_forward=false", "distributed.timeout_s=60",
                                    "train.mixed_precision=bf16", "train.batch_size=3"])
    options = distributed_options(cfg)
    assert (options.strategy, options.cpu_offload, options.reshard_after_forward, options.timeout_s) == \
        ("fsdp", True, False, 60.0)
    assert (options.mixed_precision, options.micro_batch_size, options.max_grad_norm) == ("bf16", 3, 1.0)


@pytest.mark.parametrize(("strategy", "nproc", "mesh"), [
    ("tp", 2, "dp_replicate=1, dp_shard=1, tp=2"),
    ("tp", 4, "dp_replicate=2, dp_shard=1, tp=2"),  # two TP groups, data-parallel replicas
    ("fsdp_tp", 4, "dp_replicate=1, dp_shard=2, tp=2"),
])
def test_print_config_shows_the_tensor_parallel_mesh(config_file, capsys, strategy, nproc, mesh):
    assert main(["finetune", str(config_file), f"distributed.strategy={strategy}", "distributed.tp_size=2",
                 "--nproc", str(nproc), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert f"# distributed.strategy: {strategy}, {nproc} processes: device mesh ({mesh})" in text.splitlines()
    assert load_config(yaml.safe_load(text)).distributed.tp_size == 2


def _printed_deepspeed_json(text: str) -> dict:
    comments = [line[2:] for line in text.splitlines() if line.startswith("# ")]
    start = next(i for i, line in enumerate(comments) if "the DeepSpeed config" in line) + 1  # after the mesh line
    return json.loads("\n".join(comments[start:]))


def test_print_config_shows_the_generated_deepspeed_json_and_stays_loadable(config_file, capsys, tmp_path):
    assert main(["finetune", str(config_file), "distributed.strategy=deepspeed", "distributed.cpu_offload=true",
                 "train.batch_size=4", "--nproc", "2", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert load_config(yaml.safe_load(text)).distributed.strategy == "deepspeed"  # comments do not break it
    shown = _printed_deepspeed_json(text)
    assert shown == generated_config(distributed_options(load_config(yaml.safe_load(text))), 2)
    assert shown["train_batch_size"] == 8 and shown["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    # A user's file replaces it (merged over the generated one), and is what --print-config shows then.
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}), encoding="utf-8")
    assert main(["finetune", str(config_file), "distributed.strategy=deepspeed", f"distributed.deepspeed_config={user}",
                 "--nproc", "2", "--print-config"]) == 0
    shown = _printed_deepspeed_json(capsys.readouterr().out)
    assert shown["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert shown["zero_optimization"]["stage"] == 3


def test_a_broken_deepspeed_file_is_refused_before_launch(config_file, capsys, tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_accumulation_steps": 4}), encoding="utf-8")
    assert main(["finetune", str(config_file), "distributed.strategy=deepspeed",
                 f"distributed.deepspeed_config={user}", "--nproc", "2"]) == 2
    assert "gradient_accumulation_steps=4, tunekit needs 1" in capsys.readouterr().err
