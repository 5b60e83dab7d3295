"""Which failure the launcher reports, the adapter validity gate, and the all-gather byte counter."""

from __future__ import annotations

import pytest
import torch

from tunekit.distributed.comm_count import GatheredBytes
from tunekit.distributed.failures import Failure, first_failure, is_peer_failure, one_line, read_failures, record_exception
from tunekit.distributed.validate import check_adapter_tensors

CLOSED = "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:26528"


def test_the_cause_wins_over_its_consequences_whatever_the_order():
    records = [Failure(0, 1.0, CLOSED, True), Failure(1, 2.0, "ValueError: bad row", False)]
    error = first_failure({0: 1, 1: 1}, records)
    assert (error.rank, error.message) == (1, "ValueError: bad row")
    own = [Failure(2, 5.0, "KeyError: b", False), Failure(1, 3.0, "KeyError: a", False)]
    assert first_failure({}, own).rank == 1  # the earliest of two real errors


def test_signals_silence_and_timeouts():
    assert first_failure({0: -15, 1: -11}, []).message == "killed by signal SIGSEGV"
    hung = first_failure({0: 1}, [Failure(0, 1.0, "RuntimeError: Timed out waiting 3000ms for recv", True)], ranks=range(2))
    assert hung.rank == 1 and "hung" in hung.message and "Timed out" in hung.message
    assert first_failure({3: 2}, []).message == "exited with code 2"


def test_peer_errors_are_recognised():
    assert is_peer_failure(CLOSED) and is_peer_failure("NCCL communicator was aborted on rank 0")
    assert is_peer_failure(KeyboardInterrupt())
    assert not is_peer_failure(ValueError("data.train_files is empty"))
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"


def test_records_round_trip(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    try:
        raise ValueError("boom\nwith detail")
    except ValueError as err:
        record_exception(err, tmp_path)
    (record,) = read_failures(tmp_path)
    assert (record.rank, record.message, record.peer) == (3, "ValueError: boom", False)
    assert "Traceback" in (tmp_path / "rank-3.traceback.txt").read_text(encoding="utf-8")
    assert capsys.readouterr().err == "[rank 3] ValueError: boom\n"


@pytest.mark.parametrize(("tensors", "message"), [
    ({"a": torch.zeros(2, 3)}, "1 trainable tensors are missing, e.g. 'b'"),
    ({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, "'c' is not a trainable tensor"),
    ({"a": torch.zeros(0), "b": torch.zeros(4)}, r"'a' has shape \(0,\) but the adapter config implies \(2, 3\)"),
    ({"a": torch.zeros(2, 3), "b": torch.tensor([0.0, float("nan"), 0, 0])}, "'b' holds NaN or Inf"),
])
def test_the_validity_gate_refuses_incomplete_misshaped_or_nonfinite_adapters(tensors, message):
    with pytest.raises(ValueError, match=message):
        check_adapter_tensors(tensors, {"a": (2, 3), "b": (4,)})
    check_adapter_tensors({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, {"a": (2, 3), "b": (4,)})


def test_gathered_bytes_counts_functional_all_gathers():
    # The functional all-gather op, run on a fake single-rank group, is what DTensor.full_tensor() calls.
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        import torch.distributed._functional_collectives as funcol

        with GatheredBytes() as counted:
            funcol.all_gather_single(torch.ones(3, 4), 0, dist.group.WORLD).wait()
            _ = torch.ones(5) + 1
        assert (counted.calls, counted.bytes) == (1, 2 * 3 * 4 * 4)
    finally:
        dist.destroy_process_group()
