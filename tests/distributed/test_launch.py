"""``tunekit.launch`` and the CLI launcher: results, streamed logs, and failures named by their first rank."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from _dist_helpers import cli_main, fail_on_rank_one, greet, sleep_forever, strategy_none_under_a_launcher, train_then

import tunekit
from tunekit.distributed.launch import launch_command

pytestmark = pytest.mark.distributed
HERE = Path(__file__).resolve().parent


def test_launch_returns_rank_zero_result_and_streams_worker_lines(capsys):
    assert tunekit.launch(greet, "hello", nproc=2) == "hello 0 of 2"
    out = capsys.readouterr().out
    assert "[rank 0] hello from rank 0" in out and "[rank 1] hello from rank 1" in out


def test_failing_worker_raises_one_distributed_error_naming_it():
    with pytest.raises(tunekit.DistributedError) as info:
        tunekit.launch(fail_on_rank_one, nproc=2, echo=False)
    # rank 0's "connection closed" came later and is a consequence: rank 1's own error is reported
    assert info.value.rank == 1
    assert info.value.message == "ValueError: data.train_files is empty on this node"
    assert (Path(info.value.log_dir) / "failures" / "rank-1.traceback.txt").read_text(encoding="utf-8").strip()


def test_strategy_none_under_a_launcher_is_refused_on_every_rank():
    with pytest.raises(tunekit.DistributedError, match="distributed.strategy is none: every process would train"):
        tunekit.launch(strategy_none_under_a_launcher, nproc=2, echo=False)


@pytest.mark.slow
def test_sigkill_of_one_rank_ends_the_job_within_a_minute_naming_it(tmp_path):
    start = time.monotonic()
    with pytest.raises(tunekit.DistributedError) as info:
        tunekit.launch(train_then, "kill", str(tmp_path), nproc=2, echo=False)
    assert time.monotonic() - start < 60
    assert info.value.rank == 1
    assert "SIGKILL" in info.value.message or "died without an error of its own" in info.value.message


@pytest.mark.slow
def test_hanging_rank_ends_the_job_after_the_process_group_timeout(tmp_path):
    start = time.monotonic()
    with pytest.raises(tunekit.DistributedError) as info:
        tunekit.launch(train_then, "hang", str(tmp_path), 3.0, nproc=2, echo=False)
    assert time.monotonic() - start < 3.0 + 30  # the timeout, the launcher's SIGTERM grace, start-up
    assert info.value.rank == 1 and "hung" in info.value.message


def test_ctrl_c_stops_every_worker_and_gives_the_caller_its_handler_back():
    before = signal.getsignal(signal.SIGINT)
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        tunekit.launch(sleep_forever, nproc=2, echo=False)
    assert time.monotonic() - start < 30
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_cli_launch_returns_1_and_prints_the_failing_ranks_line(monkeypatch, capfd, tmp_path):
    # The workers are fresh interpreters (spawn): they find the helper module through PYTHONPATH.
    paths = [str(HERE), str(HERE.parent / "support"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    code = launch_command(["missing.yaml"], nproc=2, target=f"{cli_main.__module__}:cli_main", log_dir=tmp_path)
    assert code == 1
    err = capfd.readouterr().err
    assert "tunekit: rank 1 failed: error: missing.yaml is not a config file" in err
    assert sys.modules["tunekit"] is tunekit  # this process is untouched
