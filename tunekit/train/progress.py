"""Where a run is (``Progress``, saved in every checkpoint) and what it produced (``TrainResult``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint's ``progress.json``.

    The position in the data is ``samples_in_epoch``, the global rows consumed in the epoch:
    it does not depend on how the rows were split over processes, so a run resumes on
    another number of processes at the same row (``step_in_epoch`` is derived from it).
    """

    run_id: str = ""
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_in_epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_metrics: dict[str, float] | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    restored_best: bool = False  # the weights are the best evaluation's (early stopping, end of run)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResult:
    """What ``Trainer.fit`` returns (the same on every rank). Metrics dicts are ``Trainer.evaluate`` outputs."""

    global_step: int
    epochs_completed: float
    final_metrics: dict[str, float] | None
    best_metrics: dict[str, float] | None
    best_step: int | None
    history: list[dict[str, Any]]
    output_dir: Path
    metrics_file: Path
    checkpoint_dir: Path | None
    tokens_per_second: float
    """Training throughput over all processes: tokens of the training steps / ``train_seconds``."""
    train_seconds: float
    """Time spent in training steps (evaluation and checkpoint writes excluded)."""
    peak_memory_mib: float
    """This process's peak: CUDA memory allocated on a GPU, else its resident set size."""
    stopped_early: bool = False
    interrupted: bool = False
    peak_memory_mib_per_rank: list[float] = field(default_factory=list)
    """``peak_memory_mib`` of every rank, in rank order."""

    def summary(self) -> str:
        """A few human-readable lines."""
        # The final metrics are not repeated: the last eval line (or the restore message) showed them.
        memory = f"peak memory {self.peak_memory_mib:.0f} MiB"
        if len(self.peak_memory_mib_per_rank) > 1:
            memory = "peak memory per rank " + ", ".join(f"{m:.0f}" for m in self.peak_memory_mib_per_rank) + " MiB"
        lines = [f"steps {self.global_step} ({self.epochs_completed:.2f} epochs), {self.train_seconds:.1f} s in "
                 f"training steps, {self.tokens_per_second:.0f} tokens/s, {memory}"]
        if self.stopped_early:
            lines.append(f"stopped early (best at step {self.best_step})")
        if self.interrupted:
            lines.append(f"interrupted: resume from {self.checkpoint_dir}")
        return "\n".join(lines)
