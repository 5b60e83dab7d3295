"""Where training metrics go: a progress bar or line logs, ``metrics.jsonl``, experiment trackers.

On a TTY a tqdm bar shows loss, lr and tokens/s (tqdm adds the ETA); when
output is redirected (CI, ``nohup``, a job scheduler) a bar would write
carriage-return noise, so one plain line is printed per logged step instead.
Every record also goes to ``output_dir/metrics.jsonl`` (one JSON object per
line with its ``wall_time`` and ``elapsed_s``, appended, so a resumed run
continues the same file) and to the trackers of ``train.report_to``
(``tunekit.train.trackers``: TensorBoard, W&B, MLflow) as ``<split>/<name>``.
An evaluation shows its progress too (``EvalProgress``).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

METRICS_FILE = "metrics.jsonl"


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.2e}" if key == "lr" else f"{key} {value:.4g}"
    return f"{key} {value}"


class EvalProgress:
    """Shows how far an evaluation is: a tqdm bar on a TTY; otherwise a line every ``every_s`` seconds
    and one at the end, once it has run that long (short evaluations print nothing).

    Args:
        total: rows to evaluate.
        enabled: false on non-main processes.
        stream: console stream.
    """

    clock = staticmethod(time.perf_counter)  # a test replaces it

    def __init__(self, total: int, *, enabled: bool = True, stream: IO[str] | None = None, every_s: float = 10.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.stream = stream or sys.stdout
        self._t0 = self._last = self.clock()
        self._bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="row", desc="eval", file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, done: int) -> None:
        """``done`` rows of ``total`` are evaluated."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
            return
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            print(f"eval {done}/{self.total} rows ({done / max(self.total, 1):.0%}), {now - self._t0:.0f} s",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.clock() - self._t0 >= self.every_s:
            print(f"eval {self.total}/{self.total} rows in {self.clock() - self._t0:.0f} s", file=self.stream,
                  flush=True)


class RunLogger:
    """Writes train/eval records to the console, ``metrics.jsonl`` and the experiment trackers.

    Args:
        output_dir: run folder (``metrics.jsonl`` and ``tensorboard/`` go there).
        total_steps: optimizer steps of the whole run (for the bar and the ETA).
        start_step: step the run starts from (non-zero when resuming).
        report_to: trackers (``tensorboard``, ``wandb``, ``mlflow``; ``train.report_to``).
        tensorboard: same as ``"tensorboard"`` in ``report_to``.
        run_config: the resolved config, logged to the trackers as hyper-parameters.
        enabled: false on non-main processes: nothing is written.
        stream: console stream; its ``isatty()`` picks the bar or line logs.
    """

    def __init__(
        self, output_dir: str | Path, total_steps: int, start_step: int = 0, *, report_to=(),
        tensorboard: bool = False, run_config: dict[str, Any] | None = None, enabled: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        self.total_steps, self.enabled = total_steps, enabled
        self.stream = stream or sys.stdout
        self.path = Path(output_dir) / METRICS_FILE
        self._start_step, self._t0 = start_step, time.perf_counter()
        self._bar = None
        self._trackers: list = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=self.stream, dynamic_ncols=True)
        names = list(dict.fromkeys([*report_to, *(["tensorboard"] if tensorboard else [])]))
        if names:
            from tunekit.train.trackers import open_trackers

            self._trackers = open_trackers(names, Path(output_dir), run_config or {}, start_step)

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to ``step``: a fresh run (0) starts an empty log, and a resumed run
        drops what was logged after its checkpoint, since those steps are about to run again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step] if step else []
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "?"
        left = (time.perf_counter() - self._t0) / done * (self.total_steps - step)
        return str(datetime.timedelta(seconds=round(left)))

    def log(self, split: str, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Record ``metrics`` of ``split`` ("train" or "eval") at optimizer ``step``; return the record."""
        record = {"split": split, "step": step, **metrics}
        if not self.enabled:
            return record
        # The clock goes to the file only: the returned record (a run's history) stays comparable across runs.
        timed = {**record, "wall_time": round(time.time(), 3), "elapsed_s": round(time.perf_counter() - self._t0, 3)}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(timed) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self._trackers:
            tracker.log(split, step, scalars)
        self._show(split, step, metrics)
        return record

    def _show(self, split: str, step: int, metrics: dict[str, Any]) -> None:
        shown = {k: v for k, v in metrics.items() if k in ("epoch", "loss", "lr", "grad_norm", "tokens_per_s")
                 or split == "eval"}
        if self._bar is not None and split == "train":
            self._bar.set_postfix({k: _fmt(k, v).split(" ")[1] for k, v in shown.items()}, refresh=False)
            return
        parts = [f"{split} step {step}/{self.total_steps}", *(_fmt(k, v) for k, v in shown.items())]
        if split == "train":
            parts.append(f"eta {self._eta(step)}")
        self.message(" | ".join(parts))

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step``."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        """Print one line (above the bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
