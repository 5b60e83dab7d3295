"""bench/gpu_distributed.py: argument checks, a tiny CPU run of the whole script, and the real thing on GPUs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "bench" / "gpu_distributed.py"
TINY = ["--hidden", "64", "--layers", "2", "--vocab", "128", "--seq-len", "16", "--batch", "2", "--steps", "2"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_distributed", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("argv", "needle"), [
    (["--device", "cpu", "--nproc", "1"], "need at least 2"),
    (["--device", "cpu", "--hidden", "100"], "a multiple of 64"),
])
def test_arguments_that_cannot_run_are_one_line_exit_2(argv, needle, capsys):
    assert _bench().main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_without_a_gpu_it_says_how_to_smoke_it(capsys):
    assert _bench().main([]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err


@pytest.mark.distributed
def test_tiny_cpu_run_reports_every_rank(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert _bench().main(["--device", "cpu", "--nproc", "2", "--strategies", "fsdp", *TINY, "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert row["strategy"] == "fsdp" and row["processes"] == 2 and len(row["peak_mib_per_rank"]) == 2
    assert row["tokens_per_s"] > 0 and "| fsdp | 2 |" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.distributed
def test_every_strategy_on_the_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (one per process)")
    out = tmp_path / "bench.json"
    strategies = ["ddp", "fsdp", "fsdp_offload", "deepspeed", "deepspeed_offload"]
    assert _bench().main(["--nproc", "2", "--strategies", *strategies, "--hidden", "512", "--layers", "4",
                          "--json", str(out)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text(encoding="utf-8"))["rows"]}
    assert sorted(rows) == sorted(strategies)  # a measurement, recorded per rank; the figures go to the README
    assert all(len(r["peak_mib_per_rank"]) == 2 and min(r["peak_mib_per_rank"]) > 0 for r in rows.values())
