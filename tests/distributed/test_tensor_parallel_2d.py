"""The 2-D mesh (``fsdp_tp``: FSDP2 over 2 data-parallel ranks on top of TP 2, 4 gloo processes) equals one process,
and its trainable-only DCP checkpoint resumes on 1 x 2 (``tp``), 2 x 1 (``fsdp``) and 1 x 1 to the same result.

One 4-process launch trains LoRA Llama and GPT-2 (packed q/k/v) step by step against one process
on the same global batch, and a LoRA Llama run with a checkpoint every 2 steps; one 2-process
launch resumes that step-2 checkpoint under ``tp`` and under ``fsdp``; one process resumes it here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _tolerances import DIST_RESUME_OTHER_WORLD, FP32_EXACT, TP_EXACT, max_abs_diff
from _tp_helpers import BATCH, build, reference, run_tp, train_jobs, train_llama
from safetensors.torch import load_file

from tunekit.distributed.checkpoint import checkpoint_keys
from tunekit.distributed.launch import launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

RUNS = [("llama", "lora"), ("gpt2", "lora")]
FSDP_TP = {"strategy": "fsdp_tp", "tp_size": 2}
# global batch 8 on every mesh: batch 2 x accumulation x data-parallel size
MESHES = {"2x2": (FSDP_TP, 2), "1x2": ({"strategy": "tp", "tp_size": 2}, 4), "2x1": ({"strategy": "fsdp"}, 2),
          "1x1": ({"strategy": "none"}, 4)}


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("2x2")
    distributed, accum = MESHES["2x2"]
    job = {"distributed": distributed, "batch_size": BATCH, "accum": accum, "out": str(out / "resume-2x2")}
    return launch(run_tp, {"out": str(out), "distributed": FSDP_TP, "runs": RUNS, "jobs": [job]}, nproc=4,
                  echo=False), out


@pytest.mark.parametrize(("arch", "method"), RUNS, ids=[a for a, _ in RUNS])
def test_2x2_equals_one_process_step_by_step(grid, tmp_path, arch, method):
    (results, out), ours = grid, grid[0][f"{arch}-{method}"]
    theirs = reference(arch, method, tmp_path, dp=2)
    assert all(abs(a - b) <= TP_EXACT * abs(b) for a, b in zip(ours["losses"], theirs["losses"], strict=True))
    for got, want in zip(ours["grads"], theirs["grads"], strict=True):
        assert sorted(got) == sorted(want)
        assert all(max_abs_diff(got[n], want[n]) <= TP_EXACT for n in want)
    a, b = load_file(str(out / f"{arch}-{method}" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / f"{arch}-{method}" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(max_abs_diff(a[k], b[k]) <= FP32_EXACT for k in b)
    # Every rank of the 2 x 2 mesh holds a quarter of each split weight and half of the rest (FSDP).
    coordinates = ours["coordinates"]
    assert sorted((c["dp_shard"], c["tp"]) for c in coordinates) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["frozen"] < theirs["bytes"]["frozen"] / 2 for r in ours["bytes"])
    assert all(r["trainable"] < theirs["bytes"]["trainable"] / 2 for r in ours["bytes"])


def _adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_a_2x2_checkpoint_resumes_on_1x2_2x1_and_1x1_to_the_same_result(grid, tmp_path):
    results, out = grid
    uninterrupted = results["job-0"]
    step_2 = Path(uninterrupted["checkpoint"]).parent / "step-2"
    keys = checkpoint_keys(step_2 / "state")
    assert keys and all(".adapters." in k for k in keys if k.startswith("model.")), "trainable tensors only"
    jobs = [{"distributed": MESHES[name][0], "batch_size": BATCH, "accum": MESHES[name][1],
             "out": str(tmp_path / name), "resume": str(step_2)} for name in ("1x2", "2x1")]
    resumed = dict(zip(("1x2", "2x1"), launch(train_jobs, jobs, nproc=2, echo=False)))
    distributed, accum = MESHES["1x1"]
    resumed["1x1"] = train_llama(distributed, BATCH, accum, str(tmp_path / "1x1"), resume=str(step_2))
    want = _adapter(out / "resume-2x2")
    for name, run in resumed.items():
        assert len(run["losses"]) == 4, name  # steps 1-2 from the checkpoint's history, 3-4 run here
        for a, b in zip(run["losses"], uninterrupted["losses"], strict=True):
            assert abs(a - b) <= DIST_RESUME_OTHER_WORLD * abs(b), name
        got = _adapter(tmp_path / name)
        assert sorted(got) == sorted(want)
        assert all(max_abs_diff(got[k], want[k]) <= DIST_RESUME_OTHER_WORLD for k in want), \
            (name, max(max_abs_diff(got[k], want[k]) for k in want))


@pytest.mark.parametrize(("arch", "method"), RUNS, ids=[a for a, _ in RUNS])
def test_the_estimators_2x2_per_rank_bytes_equal_each_ranks_local_sizes(grid, arch, method):
    # TP first (the plan's split), then FSDP2's dim-0 shards of each TP piece over dp_shard.
    from tunekit.estimate.memory import rank_model_states
    from tunekit.estimate.model import inventory, tp_placements

    model = build(arch, method)
    inv, placements = inventory(model), tp_placements(model)
    run = grid[0][f"{arch}-{method}"]
    for measured, where in zip(run["bytes"], run["coordinates"], strict=True):
        ours = rank_model_states(inv, "adamw", dp=2, dp_rank=where["dp_shard"], tp=2, tp_rank=where["tp"],
                                 placements=placements)
        assert (ours.frozen, ours.trainable) == (measured["frozen"], measured["trainable"]), where
