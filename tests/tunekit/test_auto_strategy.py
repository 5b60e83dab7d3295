"""Where ``distributed.strategy: auto`` resolves: --print-config, the --nproc launcher, one process.

The oracle for the chosen strategy is the planner's rule on this machine's devices (a tiny
model fits everywhere: one process -> none, two CPU processes -> ddp); "nothing fits" is
forced with devices of a few KiB, and must stop the launcher before any process starts.
"""

from __future__ import annotations

import pytest
import yaml
from _tiny_runs import run_config

import tunekit.distributed.launch as launch_module
from tunekit.auto_strategy import resolve_auto, start_strategy
from tunekit.cli import main
from tunekit.config import load_config
from tunekit.estimate.planner import Devices


@pytest.fixture()
def auto_yaml(tmp_path):
    cfg = run_config(tmp_path, "causal_lm", "lora", steps=1)
    cfg["distributed"] = {"strategy": "auto"}
    path = tmp_path / "auto.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_print_config_shows_what_auto_resolves_to(auto_yaml, capsys):
    assert main(["finetune", str(auto_yaml), "--print-config"]) == 0
    out = capsys.readouterr().out
    first, rest = out.split("\n", 1)
    assert first.startswith("# distributed.strategy auto -> none: LoRA on tiny-llama") and "1 CPU process" in first
    assert load_config(yaml.safe_load(rest)).distributed.strategy == "none"  # the printed config loads back
    assert main(["finetune", str(auto_yaml), "--print-config", "--nproc", "2"]) == 0
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert first.startswith("# distributed.strategy auto -> ddp:") and "on 2 CPU processes" in first
    assert yaml.safe_load(rest)["distributed"]["strategy"] == "ddp"


@pytest.mark.slow  # the advice plans each fix again (~5 s)
def test_launcher_refuses_before_any_process_starts_when_nothing_fits(auto_yaml, monkeypatch, capsys):
    tiny = classmethod(lambda cls, headroom=0.1, *, processes=None, per_node=None:
                       cls(processes or 1, 4096, None, per_node or 1, "cpu", headroom))
    monkeypatch.setattr(Devices, "detect", tiny)

    def no_launch(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launch_module, "launch_command", no_launch)
    assert main(["finetune", str(auto_yaml), "--nproc", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("config error: distributed.strategy=auto: nothing fits: LoRA on tiny-llama")
    assert "on 2 CPU processes of 4.00 KiB" in err


def test_one_process_resolves_to_none_and_joins_that_strategy(auto_yaml):
    cfg = load_config(auto_yaml)
    resolved, strategy, line = start_strategy(cfg)
    try:
        assert strategy.name == "none" and resolved.distributed.strategy == "none"
        assert line == resolve_auto(cfg).line and line.startswith("distributed.strategy auto -> none")
        assert cfg.distributed.strategy == "auto"  # the caller's config is left as it was
    finally:
        strategy.close()


def test_a_config_without_auto_is_left_alone(auto_yaml):
    cfg = load_config(auto_yaml, ["distributed.strategy=none"])
    assert resolve_auto(cfg).cfg is cfg and resolve_auto(cfg).line is None
