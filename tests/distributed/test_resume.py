"""Sharded checkpoints resume exactly: bit-identical on the same number of processes, within 1e-6 on another.

One uninterrupted FSDP Trainer run of 4 steps on 2 processes is the reference. A run stopped
after 2 steps writes a trainable-only DCP checkpoint; it resumes on 2 processes (bit-identical),
on 1 (the single-process Trainer reading the sharded checkpoint) and on 3; the global batch
(batch x accumulation x processes = 12) stays the same, so the data order re-splits from the
global position. (DeepSpeed's checkpoints resume across world sizes in test_strategies.)
"""

from __future__ import annotations

import pytest
from _dist_helpers import build_model, run_case, strategy_for, toy_data, train, train_config
from _tolerances import DIST_RESUME_OTHER_WORLD
from safetensors.torch import load_file

from tunekit.distributed.adapter_save import save_gathered_adapter
from tunekit.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROWS, ACCUM = 50, 2


def _case(tmp_path, name: str, steps: int, batch_size: int, resume_from: str | None = None) -> dict:
    return {"strategy": "fsdp", "kind": "lora", "steps": steps, "batch_size": batch_size, "accum": ACCUM,
            "rows": ROWS, "out": str(tmp_path / name), "resume_from": resume_from, "save_every": 2}


def _adapter(folder) -> dict:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    whole = launch(run_case, _case(tmp, "whole", 4, 3), nproc=2, echo=False)
    first = launch(run_case, _case(tmp, "first", 2, 3), nproc=2, echo=False)
    return tmp, whole, first["checkpoint"]


def test_resume_on_the_same_number_of_processes_is_bit_identical(runs):
    tmp, whole, checkpoint = runs
    rest = launch(run_case, _case(tmp, "again", 4, 3, checkpoint), nproc=2, echo=False)
    assert rest["losses"] == whole["losses"]  # steps 1-2 from the checkpoint's history, 3-4 trained again
    ours, theirs = _adapter(tmp / "again"), _adapter(tmp / "whole")
    assert all(ours[k].equal(theirs[k]) for k in theirs)


def test_resume_on_one_process(runs, tmp_path):
    tmp, whole, checkpoint = runs
    cfg = train_config(4, 3, ACCUM * 2, resume=checkpoint)
    strategy = strategy_for(cfg)  # this process, no process group
    result = train(strategy, build_model("lora"), toy_data("lora", ROWS), cfg, tmp_path / "run")
    save_gathered_adapter(strategy, tmp_path / "adapter")
    _assert_close(result["losses"], whole["losses"], _adapter(tmp_path), _adapter(tmp / "whole"))


def test_resume_on_three_processes(runs):
    tmp, whole, checkpoint = runs
    rest = launch(run_case, _case(tmp, "three", 4, 2, checkpoint), nproc=3, echo=False)
    _assert_close(rest["losses"], whole["losses"], _adapter(tmp / "three"), _adapter(tmp / "whole"))


def _assert_close(losses, expected, adapter, expected_adapter):
    for ours, theirs in zip(losses, expected, strict=True):
        assert abs(ours - theirs) <= DIST_RESUME_OTHER_WORLD * abs(theirs)
    assert sorted(adapter) == sorted(expected_adapter)
    for key, value in expected_adapter.items():
        assert (adapter[key] - value).abs().max().item() <= DIST_RESUME_OTHER_WORLD, key
