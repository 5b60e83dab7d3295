"""Failures of a multi-process job: each rank records its own, the launcher names the first.

When one rank fails, the others soon fail too ("connection closed by peer",
timeouts in a collective) or are stopped by the launcher. Those are
consequences; the user should see the cause. Each worker therefore writes a
small JSON record (rank, time, one-line message, whether it looks like a
consequence) into the job's failure folder, its traceback beside it, and
prints only the cause's one line. ``first_failure`` then picks, in order:

1. the earliest failure that is not a communication error;
2. a rank killed by a signal other than the launcher's own SIGTERM/SIGINT (SIGKILL, SIGSEGV);
3. when only communication errors were recorded, a rank that recorded nothing: it was
   killed, crashed or hung (its peers' error, often a timeout, is quoted);
4. the earliest communication error;
5. any rank's exit code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

FAILURE_DIR_ENV = "TUNEKIT_FAILURE_DIR"

_PEER = re.compile(
    r"connection (closed|reset|refused)|broken pipe|timed? ?out|timeout|communicator was aborted|"
    r"recvBytes|sendBytes|DistBackendError|DistNetworkError|NCCL error",
    re.IGNORECASE,
)


class DistributedError(RuntimeError):
    """A multi-process job failed; ``rank`` is the first failing rank and ``message`` its one-line error."""

    def __init__(self, rank: int, message: str, log_dir: str | Path | None = None) -> None:
        self.rank, self.message, self.log_dir = rank, message, log_dir
        where = f" (worker logs: {log_dir})" if log_dir else ""
        super().__init__(f"rank {rank} failed: {message}{where}")


@dataclass(frozen=True)
class Failure:
    rank: int
    time: float
    message: str
    peer: bool
    """Looks like a consequence of another rank's failure (a communication error)."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (a KeyboardInterrupt reads "interrupted")."""
    if isinstance(error, KeyboardInterrupt):
        return "KeyboardInterrupt: interrupted"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def is_peer_failure(error: BaseException | str) -> bool:
    """True for the errors a rank gets when *another* rank died or hung."""
    if isinstance(error, BaseException):
        names = {cls.__name__ for cls in type(error).__mro__}
        # a rank stopped by the launcher (SIGTERM/SIGINT) is a consequence too
        if names & {"DistBackendError", "DistNetworkError", "DistStoreError", "SignalException", "KeyboardInterrupt"}:
            return True
        error = str(error)
    return bool(_PEER.search(error))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def record_failure(message: str, peer: bool, details: str = "", folder: str | Path | None = None) -> None:
    """Write this rank's failure record (and ``details``, a traceback) into the job's failure folder."""
    folder = folder or os.environ.get(FAILURE_DIR_ENV)
    if not folder:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank = _rank()
    record = {"rank": rank, "time": time.time(), "message": message, "peer": peer}
    (folder / f"rank-{rank}.traceback.txt").write_text(details, encoding="utf-8")
    tmp = folder / f".rank-{rank}.json"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.rename(folder / f"rank-{rank}.json")  # the reader never sees half a record


def record_exception(error: BaseException, folder: str | Path | None = None, prefix: bool = True) -> None:
    """Record ``error`` for this rank and print its one line (not for communication errors: they are noise)."""
    message, peer = one_line(error), is_peer_failure(error)
    details = "".join(traceback.format_exception(error))
    record_failure(message, peer, details, folder)
    if not peer:
        print(f"[rank {_rank()}] {message}" if prefix else message, file=sys.stderr, flush=True)


def read_failures(folder: str | Path) -> list[Failure]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for file in sorted(folder.glob("rank-*.json")):
        data = json.loads(file.read_text(encoding="utf-8"))
        out.append(Failure(int(data["rank"]), float(data["time"]), str(data["message"]), bool(data["peer"])))
    return out


_LAUNCHER_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def first_failure(exit_codes: dict[int, int], records: list[Failure], log_dir: str | Path | None = None,
                  ranks: range | None = None) -> DistributedError:
    """The ``DistributedError`` naming the cause (see the module docstring for the order).

    Args:
        exit_codes: global rank -> exit code of the failed processes the launcher saw (negative: a signal).
        records: what the ranks recorded themselves.
        ranks: every rank whose record would be in ``records`` (this node's), for rule 3.

    Example:
        >>> records = [Failure(0, 2.0, "RuntimeError: Connection closed by peer", True)]
        >>> str(first_failure({0: 1, 1: -9}, records))
        'rank 1 failed: killed by signal SIGKILL'
        >>> str(first_failure({0: 1}, records, ranks=range(2)))
        'rank 1 failed: died without an error of its own (killed, crashed or hung); rank 0 saw: RuntimeError: Connection closed by peer'
    """
    own = sorted((r for r in records if not r.peer), key=lambda r: r.time)
    if own:
        return DistributedError(own[0].rank, own[0].message, log_dir)
    for rank, code in sorted(exit_codes.items()):
        if code < 0 and -code not in _LAUNCHER_SIGNALS:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            return DistributedError(rank, f"killed by signal {name}", log_dir)
    peers = sorted(records, key=lambda r: r.time)
    silent = sorted(set(ranks or ()) - {r.rank for r in records})
    if peers and silent:
        message = f"died without an error of its own (killed, crashed or hung); rank {peers[0].rank} saw: {peers[0].message}"
        return DistributedError(silent[0], message, log_dir)
    if peers:
        return DistributedError(peers[0].rank, peers[0].message, log_dir)
    if exit_codes:
        rank, code = min(exit_codes.items())
        return DistributedError(rank, f"exited with code {code}", log_dir)
    return DistributedError(0, "the job failed without a recorded error", log_dir)
