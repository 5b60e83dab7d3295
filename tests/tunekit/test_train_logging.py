"""Metrics to metrics.jsonl, TensorBoard, line logs without a TTY and a progress bar with one."""

import io
import json
import math

import pytest

from _tiny import tiny_llama
from _train_data import ToyLM

from tunekit.adapters import LoRAConfig, inject_adapters
from tunekit.train import TrainConfig, Trainer
from tunekit.train.logging import EvalProgress, RunLogger


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_metrics_jsonl_tensorboard_and_line_logs(tmp_path, capsys):
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=2))
    cfg = TrainConfig(max_steps=4, batch_size=4, log_every=2, eval_every=2, tensorboard=True, resume="never")
    result = Trainer(model, ToyLM(n=8), cfg, tmp_path).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["split"], r["step"]) for r in records] == [("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    train, ev = records[0], records[1]
    assert {"epoch", "loss", "grad_norm", "lr", "tokens_per_s"} <= train.keys()
    assert {"loss", "perplexity"} <= ev.keys() and ev["perplexity"] == math.exp(ev["loss"])
    # each line also has its wall-clock time (unix seconds) and the seconds since the run started
    untimed = [{k: v for k, v in r.items() if k not in ("wall_time", "elapsed_s")} for r in records]
    assert untimed == result.history and result.metrics_file == tmp_path / "metrics.jsonl"
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and all(abs(r["wall_time"] - records[0]["wall_time"]) < 600 for r in records)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    assert events.Scalars("eval/loss")[-1].value == records[-1]["loss"]

    out = capsys.readouterr().out  # pytest's capture is not a TTY: plain lines, no bar
    assert "train step 2/4 | epoch 1 | loss" in out and "eta" in out
    assert "\r" not in out
    assert "steps 4 (2.00 epochs)" in out
    # The final evaluation is shown once, by its own line (not again in the summary).
    after_training = out.split("train step 4/4")[1].splitlines()[1:]
    assert sum(f"loss {records[-1]['loss']:.4g}" in line for line in after_training) == 1


def test_progress_bar_on_a_tty(tmp_path):
    stream = FakeTTY()
    log = RunLogger(tmp_path, total_steps=10, stream=stream)
    log.log("train", 1, {"loss": 2.5, "lr": 1e-4})
    log.advance(1)
    log.message("hello")
    log.close()
    text = stream.getvalue()
    assert "1/10" in text and "loss=2.5" in text and "hello" in text
    assert "train step" not in text  # the bar replaces the line logs


def test_disabled_logger_writes_nothing(tmp_path):
    stream = io.StringIO()
    log = RunLogger(tmp_path / "run", total_steps=3, enabled=False, stream=stream)
    log.log("train", 1, {"loss": 1.0})
    log.close()
    assert stream.getvalue() == "" and not (tmp_path / "run").exists()


def test_a_fresh_run_starts_the_log_and_a_resume_drops_records_after_its_checkpoint(tmp_path):
    def log_steps(start, steps):
        logger = RunLogger(tmp_path, total_steps=10, start_step=start, stream=io.StringIO())
        for step in steps:
            logger.log("train", step, {"loss": 1.0})
        logger.close()
        lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["step"] for line in lines]

    assert log_steps(0, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert log_steps(2, [3, 4, 5]) == [1, 2, 3, 4, 5]  # resumed at step 2: 3 and 4 are not doubled
    assert log_steps(0, [1]) == [1]  # a new run from scratch replaces the old log


def test_tokens_per_second_counts_training_steps_only(tmp_path, monkeypatch):
    # A fake clock: each training step takes 1 s, each evaluation and checkpoint 100 s.
    data = ToyLM(n=8)
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=2))
    cfg = TrainConfig(max_steps=4, batch_size=4, log_every=1, eval_every=1, save_every=1, resume="never")
    trainer = Trainer(model, data, cfg, tmp_path)
    now = [0.0]
    trainer.clock = lambda: now[0]

    def taking(seconds, fn):
        def timed(*args, **kwargs):
            now[0] += seconds
            return fn(*args, **kwargs)
        return timed

    monkeypatch.setattr(trainer, "train_step", taking(1.0, trainer.train_step))
    monkeypatch.setattr(trainer, "evaluate", taking(100.0, trainer.evaluate))
    monkeypatch.setattr(trainer, "_save", taking(100.0, trainer._save))
    result = trainer.fit()
    # 2 steps per epoch of all 8 rows: the 4 steps see every row twice.
    tokens = 2 * sum(len(row["input_ids"]) for row in data.train)
    assert result.train_seconds == 4.0 and result.tokens_per_second == pytest.approx(tokens / 4.0)
    logged = [r["tokens_per_s"] for r in result.history if r["split"] == "train"]
    assert logged[-1] == pytest.approx(tokens / 4.0) and now[0] > 400


def test_eval_progress_lines_only_for_long_evaluations(monkeypatch):
    ticks = iter([0.0, 3.0, 12.0, 13.0, 25.0, 25.0, 0.0, 1.0, 2.0])
    stream = io.StringIO()
    monkeypatch.setattr(EvalProgress, "clock", staticmethod(lambda: next(ticks)))
    progress = EvalProgress(100, stream=stream)  # t=0
    progress.update(20)                          # t=3: too early for a line
    progress.update(40)                          # t=12
    progress.update(60)                          # t=13: within 10 s of the last line
    progress.close()                             # t=25 (checked), t=25 (shown)
    assert stream.getvalue().splitlines() == ["eval 40/100 rows (40%), 12 s", "eval 100/100 rows in 25 s"]
    quiet = io.StringIO()
    short = EvalProgress(10, stream=quiet)
    short.update(5)
    short.close()
    assert quiet.getvalue() == ""
