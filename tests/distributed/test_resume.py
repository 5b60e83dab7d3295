"""Sharded checkpoints resume exactly: bit-identical on the same number of processes, within 1e-6 on another.

One uninterrupted FSDP run of 4 steps on 2 processes is the reference. A run stopped after
2 steps writes a trainable-only DCP checkpoint; it resumes on 2 processes (bit-identical),
on 1 (the plain single-process strategy reading the sharded checkpoint) and on 3; the global
batch (batch x accumulation x processes = 12) stays the same, so the data order re-splits
from the global position.
"""

from __future__ import annotations

import pytest
from _dist_helpers import build_model, run_case, toy_data, train
from _tolerances import DIST_RESUME_OTHER_WORLD
from safetensors.torch import load_file

from tunekit.distributed import DistributedOptions, make_strategy
from tunekit.distributed.adapter_save import save_gathered_adapter
from tunekit.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROWS, ACCUM = 50, 2


def _case(tmp_path, name: str, steps: int, batch_size: int, resume_from: str | None = None,
          strategy: str = "fsdp") -> dict:
    return {"strategy": strategy, "kind": "lora", "steps": steps, "batch_size": batch_size, "accum": ACCUM,
            "rows": ROWS, "out": str(tmp_path / name), "resume_from": resume_from}


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
    rest = launch(run_case, _case(tmp, "again", 2, 3, checkpoint), nproc=2, echo=False)
    assert rest["losses"] == whole["losses"][2:]
    ours, theirs = _adapter(tmp / "again"), _adapter(tmp / "whole")
    assert all(ours[k].equal(theirs[k]) for k in theirs)


def test_resume_on_one_process(runs, tmp_path):
    tmp, whole, checkpoint = runs
    strategy = make_strategy(DistributedOptions())  # this process, no process group
    result = train(strategy, build_model("lora"), toy_data("lora", ROWS), steps=2, batch_size=3, accum=ACCUM * 2,
                   resume_from=checkpoint)
    save_gathered_adapter(strategy, tmp_path / "adapter")
    _assert_close(result["losses"], whole["losses"][2:], _adapter(tmp_path), _adapter(tmp / "whole"))


def test_resume_on_three_processes(runs):
    tmp, whole, checkpoint = runs
    rest = launch(run_case, _case(tmp, "three", 2, 2, checkpoint), nproc=3, echo=False)
    _assert_close(rest["losses"], whole["losses"][2:], _adapter(tmp / "three"), _adapter(tmp / "whole"))


def _assert_close(losses, expected, adapter, expected_adapter):
    for ours, theirs in zip(losses, expected, strict=True):
        assert abs(ours - theirs) <= DIST_RESUME_OTHER_WORLD * abs(theirs)
    assert sorted(adapter) == sorted(expected_adapter)
    for key, value in expected_adapter.items():
        assert (adapter[key] - value).abs().max().item() <= DIST_RESUME_OTHER_WORLD, key


def test_deepspeed_resume_on_the_same_number_of_processes_is_bit_identical(tmp_path):
    whole = launch(run_case, _case(tmp_path, "whole", 4, 3, strategy="deepspeed"), nproc=2, echo=False)
    first = launch(run_case, _case(tmp_path, "first", 2, 3, strategy="deepspeed"), nproc=2, echo=False)
    rest = launch(run_case, _case(tmp_path, "again", 2, 3, first["checkpoint"], strategy="deepspeed"), nproc=2,
                  echo=False)
    assert rest["losses"] == whole["losses"][2:]
    ours, theirs = _adapter(tmp_path / "again"), _adapter(tmp_path / "whole")
    assert all(ours[k].equal(theirs[k]) for k in theirs)
