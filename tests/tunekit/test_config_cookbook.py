"""Every cookbook recipe loads and validates (no download), and the set covers the promised models/methods."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunekit.config import load_config, task_for
from tunekit.models import resolve_source

COOKBOOK = Path(__file__).resolve().parents[2] / "cookbook"
RECIPES = sorted(COOKBOOK.glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_validates_and_its_local_files_exist(recipe, monkeypatch):
    monkeypatch.chdir(COOKBOOK.parent)  # recipe paths are relative to the repository root
    cfg = load_config(recipe)
    for path in [*(cfg.data.train_files or []), *(cfg.data.eval_files or [])]:
        assert Path(path).is_file(), f"{recipe.name}: {path} missing"
    for source in (cfg.model.name_or_path, cfg.model.tokenizer):
        if source and source.startswith("pkg:"):
            assert Path(resolve_source(source)).is_dir()
    assert cfg.output.dir.parts[0] == "runs"


def test_recipes_cover_models_and_methods():
    cfgs = [load_config(r) for r in RECIPES]
    names = " ".join((c.model.name_or_path or c.model.model_type or "").lower() for c in cfgs)
    for family in ("llama", "qwen2.5", "qwen3", "mistral", "gemma", "gpt2", "bert", "t5", "minilm"):
        assert family in names, family
    methods = {c.adapter.method for c in cfgs}
    assert methods >= {"lora", "prefix", "prompt", "bottleneck"}
    assert any(c.model.quantization and c.model.quantization.bits == 4 for c in cfgs)  # QLoRA
    assert {task_for(c) for c in cfgs} == {"causal_lm", "seq_cls", "seq2seq"}
