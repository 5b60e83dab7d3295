"""Starting N processes: ``tunekit.launch`` (Python, Jupyter) and ``tunekit finetune --nproc N`` (the CLI).

Both stand on torch's elastic launcher (what ``torchrun`` runs), with
``max_restarts=0``: a restart would hide the real error behind "connection
closed". Workers get the usual ``RANK``/``WORLD_SIZE``/... variables, so the
training code is the same one an external torchrun, ``accelerate launch``,
``deepspeed`` or ``srun`` starts.

Both fork where that is safe (Linux, CUDA not initialised in this process:
a notebook's functions need no pickling, and nothing is imported twice), else
spawn (the function must then be importable). ``launch`` streams the workers'
output here line by line (``[rank N] ...``), returns rank 0's result, and turns
a failure into one ``DistributedError`` naming the first failing rank, leaving
the caller alive; ``launch_command`` lets the workers print to the terminal and
returns an exit code. SIGTERM / Ctrl-C to the launcher is forwarded to every
worker, which finishes its step and checkpoints (``SHUTDOWN_TIMEOUT_S`` later a
worker still running is killed).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunekit.distributed.failures import FAILURE_DIR_ENV, DistributedError, first_failure, read_failures, record_exception

SHUTDOWN_TIMEOUT_S = 30
"""Seconds the launcher waits after forwarding SIGTERM / SIGINT before it SIGKILLs a worker that does not
stop: a training worker finishes its step and writes a sharded checkpoint in that time."""
EXIT_INTERRUPTED = 130


def safe_start_method() -> str:
    """"fork" on Linux while CUDA is untouched in this process, else "spawn" (fork after CUDA init breaks CUDA)."""
    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def check_process_count(nproc: int) -> None:
    """Refuse, before anything starts, a process count that cannot work on this machine.

    Raises:
        ValueError: ``nproc`` < 1, or more processes than GPUs (one GPU per process).
    """
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: need at least one process")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} exceeds the {torch.cuda.device_count()} GPUs here (one GPU per process); "
                         f"use --nproc {torch.cuda.device_count()} or fewer")


def _threads_per_worker(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def _worker(fn: Callable, failure_dir: str, threads: int, *args: Any) -> Any:
    """What each process runs: ``fn(*args)``, recording (not printing) a failure's traceback."""
    # A forked worker inherits the agent's signal handlers (they raise in the worker); a worker
    # the launcher stops should just stop, as a spawned one does.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True)  # lines reach the log (and the notebook) as they are written
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        torch.set_num_threads(threads)  # N processes on shared cores: no oversubscription
    try:
        return fn(*args)
    except SystemExit:  # an exit code the function chose (a CLI's); it recorded its own failure
        raise
    except BaseException as error:  # noqa: BLE001 - recorded for the launcher, then the process ends
        record_exception(error, failure_dir, prefix=False)  # the log streamer adds "[rank N]"
        raise SystemExit(1) from None


class LogStreamer(threading.Thread):
    """Copies the workers' stdout/stderr log files to ``write`` line by line, prefixed ``[rank N]``."""

    def __init__(self, root: Path, write: Callable[[str], Any], rank_offset: int = 0, workers: int = 1) -> None:
        super().__init__(daemon=True)
        self.root, self.write, self.rank_offset, self.workers = root, write, rank_offset, workers
        self._stop_event = threading.Event()
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, str] = {}

    def run(self) -> None:
        # Nothing is written until every worker has opened its log, i.e. has been forked: a fork
        # while this thread held the caller's stdout lock would leave that lock held in the child.
        while not self._stop_event.wait(0.2):
            if len(list(self.root.glob("*/attempt_*/*/stdout.log"))) >= self.workers:
                self.pump()
        self.pump(final=True)

    def pump(self, final: bool = False) -> None:
        for file in sorted(self.root.glob("*/attempt_*/*/std*.log")):
            with file.open("r", encoding="utf-8", errors="replace") as f:
                f.seek(self._offsets.get(file, 0))
                chunk = f.read()
                self._offsets[file] = f.tell()
            text = self._partial.pop(file, "") + chunk
            lines = text.split("\n")
            tail = lines.pop()
            if final and tail:
                lines.append(tail)
            elif tail:
                self._partial[file] = tail
            rank = int(file.parent.name) + self.rank_offset
            for line in lines:
                self.write(f"[rank {rank}] {line}\n")

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@contextlib.contextmanager
def _kept_signal_handlers() -> Iterator[None]:
    # The elastic agent installs its own SIGINT/SIGTERM handlers and never removes them;
    # a notebook kernel needs its KeyboardInterrupt back after the job.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _real_std_streams() -> Iterator[None]:
    # Forked workers redirect their stdout/stderr by file descriptor; a notebook's (or pytest's)
    # sys.stdout has none. The workers inherit the process's real streams; the log streamer
    # still writes to the caller's.
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.__stdout__ or open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - restored below
    sys.stderr = sys.__stderr__ or sys.stdout
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _launch_config(nproc: int, nnodes: int, node_rank: int | None, rdzv_endpoint: str | None, start_method: str,
                   logs_specs: Any) -> Any:
    from torch.distributed.launcher.api import LaunchConfig

    if nnodes == 1 and rdzv_endpoint is None:  # torchrun --standalone: a free port on this machine
        backend, endpoint, rdzv_configs = "c10d", "localhost:0", {}
    elif rdzv_endpoint is None:
        raise ValueError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (the first node's address)")
    elif node_rank is not None:  # fixed node ranks: static rendezvous at the first node
        backend, endpoint, rdzv_configs = "static", rdzv_endpoint, {"rank": node_rank}
    else:
        backend, endpoint, rdzv_configs = "c10d", rdzv_endpoint, {}
    return LaunchConfig(
        min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend=backend,
        rdzv_endpoint=endpoint, rdzv_configs=rdzv_configs, max_restarts=0, start_method=start_method,
        logs_specs=logs_specs, monitor_interval=0.1, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
    )


def _finetune_entry(config: Any, overrides: list[str]) -> Any:
    from tunekit.api import finetune

    return finetune(config, overrides)


def _entry_for(config_or_fn: Any, args: tuple, overrides: list[str]) -> tuple[Callable, tuple]:
    if callable(config_or_fn):
        return config_or_fn, args
    if hasattr(config_or_fn, "model_dump"):  # a FinetuneConfig travels as plain data
        config_or_fn = config_or_fn.model_dump(mode="json")
    elif isinstance(config_or_fn, Path):
        config_or_fn = str(config_or_fn)
    return _finetune_entry, (config_or_fn, list(overrides))


@dataclass
class _Outcome:
    """How a job ended: every rank's return value, failed ranks' exit codes, or the signal that stopped it."""

    results: dict[int, Any] | None = None
    codes: dict[int, int] | None = None
    stopped_by: int | None = None


def _run_job(fn: Callable, fn_args: tuple, *, nproc: int, nnodes: int, node_rank: int | None,
             rdzv_endpoint: str | None, start_method: str, run_dir: Path, echo: bool, redirect: bool) -> _Outcome:
    """Run ``fn(*fn_args)`` on ``nproc`` processes of this node under torch's elastic agent."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    failure_dir, logs = run_dir / "failures", run_dir / "logs"
    specs = DefaultLogsSpecs(log_dir=str(logs), redirects=Std.ALL if redirect else Std.NONE)
    config = _launch_config(nproc, nnodes, node_rank, rdzv_endpoint, start_method, specs)
    streamer = LogStreamer(logs, sys.stdout.write, (node_rank or 0) * nproc, nproc) if echo and redirect else None
    if streamer is not None:
        streamer.start()
    gc.collect()  # an earlier job's agent (its rendezvous store runs C++ threads) must be gone before we fork
    outcome = _Outcome()
    try:
        with _kept_signal_handlers(), _quiet_agent(), _real_std_streams(), _env({FAILURE_DIR_ENV: str(failure_dir)}):
            outcome.results = elastic_launch(config, _worker)(fn, str(failure_dir), _threads_per_worker(nproc),
                                                              *fn_args)
    except ChildFailedError as err:
        outcome.codes = {rank: failure.exitcode for rank, failure in err.failures.items()}
    except SignalException as err:
        outcome.stopped_by = err.sigval
    finally:
        if streamer is not None:
            streamer.stop()
    # Returned, not raised from the except blocks: the launcher's exception (and through its traceback
    # the agent and its store) is not kept alive as a new error's __context__.
    return outcome


def launch(config_or_fn: Any, *args: Any, nproc: int, overrides: list[str] = (), nnodes: int = 1,
           node_rank: int | None = None, rdzv_endpoint: str | None = None, start_method: str | None = None,
           log_dir: str | Path | None = None, echo: bool = True) -> Any:
    """Run ``config_or_fn`` on ``nproc`` processes (per node) and return rank 0's result.

    Args:
        config_or_fn: a function (called as ``fn(*args)`` on every rank), or a config
            (``FinetuneConfig``, dict or YAML path) that every rank fine-tunes with ``overrides``
            (the result is rank 0's ``FinetuneResult``).
        nproc: processes on this node.
        nnodes, node_rank, rdzv_endpoint: multi-node jobs (torchrun's meaning).
        start_method: "fork" or "spawn"; default ``safe_start_method()``.
        log_dir: where the workers' logs and failure records go (default: a new temporary folder).
        echo: stream the workers' output here, ``[rank N] line`` (a notebook shows it in the cell).

    Raises:
        DistributedError: a worker failed; names the first failing rank and its one-line error.
        KeyboardInterrupt: interrupted; every worker has been stopped (a fine-tuning worker after
            finishing its step and writing a checkpoint: call again to resume).

    Example:
        >>> import tunekit
        >>> tunekit.launch(sum, [1, 2], nproc=2, echo=False)  # doctest: +SKIP
        3
    """
    check_process_count(nproc)
    run_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="tunekit-launch-"))
    fn, fn_args = _entry_for(config_or_fn, args, list(overrides))
    outcome = _run_job(fn, fn_args, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                       start_method=start_method or safe_start_method(), run_dir=run_dir, echo=echo, redirect=True)
    if outcome.codes is not None:
        raise _failure(outcome.codes, run_dir / "failures", run_dir, range(nproc) if nnodes == 1 else None)
    if outcome.stopped_by is not None:
        raise KeyboardInterrupt(f"stopped by {signal.Signals(outcome.stopped_by).name}; every worker was stopped")
    results = outcome.results
    return results.get(0) if 0 in results else next(iter(results.values()), None)


def _failure(codes: dict[int, int], failure_dir: Path, run_dir: Path, ranks: range | None) -> DistributedError:
    # By now the agent has stopped every local worker: all the records that will exist are written.
    return first_failure(codes, read_failures(failure_dir), run_dir, ranks)


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    # The agent logs each worker's exit with a traceback of its own polling code; the
    # DistributedError says what matters (and the worker logs keep the rest).
    import logging

    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        agent_log.setLevel(level)


def _cli_worker(target: str, argv: list[str]) -> int:
    """One rank of a launched command: ``target(argv)``; a non-zero exit code ends the process with it."""
    from tunekit.distributed.worker import run

    code = run(target, argv)
    if code:
        raise SystemExit(code)
    return 0


def launch_command(argv: list[str], *, nproc: int, nnodes: int = 1, node_rank: int | None = None,
                   rdzv_endpoint: str | None = None, log_dir: str | Path | None = None,
                   target: str = "tunekit.cli:main") -> int:
    """What ``tunekit finetune CONFIG --nproc N`` runs: ``TARGET(argv)`` (a CLI ``main``) on every rank.

    Workers are forked where that is safe (nothing is imported twice), else spawned, and print
    straight to this terminal (only rank 0 prints; its progress bar works). Returns 0; 130 when a
    signal stopped the job (every rank finished its step and checkpointed: the same command
    resumes); the workers' common exit code when they all failed alike (2: a refused config);
    else 1, after printing the first failing rank's one-line error (``tunekit: rank R failed: ...``).
    """
    check_process_count(nproc)
    run_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="tunekit-launch-"))
    outcome = _run_job(_cli_worker, (target, list(argv)), nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                       rdzv_endpoint=rdzv_endpoint, start_method=safe_start_method(), run_dir=run_dir, echo=False,
                       redirect=False)
    if outcome.stopped_by is not None:
        print(f"tunekit: stopped by {signal.Signals(outcome.stopped_by).name}: run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.codes is None:
        return 0
    codes = set(outcome.codes.values())
    if codes == {EXIT_INTERRUPTED}:  # a rank got the signal itself; all stopped and checkpointed together
        return EXIT_INTERRUPTED
    error = _failure(outcome.codes, run_dir / "failures", run_dir, range(nproc) if nnodes == 1 else None)
    print(f"tunekit: {error}", file=sys.stderr)
    # 2 (a refused config) only when every local rank refused it; a rank stopped after another's failure
    # may have no recorded code, so one rank's 2 alone is a failed job (1)
    all_refused = codes == {2} and len(outcome.codes) == nproc  # this node's ranks
    return 2 if all_refused else 1
