"""``tunekit.plot``: curves drawn from the trainer's own metrics.jsonl, and one-line errors."""

from __future__ import annotations

import io
import json
import sys

import pytest
from PIL import Image

from tunekit.plot import plot_metrics, read_metrics
from tunekit.train.logging import RunLogger


@pytest.fixture
def run(tmp_path):
    """A run folder whose metrics.jsonl the trainer's logger wrote."""
    log = RunLogger(tmp_path, total_steps=6, stream=io.StringIO())
    for step in range(1, 7):
        log.log("train", step, {"loss": 3.0 / step, "lr": 1e-3, "grad_norm": 0.5})
        if step % 3 == 0:
            log.log("eval", step, {"loss": 3.5 / step, "accuracy": step / 6})
    log.close()
    return tmp_path


def _logged(run, split, metric):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["split"] == split and metric in r]
    return [r["step"] for r in rows], [r[metric] for r in rows]


def test_the_png_shows_each_metric_by_split(run, tmp_path):
    out = tmp_path / "plots" / "curves.png"
    fig = plot_metrics(run, out, metrics=("loss", "accuracy"), dpi=50)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (int(4.5 * 2 * 50), int(3.2 * 50))
    loss_ax, accuracy_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    for split in ("train", "eval"):
        steps, values = _logged(run, split, "loss")
        assert list(lines[split].get_xdata()) == steps and list(lines[split].get_ydata()) == values
    assert [line.get_label() for line in accuracy_ax.get_lines()] == ["eval"]
    assert accuracy_ax.get_ylabel() == "accuracy" and loss_ax.get_xlabel() == "step"


def test_the_metrics_file_itself_works_and_nothing_is_written_without_out(run):
    fig = plot_metrics(run / "metrics.jsonl")
    assert len(fig.axes) == 1 and list(run.iterdir()) == [run / "metrics.jsonl"]
    assert [r["step"] for r in read_metrics(run) if r["split"] == "eval"] == [3, 6]


def test_errors_name_the_problem(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here not found: pass a run folder"):
        plot_metrics(tmp_path / "nothing-here")
    with pytest.raises(ValueError, match=r"no \['perplexity'\] values.*logged metrics: \['accuracy', 'grad_norm'"):
        plot_metrics(run, metrics=("perplexity",))
    (tmp_path / "bad.jsonl").write_text('{"split": "train"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(tmp_path / "bad.jsonl")


def test_without_matplotlib_the_error_says_how_to_install_it(run, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_metrics(run)
