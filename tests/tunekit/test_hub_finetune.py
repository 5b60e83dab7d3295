"""``hub.push: true`` in a finetune config: checked before training, pushed after the final save."""

from __future__ import annotations

import json

import pytest
import yaml
from _hub_runs import SENTINEL
from _tiny_runs import run_config
from hub_server import HubServer, use_in_process

from tunekit.cli import main


@pytest.fixture
def hub(monkeypatch):
    with HubServer(token=SENTINEL) as server:
        use_in_process(monkeypatch, server)
        yield server


def _config(tmp_path, **hub_cfg) -> dict:
    cfg = run_config(tmp_path, "causal_lm", steps=2)
    cfg["hub"] = {"push": True, "repo_id": "alice/from-finetune", **hub_cfg}
    return cfg


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


def test_no_token_stops_the_run_before_training(hub, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    cfg = _config(tmp_path)
    assert main(["finetune", _write(tmp_path, cfg)]) == 2  # refused before anything runs, like any config that cannot run
    assert "no Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "run-causal_lm-lora").exists()


def test_a_token_is_never_a_config_field(tmp_path):
    from tunekit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="unknown key hub.token"):
        load_config(_config(tmp_path, token=SENTINEL))


@pytest.mark.slow  # a real (tiny) training run
def test_finetune_pushes_the_adapter_and_the_merged_model_after_saving(hub, tmp_path, capsys):
    cfg = _config(tmp_path, base_model="tiny/llama", private=False)  # saves the tiny base to tiny-llama/
    cfg["output"]["save_merged"] = True
    path = _write(tmp_path, cfg)
    hub.seed("tiny/llama", tmp_path / "tiny-llama")
    assert main(["finetune", path]) == 0
    out = capsys.readouterr().out
    assert f"pushed 9 files to {hub.url}/alice/from-finetune" in out
    assert f"to {hub.url}/alice/from-finetune-merged" in out
    card = hub.files("alice/from-finetune")["README.md"].decode()
    assert "## Hardware and time" in card and "| optimizer steps | 2 |" in card and "| hardware | CPU (" in card
    assert hub.repos["alice/from-finetune"].private is False  # hub.private: false was set explicitly
    merged = hub.files("alice/from-finetune-merged")
    local = tmp_path / "run-causal_lm-lora" / "merged" / "model.safetensors"
    assert merged["model.safetensors"] == local.read_bytes()


@pytest.mark.slow  # a real (tiny) training run
def test_a_failed_push_keeps_the_run_and_says_how_to_retry(hub, tmp_path, capsys):
    cfg = _config(tmp_path, base_model="tiny/llama")
    path = _write(tmp_path, cfg)
    assert main(["finetune", path]) == 1  # tiny/llama is not on this Hub yet
    err = capsys.readouterr().err
    run = tmp_path / "run-causal_lm-lora"
    retry = f"tunekit push {run} --repo alice/from-finetune --base-model tiny/llama"
    assert f"training finished and is saved; the Hub push failed, retry with `{retry}`" in err
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "results.json").is_file()
    assert "alice/from-finetune" not in hub.repos
    hub.seed("tiny/llama", tmp_path / "tiny-llama")
    assert main(retry.split()[1:]) == 0
    assert "adapter_model.safetensors" in hub.files("alice/from-finetune")


@pytest.mark.slow  # a real (tiny) training run
def test_a_from_config_base_is_pushed_beside_the_adapter(hub, tmp_path):
    import tunekit

    cfg = _config(tmp_path)
    cfg["model"]["from_config"] = True
    result = tunekit.finetune(cfg)
    base = hub.files("alice/from-finetune-base")
    assert base["model.safetensors"] == (result.output_dir / "base" / "model.safetensors").read_bytes()
    config = json.loads(hub.files("alice/from-finetune")["adapter_config.json"])
    assert config["base_model_name_or_path"] == "alice/from-finetune-base"
