"""Every cookbook recipe loads and validates (no download), names its purpose, hardware and command, runs
offline from a shipped config snapshot, fits its hardware by ``tunekit estimate``, and cookbook/README.md is
the table ``cookbook/make_readme.py`` generates from them (regenerated here and compared, as docs/config.md)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunekit.config import distributed_options, load_config, task_for
from tunekit.distributed.checks import config_problem
from tunekit.estimate import Layout
from tunekit.estimate.sources import snapshot_folder
from tunekit.models import resolve_source

ROOT = Path(__file__).resolve().parents[2]
COOKBOOK = ROOT / "cookbook"
RECIPES = sorted(COOKBOOK.glob("*.yaml"))


def _load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


make_readme = _load_script(COOKBOOK / "make_readme.py", "cookbook_make_readme")


@pytest.fixture(scope="module")
def rows():
    """Every recipe's estimate, computed once for the module (offline: the Hub ids are the shipped snapshots)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(ROOT)
        return {p.name: make_readme.estimate(make_readme.read_recipe(p)) for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_validates_and_its_local_files_exist(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repository root
    cfg = load_config(recipe)
    for path in [*(cfg.data.train_files or []), *(cfg.data.eval_files or [])]:
        assert Path(path).is_file(), f"{recipe.name}: {path} missing"
    for source in (cfg.model.name_or_path, cfg.model.tokenizer):
        if source and source.startswith("pkg:"):
            assert Path(resolve_source(source)).is_dir()
    assert cfg.output.dir.parts[0] == "runs" and cfg.output.dir.name == recipe.stem


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_header_matches_its_config_and_the_strategy_accepts_it(recipe):
    parsed = make_readme.read_recipe(recipe)
    assert parsed.purpose and len(parsed.purpose) <= 120, f"{recipe.name}: one short purpose line"
    nproc = parsed.hardware.gpus
    assert parsed.command == f"tunekit finetune cookbook/{recipe.name}" + (f" --nproc {nproc}" if nproc > 1 else "")
    cfg = parsed.config
    quant = cfg.model.quantization
    problem = config_problem(distributed_options(cfg), cfg.adapter.method, quant and f"{quant.bits}bit",
                             fused_cross_entropy=cfg.train.fused_cross_entropy)
    assert problem is None, f"{recipe.name}: {problem}"
    name = cfg.model.name_or_path
    if name and not name.startswith("pkg:"):  # a Hub id: estimated offline from its shipped config.json
        assert snapshot_folder(name) is not None, f"{recipe.name}: no cookbook/models/{name.replace('/', '--')}"


@pytest.mark.slow  # the module's estimates of every recipe: ~30-50 s of CPU, once
@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_fits_its_hardware(recipe, rows):
    row = rows[recipe.name]
    assert row.fits, f"{recipe.name}: {row.problem} ({row.recipe.hardware.label}, {row.label})"
    assert 0 < row.peak <= row.usable


@pytest.mark.slow
def test_cookbook_readme_is_generated_from_the_recipes(rows):
    text = make_readme.render(list(rows.values()))
    assert (COOKBOOK / "README.md").read_text(encoding="utf-8") == text, \
        "cookbook/README.md is stale: run .venv/bin/python cookbook/make_readme.py"
    body = [line for line in text.splitlines() if line.startswith("| [`")]
    assert [line.split("`")[1] for line in body] == [r.name for r in RECIPES]


@pytest.mark.slow
def test_the_table_shows_what_tunekit_estimate_prints(rows, capsys, monkeypatch):
    # the same numbers as the CLI: its JSON row of the recipe's layout, on the recipe's hardware
    from tunekit.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    row = rows["llama3.1_70b_lora_fsdp_offload.yaml"]
    assert main(["estimate", "cookbook/llama3.1_70b_lora_fsdp_offload.yaml", "--gpus", "8", "--gpu-memory", "24GB",
                 "--host-memory", "1TB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    cli = next(r for r in plan["rows"] if r["layout"] == {"strategy": "fsdp", "cpu_offload": True})
    assert row.peak == cli["peak"] and row.usable == int(24 * 2**30 * 0.9)
    assert "| 8 x 24 GB GPUs, 1 TB host | FSDP2 ZeRO-3 + CPU offload |" in make_readme.render([row])


def _recipe(tmp_path: Path, header: str, source: str = "llama3_qlora.yaml") -> Path:
    body = "".join(line for line in (COOKBOOK / source).read_text(encoding="utf-8").splitlines(keepends=True)
                   if not line.startswith("#"))
    path = tmp_path / "probe.yaml"
    path.write_text(header + body, encoding="utf-8")
    return path


def test_a_recipe_that_does_not_fit_its_hardware_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    header = "# QLoRA 8B on a small GPU\n# hardware: 1 GPU x 8GB\n# run: tunekit finetune cookbook/probe.yaml\n"
    text, misfits = make_readme.build([_recipe(tmp_path, header)])
    assert misfits == [misfits[0]] and misfits[0].startswith("probe.yaml: does not fit 1 x 8 GB GPU under single GPU")
    assert "GiB usable" in misfits[0] and "| [`probe.yaml`]" in text


@pytest.mark.parametrize(("header", "needle"), [
    ("# hardware: 1 GPU x 24GB\n# run: tunekit finetune cookbook/probe.yaml\n", "must start with a one-line purpose"),
    ("# purpose\n# run: tunekit finetune cookbook/probe.yaml\n", "needs one '# hardware: ...' line"),
    ("# purpose\n# hardware: a big one\n# run: tunekit finetune cookbook/probe.yaml\n", "is not '<N> GPU(s) x <size>"),
    ("# purpose\n# hardware: 1 GPU x 24GB\n# run: tunekit finetune cookbook/other.yaml\n", "should start with"),
    ("# purpose\n# hardware: 8 GPUs x 24GB\n# run: tunekit finetune cookbook/probe.yaml\n", "write --nproc 8"),
    ("# purpose\n# hardware: 8 GPUs x 24GB\n# run: tunekit finetune cookbook/probe.yaml --nproc 8\n",
     "strategy none does not suit 8"),
])
def test_a_bad_header_is_one_line_naming_the_recipe(header, needle, tmp_path):
    with pytest.raises(ValueError, match="^probe.yaml: ") as info:
        make_readme.read_recipe(_recipe(tmp_path, header))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_layout_follows_the_distributed_section_and_a_tp_size_where_there_is_one():
    # a tensor-parallel strategy's recipes (another branch adds tp / fsdp_tp) map onto the planner's TP rows
    section = SimpleNamespace(strategy="fsdp_tp", cpu_offload=False, reshard_after_forward=True, tp_size=2)
    assert make_readme.recipe_layout(SimpleNamespace(distributed=section)) == Layout("fsdp_tp", tp_size=2)
    older = SimpleNamespace(strategy="deepspeed", cpu_offload=True, reshard_after_forward=False)  # no tp_size field
    assert make_readme.recipe_layout(SimpleNamespace(distributed=older)) == Layout("deepspeed", cpu_offload=True)


def test_the_script_refuses_to_write_when_a_recipe_does_not_fit(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cookbook"
    folder.mkdir()
    shutil.copy(COOKBOOK / "make_readme.py", folder)
    _recipe(folder, "# QLoRA 8B on a small GPU\n# hardware: 1 GPU x 8GB\n# run: tunekit finetune cookbook/probe.yaml\n")
    script = _load_script(folder / "make_readme.py", "cookbook_make_readme_copy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert script.main([]) == 1
    assert "probe.yaml: does not fit" in capsys.readouterr().err and not (folder / "README.md").exists()


def test_recipes_cover_models_methods_and_hardware():
    cfgs = [load_config(r) for r in RECIPES]
    names = " ".join((c.model.name_or_path or c.model.model_type or "").lower() for c in cfgs)
    for family in ("llama-3.2-1b", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5", "qwen3", "mistral-7b", "gemma-2",
                   "gpt2", "bert-base", "roberta", "t5-", "flan-t5", "minilm"):
        assert family in names, family
    methods = {("dora" if getattr(c.adapter, "use_dora", False) else c.adapter.method)
               + ("+4bit" if c.model.quantization else "") for c in cfgs}
    assert methods >= {"lora", "lora+4bit", "dora", "prefix", "prompt", "bottleneck"}
    assert {task_for(c) for c in cfgs} == {"causal_lm", "seq_cls", "seq2seq"}
    layouts = {(c.distributed.strategy, c.distributed.cpu_offload) for c in cfgs}
    assert layouts >= {("none", False), ("ddp", False), ("fsdp", False), ("deepspeed", False), ("fsdp", True),
                       ("deepspeed", True)}
    offloaded = [c.model.name_or_path for c in cfgs if c.distributed.cpu_offload]
    assert all("70B" in name for name in offloaded) and len(offloaded) == 2
