"""The notebooks in notebooks/: clean nbformat 4 files that run top to bottom and show what they claim.

nbformat/nbclient are not dependencies, so a notebook is run the way a kernel would run it:
its code cells, in order, in one namespace (``exec``), from the folder Jupyter would use.
The assertions read the notebook's own variables (PEFT-vs-tunekit logit gaps, accuracy before/after).
"""

from __future__ import annotations

import json
import linecache
import re
import sys
import tempfile
from pathlib import Path

import pytest
from _tolerances import FP32_EXACT, FP32_MERGE_ROUNDTRIP

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
NAMES = ["01_adapters_api.ipynb", "02_finetune_quickstart.ipynb", "05_multi_process.ipynb"]
# A leading % or ! is IPython syntax that exec (and plain Python users) cannot run.
MAGIC = re.compile(r"^\s*[%!]", re.MULTILINE)
# A private name of ours: `from tunekit... import _x`, `tunekit.x._y`, `import tunekit._x`.
PRIVATE = re.compile(r"from tunekit[\w.]* import [^\n]*\b_\w|tunekit(\.\w+)*\._\w")


def _notebook(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))


def _code_cells(nb: dict) -> list[str]:
    return ["".join(cell["source"]) for cell in nb["cells"] if cell["cell_type"] == "code"]


def _run(name: str, cwd: Path, tmp_path: Path, monkeypatch) -> dict:
    """Exec ``name``'s code cells in order from ``cwd``; return the namespace.

    The notebook writes through ``tempfile``, pointed here at ``tmp_path``.
    """
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))  # the set-up cell edits sys.path in place
    namespace: dict = {"__name__": "__main__"}
    for index, source in enumerate(_code_cells(_notebook(name))):
        filename = f"{name}[code cell {index}]"
        # Registered so a failure's traceback shows the cell's lines.
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        exec(compile(source, filename, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean_nbformat4_with_public_names_only(name):
    nb = _notebook(name)
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int) and isinstance(nb["metadata"], dict)
    assert nb["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(set(ids)) == len(ids), "cell ids must be unique (nbformat 4.5)"
    for cell in nb["cells"]:
        assert cell["cell_type"] in {"code", "markdown"} and isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: stored with outputs"
    code = "\n".join(_code_cells(nb))
    assert not MAGIC.search(code), f"{name}: IPython magic or shell escape in a code cell"
    assert not PRIVATE.search(code), f"{name}: imports a private tunekit name: {PRIVATE.search(code).group(0)}"


@pytest.mark.slow
def test_adapters_api_notebook_runs_from_the_repo_root(tmp_path, monkeypatch):
    ns = _run("01_adapters_api.ipynb", REPO, tmp_path, monkeypatch)
    assert ns["REPO"] == REPO and ns["WORK"].parent == tmp_path
    assert ns["init_diff"] == 0.0 and ns["base_weight_moved"] == 0.0  # identity at init; frozen base
    assert ns["losses"][-1] < ns["losses"][0]
    assert ns["disabled_diff"] <= FP32_EXACT and ns["switch_back_diff"] <= FP32_EXACT
    assert ns["merged_diff"] <= FP32_EXACT and ns["roundtrip"] <= FP32_MERGE_ROUNDTRIP
    # What PEFT computes from the saved folders, for both named adapters.
    assert ns["peft_diff"] <= FP32_EXACT and ns["peft_dora_diff"] <= FP32_EXACT
    assert ns["reload_diff"] <= FP32_EXACT and ns["eject_diff"] <= FP32_EXACT
    assert (ns["WORK"] / "adapters" / "dora" / "adapter_model.safetensors").is_file()
    assert "classifier" in ns["bert_report"].wrapped and len(ns["bert_report"].wrapped) == 13  # 6 x (q, v) + head


@pytest.mark.slow
def test_finetune_notebook_runs_from_the_notebooks_folder(tmp_path, monkeypatch):
    ns = _run("02_finetune_quickstart.ipynb", NOTEBOOKS, tmp_path, monkeypatch)
    result = ns["result"]
    assert result.output_dir.is_relative_to(tmp_path)  # nothing written into the repository
    assert result.metrics["accuracy"] > result.metrics_before["accuracy"]
    assert result.metrics["loss"] < result.metrics_before["loss"]
    assert set(ns["predicted"]) <= set(ns["labels"]) and ns["predicted"][:2] == ["weather", "sports"]
    assert ns["probs"].shape == (len(ns["texts"]), len(ns["labels"]))
    assert ns["pieces_after"]["accuracy"] > ns["pieces_before"]["accuracy"]
    assert ns["trained"].global_step == 4


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_process_notebook_launches_two_processes_equal_to_one(tmp_path, monkeypatch):
    from _tolerances import DIST_LOSS_REL

    ns = _run("05_multi_process.ipynb", NOTEBOOKS, tmp_path, monkeypatch)
    result, single = ns["result"], ns["single"]
    assert result.output_dir.is_relative_to(tmp_path) and (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert len(result.train.peak_memory_mib_per_rank) == 2 and result.train.global_step == 4
    assert result.metrics["loss"] < result.metrics_before["loss"]
    assert len(ns["gaps"]) == 4 and max(ns["gaps"]) <= DIST_LOSS_REL  # 2 processes vs 1, same global batch
    assert abs(result.metrics["loss"] - single.metrics["loss"]) <= DIST_LOSS_REL * single.metrics["loss"]
    assert "missing.jsonl" in ns["failure"].message
    # the tensor-parallel cell: tp 2 (the BERT plan, LoRA split beside query / value) vs one process
    from _tolerances import TP_EXACT

    tp = ns["tp_result"]
    assert len(ns["tp_gaps"]) == 4 and max(ns["tp_gaps"]) <= TP_EXACT
    assert abs(tp.metrics["loss"] - single.metrics["loss"]) <= TP_EXACT * single.metrics["loss"]
    assert (tp.adapter_dir / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_process_notebook_cell_raises_one_error_when_a_worker_dies(tmp_path, monkeypatch):
    import os
    import signal
    import time

    import tunekit
    from tunekit.train.trainer import Trainer

    real_step = Trainer.train_step

    def dies_on_rank_1(self, window):  # the forked workers inherit the patch
        if os.environ.get("RANK") == "1" and self.scheduler.last_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_step(self, window)

    monkeypatch.setattr(Trainer, "train_step", dies_on_rank_1)
    start = time.monotonic()
    with pytest.raises(tunekit.DistributedError) as info:
        _run("05_multi_process.ipynb", NOTEBOOKS, tmp_path, monkeypatch)
    assert time.monotonic() - start < 60 + 30  # the job ends within a minute of the kill (plus start-up)
    assert info.value.rank == 1 and ("SIGKILL" in info.value.message or "died" in info.value.message)
