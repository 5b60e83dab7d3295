"""Training curves from a run's ``metrics.jsonl``, drawn with matplotlib (imported on first use).

    fig = plot_metrics("runs/quickstart")                     # loss: train and eval, by step
    plot_metrics("runs/quickstart", "loss.png", metrics=("loss", "accuracy"))

One panel per metric, a line per split (``train``, ``eval``) against the
optimizer step. The figure is a plain ``matplotlib.figure.Figure`` built
without pyplot, so it works headless, in threads and in notebooks (a notebook
shows the returned figure). matplotlib is not a dependency of tunekit:
``pip install matplotlib`` (or ``tunekit[plot]``).

Example:
    >>> import json, pathlib, tempfile
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> rows = [{"split": "train", "step": s, "loss": 2.0 / s} for s in (1, 2, 3)]
    >>> _ = (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows), encoding="utf-8")
    >>> [r["step"] for r in read_metrics(run)]
    [1, 2, 3]
    >>> fig = plot_metrics(run, run / "loss.png")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["metric_series", "plot_metrics", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def _metrics_file(run: str | Path) -> Path:
    path = Path(run)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: pass a run folder (output.dir) or its {METRICS_FILE}")
    return file


def read_metrics(run: str | Path) -> list[dict[str, Any]]:
    """The records of a run folder's ``metrics.jsonl`` (or of that file), in order."""
    file = _metrics_file(run)
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{file} line {number} is not JSON; is this a tunekit metrics.jsonl?") from None
    return records


def metric_series(records: Sequence[dict[str, Any]], metric: str, split: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` in the ``split`` records that have it."""
    rows = [r for r in records if r.get("split") == split and isinstance(r.get(metric), (int, float))]
    return [int(r["step"]) for r in rows], [float(r[metric]) for r in rows]


def plot_metrics(run: str | Path, out: str | Path | None = None, *, metrics: Sequence[str] = ("loss",),
                 splits: Sequence[str] = ("train", "eval"), title: str | None = None, dpi: int = 100):
    """Draw ``metrics`` of a run against the step; save a PNG to ``out`` when given.

    Args:
        run: the run folder (``output.dir``) or its ``metrics.jsonl``.
        out: PNG file to write (its folder is created); None = only return the figure.
        metrics: one panel per metric name (e.g. "loss", "accuracy", "perplexity", "lr").
        splits: which record splits to draw as lines.
        title: figure title (default: the run folder's name).
        dpi: resolution of the saved PNG.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        FileNotFoundError: no metrics file; ValueError: none of ``metrics`` was logged;
        ImportError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("tunekit.plot needs matplotlib: pip install matplotlib") from None
    records = read_metrics(run)
    drawn = [m for m in metrics if any(metric_series(records, m, s)[0] for s in splits)]
    if not drawn:
        logged = sorted({k for r in records for k, v in r.items()
                         if isinstance(v, (int, float)) and k not in ("step", "elapsed_s", "wall_time")})
        raise ValueError(f"{_metrics_file(run)} has no {list(metrics)} values for splits {list(splits)}; "
                         f"logged metrics: {logged}")
    fig = Figure(figsize=(4.5 * len(drawn), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, metric in zip(fig.subplots(1, len(drawn), squeeze=False)[0], drawn):
        for split in splits:
            steps, values = metric_series(records, metric, split)
            if steps:
                ax.plot(steps, values, marker="o" if split == "eval" else None, markersize=3, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    file = _metrics_file(run)
    fig.suptitle(title if title is not None else (file.parent.name or str(file)))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, format="png")
    return fig
