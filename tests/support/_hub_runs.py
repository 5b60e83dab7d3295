"""Tiny finished runs for the Hub push tests (trained once per test module with ``tunekit.finetune``)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from _tiny_runs import run_config
from hub_server import HubServer, use_in_process

SENTINEL = "hf_SENTINELdoNotLeak0123456789abcdef"
"""The token the Hub stand-in accepts; tests check it never shows up anywhere but the Authorization header."""


def finished_run(root: Path, task: str = "causal_lm", method: str = "lora", steps: int = 2, **output) -> Path:
    """A completed tiny run folder (adapter/, results.json, metrics.jsonl, ...) under ``root``.

    A run already finished there is reused: pushes only read run folders, so the test modules of a
    session share them (``root`` = ``tmp_path_factory.getbasetemp() / "hub-runs"``).
    """
    import tunekit

    out = root / f"run-{task}-{method}{'-merged' if output.get('save_merged') else ''}"
    if (out / "results.json").is_file():
        return out
    cfg = run_config(root, task, method, steps=steps)
    cfg["output"].update(output, dir=str(out))
    with redirect_stdout(io.StringIO()):
        return tunekit.finetune(cfg).output_dir


def shared_runs(tmp_path_factory) -> Path:
    """The session's folder of finished runs."""
    root = tmp_path_factory.getbasetemp() / "hub-runs"
    root.mkdir(exist_ok=True)
    return root


def base_dir(run: Path) -> Path:
    """The local base model folder a run trained on."""
    record = json.loads((run / "adapter" / "tunekit_base.json").read_text(encoding="utf-8"))
    return Path(record["model"]["name_or_path"])


@contextmanager
def serving_base(monkeypatch, run: Path, **server_options) -> Iterator[HubServer]:
    """A stand-in this process pushes to, holding the run's base model as ``tiny/llama``."""
    with HubServer(token=SENTINEL, **server_options) as server:
        use_in_process(monkeypatch, server)
        server.seed("tiny/llama", base_dir(run))
        yield server
