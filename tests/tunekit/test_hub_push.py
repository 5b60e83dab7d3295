"""``push_to_hub`` against the Hub stand-in: one atomic commit of an explicit manifest, and the repo rules.

The stand-in (tests/support/hub_server.py) keeps every commit, so each test
checks the remote's history and files directly, not what tunekit reports.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _hub_runs import base_dir, finished_run, serving_base, shared_runs
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(shared_runs(tmp_path_factory))


@pytest.fixture
def hub(monkeypatch, run):
    with serving_base(monkeypatch, run) as server:
        yield server


def _push(run, repo="alice/tiny-lora", **kw):
    from tunekit.hub import push_to_hub

    return push_to_hub(run, repo, base_model=kw.pop("base_model", "tiny/llama"), **kw)


def _history(hub, repo, branch="main"):
    return [c.title for c in hub.repos[repo].history(branch)]


# The run saves its tokenizer (and chat template) beside the adapter; it goes along, as Trainer.push_to_hub does.
ADAPTER_FILES = {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
                 "tunekit_base.json", "tunekit_push.json", "loss_curve.png", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"}


def test_push_is_one_commit_of_the_manifest_into_a_new_private_repo(hub, run):
    result = _push(run)
    assert _history(hub, "alice/tiny-lora") == ["tunekit: lora adapter for tiny/llama", "initial commit"]
    assert hub.repos["alice/tiny-lora"].private is True
    files = hub.files("alice/tiny-lora")
    assert set(files) == ADAPTER_FILES  # no checkpoints, logs, config or metrics
    assert files["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert result.commit == hub.head("alice/tiny-lora") and result.created_repo
    assert files["loss_curve.png"].startswith(b"\x89PNG\r\n\x1a\n")


def test_pushed_files_name_the_hub_base_and_hold_no_local_path(hub, run):
    _push(run)
    files = hub.files("alice/tiny-lora")
    local = [str(run.parent), str(run.parent.parent), str(base_dir(run))]
    for name, content in files.items():
        if not name.endswith((".safetensors", ".png")):
            assert not any(p in content.decode() for p in local), name
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "tiny/llama"
    record = json.loads(files["tunekit_base.json"])
    assert record["model"]["name_or_path"] == "tiny/llama"
    assert record["data"]["train_files"] == ["causal_lm_train.jsonl"]
    local_record = json.loads((run / "adapter" / "tunekit_base.json").read_text(encoding="utf-8"))
    assert local_record["model"]["name_or_path"] == str(base_dir(run))  # the run folder is left as it was


def _save_sharded(folder, shard_kb):
    from _tiny import tiny_llama

    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(1)
    tiny_llama().save_pretrained(folder, max_shard_size=f"{shard_kb}KB")
    return sorted(p.name for p in folder.glob("model*.safetensors"))


def test_a_push_with_fewer_shards_deletes_the_orphans_in_the_same_commit(hub, tmp_path):
    from tunekit.hub import push_to_hub

    folder = tmp_path / "merged"
    first = _save_sharded(folder, 40)
    push_to_hub(folder, "alice/sharded", merged=True, base_model="tiny/llama")
    assert set(first) <= set(hub.files("alice/sharded")) and len(first) >= 3
    second = _save_sharded(folder, 80)
    assert len(second) < len(first)
    result = push_to_hub(folder, "alice/sharded", merged=True, base_model="tiny/llama")
    remote = hub.files("alice/sharded")
    assert sorted(n for n in remote if n.endswith(".safetensors")) == second
    assert set(result.deleted) == set(first) - set(second)
    assert len(hub.repos["alice/sharded"].history("main")) == 3  # initial + one commit per push
    index = json.loads(remote["model.safetensors.index.json"])
    assert set(index["weight_map"].values()) == set(second)


def _changed_adapter(run, folder):
    """A copy of the run's adapter with other weights (so a push of it changes the repo)."""
    shutil.copytree(run / "adapter", folder)
    state = {k: v * 2 for k, v in load_file(folder / "adapter_model.safetensors").items()}
    save_file(state, folder / "adapter_model.safetensors")
    return folder


def test_a_stale_parent_commit_fails_and_leaves_the_remote_unchanged(hub, run, monkeypatch, tmp_path):
    import tunekit.hub.push as push_module
    from tunekit.hub import PushError

    _push(run)
    validate = push_module._validate_card

    def concurrent_writer(api, text):  # another client commits between planning and our commit
        validate(api, text)
        hub.seed("alice/tiny-lora", {"notes.txt": b"written concurrently\n"}, title="concurrent")

    monkeypatch.setattr(push_module, "_validate_card", concurrent_writer)
    before = hub.files("alice/tiny-lora")
    with pytest.raises(PushError, match="changed while this push was planned"):
        _push(_changed_adapter(run, tmp_path / "adapter"))
    assert _history(hub, "alice/tiny-lora")[0] == "concurrent"
    assert hub.files("alice/tiny-lora") == {**before, "notes.txt": b"written concurrently\n"}


def test_a_foreign_repo_is_refused_without_force(hub, run):
    from tunekit.hub import PushError

    hub.seed("alice/theirs", {"pytorch_model.bin": b"\0pickle", "notes.txt": b"mine\n"})
    with pytest.raises(PushError, match="files tunekit did not write.*--force"):
        _push(run, "alice/theirs")
    assert set(hub.files("alice/theirs")) == {".gitattributes", "pytorch_model.bin", "notes.txt"}
    result = _push(run, "alice/theirs", force=True)
    remote = hub.files("alice/theirs")
    assert "notes.txt" in remote and "pytorch_model.bin" not in remote  # clashing weights go, the rest stays
    assert result.deleted == ["pytorch_model.bin"]


def test_a_new_revision_of_a_foreign_repo_is_allowed_and_main_is_untouched(hub, run):
    hub.seed("alice/theirs", {"notes.txt": b"mine\n"})
    main_before = hub.head("alice/theirs")
    _push(run, "alice/theirs", revision="tunekit")
    assert hub.head("alice/theirs") == main_before
    assert ADAPTER_FILES <= set(hub.files("alice/theirs", "tunekit"))


def test_another_base_model_is_refused_without_force(hub, run):
    from tunekit.hub import PushError

    hub.seed("tiny/llama-copy", base_dir(run))
    _push(run)
    with pytest.raises(PushError, match="base 'tiny/llama'"):
        _push(run, base_model="tiny/llama-copy")
    _push(run, base_model="tiny/llama-copy", force=True)
    assert json.loads(hub.files("alice/tiny-lora")["tunekit_push.json"])["base_model"] == "tiny/llama-copy"


def test_an_existing_card_is_merged_not_clobbered(hub, run):
    hub.seed("alice/tiny-lora", {"README.md": b"---\nlanguage: en\ntags:\n- mine\n---\n\nWritten by hand.\n"})
    _push(run)
    _push(run)  # a second push replaces tunekit's section, once
    card = hub.files("alice/tiny-lora")["README.md"].decode()
    assert "Written by hand." in card and card.count("<!-- tunekit:start -->") == 1
    assert "language: en" in card and "- mine" in card and "- tunekit" in card
    _push(run, overwrite_card=True)
    assert "Written by hand." not in hub.files("alice/tiny-lora")["README.md"].decode()


def test_an_existing_repo_keeps_its_visibility(hub, run):
    from tunekit.hub import PushError

    hub.create("alice/public")
    with pytest.raises(PushError, match="is public; tunekit never changes"):
        _push(run, "alice/public", private=True)
    _push(run, "alice/public")
    assert hub.repos["alice/public"].private is False
    _push(run, "alice/shared", private=False)
    assert hub.repos["alice/shared"].private is False


def test_a_broken_adapter_is_refused_before_anything_is_created(hub, run, tmp_path):
    from tunekit.adapter_check import AdapterCheckError

    broken = tmp_path / "adapter"
    shutil.copytree(run / "adapter", broken)
    state = load_file(broken / "adapter_model.safetensors")
    key = sorted(state)[0]
    state[key][0, 0] = float("nan")
    save_file(state, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterCheckError, match=f"{key}.*NaN"):
        _push(broken)
    assert "alice/tiny-lora" not in hub.repos


def test_a_base_model_that_does_not_fit_or_exist_is_refused(hub, run, tmp_path):
    from _tiny import tiny_llama
    from tunekit.adapter_check import AdapterCheckError
    from tunekit.hub import PushError

    tiny_llama(hidden_size=64).save_pretrained(tmp_path / "wide")
    hub.seed("tiny/wide-llama", tmp_path / "wide")
    with pytest.raises(AdapterCheckError, match="has shape"):
        _push(run, base_model="tiny/wide-llama")
    with pytest.raises(PushError, match="'tiny/missing' was not found on the Hub"):
        _push(run, base_model="tiny/missing")
    assert "alice/tiny-lora" not in hub.repos


def test_a_base_without_hub_id_needs_base_model_or_push_base(hub, run):
    from tunekit.hub import PushError, push_to_hub

    record = json.loads((run / "adapter" / "tunekit_base.json").read_text(encoding="utf-8"))
    with pytest.raises(PushError, match="has no Hub id.*--base-model HUB_ID.*--push-base"):
        push_to_hub(run, "alice/local-base")
    result = push_to_hub(run, "alice/local-base", push_base=True)
    assert result.base_push.repo_id == "alice/local-base-base"
    base_files = hub.files("alice/local-base-base")
    local = load_file(f"{record['model']['name_or_path']}/model.safetensors")
    pushed = load_file_bytes(base_files["model.safetensors"])
    assert local.keys() == pushed.keys() and all(torch.equal(local[k], pushed[k]) for k in local)
    config = json.loads(hub.files("alice/local-base")["adapter_config.json"])
    assert config["base_model_name_or_path"] == "alice/local-base-base"


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def test_a_large_model_goes_to_a_branch_and_is_promoted_in_one_commit(hub, tmp_path):
    from tunekit.hub import promote_branch, push_to_hub

    folder = tmp_path / "merged"
    _save_sharded(folder, 40)
    main_before = hub.head("tiny/llama")
    result = push_to_hub(folder, "alice/big", merged=True, base_model="tiny/llama", large_bytes=0)
    assert result.branch_upload and result.revision.startswith("tunekit-upload-")
    assert "--promote " + result.revision in result.summary()
    assert set(hub.files("alice/big")) == {".gitattributes"}  # main untouched
    branch_files = hub.files("alice/big", result.revision)
    promoted = promote_branch("alice/big", result.revision)
    assert hub.files("alice/big") == branch_files
    assert promoted.commit == hub.head("alice/big") and len(hub.repos["alice/big"].history("main")) == 2
    assert hub.head("tiny/llama") == main_before


def test_a_prompt_adapter_initialised_from_text_names_no_local_tokenizer(hub, run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunekit.adapters import PromptConfig, inject_adapters, save_adapters

    base = base_dir(run)
    model = AutoModelForCausalLM.from_pretrained(base)
    inject_adapters(model, PromptConfig(num_virtual_tokens=3, init="text", init_text="red cat",
                                        tokenizer_name_or_path=str(base)))
    folder = tmp_path / "adapter"
    save_adapters(model, folder)
    shutil.copy(run / "adapter" / "tunekit_base.json", folder)
    assert str(base) in (folder / "adapter_config.json").read_text(encoding="utf-8")
    _push(folder, "alice/prompt")
    files = hub.files("alice/prompt")
    assert json.loads(files["adapter_config.json"])["tokenizer_name_or_path"] == "tiny/llama"
    assert str(base) not in files["README.md"].decode() and "| tokenizer_name_or_path | tiny/llama |" in \
        files["README.md"].decode()
