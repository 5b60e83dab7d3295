"""The model card: it parses with ``huggingface_hub.ModelCard.load`` and says what the issue asks, no more."""

from __future__ import annotations

import json

import pytest
from _hub_runs import SENTINEL, base_dir, finished_run, shared_runs
from huggingface_hub import ModelCard
from hub_server import HubServer, use_in_process

from tunekit.hub.card import CardSpec, RunFacts, build_card, card_data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = shared_runs(tmp_path_factory)
    return {"lora": finished_run(root, save_merged=True), "bottleneck": finished_run(root, method="bottleneck")}


@pytest.fixture
def hub(monkeypatch, runs):
    with HubServer(token=SENTINEL) as server:
        use_in_process(monkeypatch, server)
        readme = b"---\nlicense: apache-2.0\n---\n# tiny llama\n"
        server.seed("tiny/llama", {**_folder(base_dir(runs["lora"])), "README.md": readme})
        server.seed("tiny/no-card", base_dir(runs["lora"]))
        yield server


def _folder(path):
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def _pushed_card(hub, repo, tmp_path) -> ModelCard:
    path = tmp_path / f"{repo.replace('/', '_')}.md"
    path.write_bytes(hub.files(repo)["README.md"])
    return ModelCard.load(path)


def test_an_adapter_card_has_the_metadata_of_a_peft_adapter(hub, runs, tmp_path):
    from tunekit.hub import push_to_hub

    push_to_hub(runs["lora"], "alice/card", base_model="tiny/llama")
    card = _pushed_card(hub, "alice/card", tmp_path)
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["base_model"] == "tiny/llama"
    assert meta["tags"] == ["lora", "tunekit", "base_model:adapter:tiny/llama"]
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"  # copied from the base
    assert "datasets" not in meta  # local files are not Hub datasets
    results = json.loads((runs["lora"] / "results.json").read_text(encoding="utf-8"))
    reported = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert reported == pytest.approx({k: results["after"][k] for k in ("loss", "perplexity")}, rel=1e-6)
    assert "![Training loss](loss_curve.png)" in card.text and "| rank | 4 |" in card.text
    assert f"| loss | {results['before']['loss']:.4f} | {results['after']['loss']:.4f} |" in card.text


def test_the_license_is_never_invented_and_a_local_base_is_never_named(hub, runs, tmp_path):
    from tunekit.hub import push_to_hub

    push_to_hub(runs["lora"], "alice/no-license", base_model="tiny/no-card")
    assert "license" not in _pushed_card(hub, "alice/no-license", tmp_path).data.to_dict()
    result = push_to_hub(runs["lora"], "alice/merged", merged=True)  # the base is a local folder
    meta = _pushed_card(hub, "alice/merged", tmp_path).data.to_dict()
    assert "base_model" not in meta and meta["library_name"] == "transformers"
    assert any("has no Hub id" in note for note in result.notes)
    assert str(base_dir(runs["lora"])) not in hub.files("alice/merged")["README.md"].decode()


def test_a_method_peft_cannot_load_is_a_tunekit_library_card(hub, runs, tmp_path):
    from tunekit.hub import push_to_hub

    push_to_hub(runs["bottleneck"], "alice/bottleneck", base_model="tiny/llama")
    card = _pushed_card(hub, "alice/bottleneck", tmp_path)
    assert card.data.library_name == "tunekit" and card.data.tags[0] == "adapter"
    assert "from peft import" not in card.text and "from tunekit.inference import load_adapted" in card.text


def _spec(**kw) -> CardSpec:
    fields = dict(repo_id="alice/x", kind="adapter", base_model="org/base", task="causal_lm", method_tag="lora",
                  adapter={"method": "lora", "rank": 8}, peft_format=True)
    return CardSpec(**{**fields, **kw})


@pytest.mark.parametrize("adapter, model, tag", [
    ({"method": "lora"}, {}, "lora"),
    ({"method": "lora", "use_dora": True}, {}, "dora"),
    ({"method": "lora"}, {"quantization": {"bits": 4}}, "qlora"),
    ({"method": "prefix"}, {}, "prefix-tuning"),
    ({"method": "prompt"}, {}, "prompt-tuning"),
    ({"method": "bottleneck"}, {}, "adapter"),
])
def test_the_method_tag_is_the_hub_name_of_the_method(adapter, model, tag):
    from tunekit.hub.card import method_tag

    assert method_tag(adapter, model) == tag


@pytest.mark.parametrize("task, pipeline", [("causal_lm", "text-generation"), ("seq_cls", "text-classification"),
                                            ("seq2seq", "text2text-generation")])
def test_the_pipeline_tag_follows_the_task(task, pipeline):
    assert card_data(_spec(task=task)).pipeline_tag == pipeline


def test_datasets_are_listed_only_when_they_are_hub_ids():
    hub_data = RunFacts(config={"data": {"dataset": "tatsu-lab/alpaca"}})
    local_data = RunFacts(config={"data": {"train_files": ["/home/me/train.jsonl"]}})
    assert card_data(_spec(facts=hub_data)).datasets == ["tatsu-lab/alpaca"]
    assert card_data(_spec(facts=local_data)).datasets is None
    card = build_card(_spec(facts=local_data))
    assert "| source | train.jsonl |" in card.text and "/home/me" not in str(card)


def test_a_merged_card_loads_with_plain_transformers_and_names_no_peft():
    card = build_card(_spec(kind="merged", peft_format=False))
    assert card.data.library_name == "transformers" and "base_model:adapter:org/base" not in card.data.tags
    assert 'AutoModelForCausalLM.from_pretrained("alice/x")' in card.text and "PeftModel" not in card.text
