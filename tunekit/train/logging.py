"""Where training metrics go: a progress bar or line logs, ``metrics.jsonl``, TensorBoard.

On a TTY a tqdm bar shows loss, lr and tokens/s (tqdm adds the ETA); when
output is redirected (CI, ``nohup``, a job scheduler) a bar would write
carriage-return noise, so one plain line is printed per logged step instead.
Every record also goes to ``output_dir/metrics.jsonl`` (one JSON object per
line, appended, so a resumed run continues the same file) and, when enabled,
to TensorBoard as ``<split>/<name>`` scalars.
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


class RunLogger:
    """Writes train/eval records to the console, ``metrics.jsonl`` and TensorBoard.

    Args:
        output_dir: run folder (``metrics.jsonl`` and ``tensorboard/`` go there).
        total_steps: optimizer steps of the whole run (for the bar and the ETA).
        start_step: step the run starts from (non-zero when resuming).
        tensorboard: also write TensorBoard scalars.
        enabled: false on non-main processes: nothing is written.
        stream: console stream; its ``isatty()`` picks the bar or line logs.
    """

    def __init__(
        self, output_dir: str | Path, total_steps: int, start_step: int = 0, *, tensorboard: bool = False,
        enabled: bool = True, stream: IO[str] | None = None,
    ) -> None:
        self.total_steps, self.enabled = total_steps, enabled
        self.stream = stream or sys.stdout
        self.path = Path(output_dir) / METRICS_FILE
        self._start_step, self._t0 = start_step, time.perf_counter()
        self._bar = self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", file=self.stream, dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

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
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{split}/{key}", value, step)
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
        if self._writer is not None:
            self._writer.close()
