"""`tunekit generate` options, streaming, prompt files and `tunekit chat` on a chat adapter trained with a
named template. Oracles: transformers' ``generate`` on prompts rendered by ``apply_chat_template`` with
the shipped template, the same seed for sampling, and plain string cuts for stops."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
import yaml
from _tiny import write_rows
from _tiny_runs import save_tiny

from tunekit.cli import main
from tunekit.data.templates import named_template
from tunekit.generation import GenerationOptions, generate_text
from tunekit.inference import load_adapted, predict


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chatml")
    rows = [{"conversations": [{"from": "human", "value": f"repeat {w}"}, {"from": "gpt", "value": f"{w} {w}"}]}
            for w in ["cat", "dog", "sun", "red"]]
    cfg = {"model": {"name_or_path": str(save_tiny("llama", tmp / "llama"))},
           "adapter": {"method": "lora", "rank": 4, "alpha": 8},
           "data": {"train_files": [write_rows(tmp / "chat.jsonl", rows)], "format": "chat",
                    "chat_template": "chatml", "system": "Repeat twice."},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 0.01},
           "output": {"dir": str(tmp / "run"), "eval_before": False}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["finetune", str(tmp / "run.yaml")]) == 0
    return tmp / "run" / "adapter"


def _rendered(loaded, messages):
    text = loaded.tokenizer.apply_chat_template(messages, chat_template=named_template("chatml"), tokenize=False,
                                                add_generation_prompt=True)
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf(loaded, ids, **kw):
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = loaded.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                    pad_token_id=loaded.tokenizer.pad_token_id, **kw)
    return loaded.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_prompt_has_the_runs_system_and_template_and_system_can_be_replaced(chat_run):
    loaded = load_adapted(chat_run)
    user = {"role": "user", "content": "repeat cat"}
    assert loaded.prompt_ids("repeat cat") == _rendered(loaded, [{"role": "system", "content": "Repeat twice."}, user])
    assert loaded.prompt_ids("repeat cat", system="Other.") == \
        _rendered(loaded, [{"role": "system", "content": "Other."}, user])
    # the template went into the adapter's tokenizer, for transformers / vLLM users
    assert loaded.tokenizer.chat_template == named_template("chatml")


def test_sampling_options_are_transformers_generate_arguments(chat_run):
    loaded = load_adapted(chat_run)
    ids = loaded.prompt_ids("repeat dog")
    options = GenerationOptions(max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3)
    torch.manual_seed(3)
    ours = generate_text(loaded, ids, options)
    torch.manual_seed(3)
    expected = _hf(loaded, ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, top_k=20,
                   repetition_penalty=1.3, eos_token_id=loaded.model.generation_config.eos_token_id)
    assert ours == expected.split("<|im_end|>")[0]


def test_stop_strings_cut_the_reply_and_streaming_prints_what_is_returned(chat_run):
    loaded = load_adapted(chat_run)
    ids = loaded.prompt_ids("repeat sun")
    full = generate_text(loaded, ids, GenerationOptions(max_new_tokens=12))
    stop = full[3:5] if len(full) > 5 else None
    if stop is None:
        pytest.fail(f"the tiny model's reply is too short to cut: {full!r}")
    stream = io.StringIO()
    cut = generate_text(loaded, ids, GenerationOptions(max_new_tokens=12, stop=[stop]), stream=stream)
    assert cut == full[: full.index(stop)]
    assert stream.getvalue() == cut + "\n"


def test_prompt_file_prints_one_json_object_per_prompt(chat_run, tmp_path, capsys):
    lines = ['"repeat cat"', json.dumps({"prompt": "repeat dog", "system": "Other."}),
             json.dumps({"conversations": [{"from": "human", "value": "repeat red"}]})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", str(chat_run), "--file", str(tmp_path / "p.jsonl"), "--max-new-tokens", "4"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    loaded = load_adapted(chat_run)
    expected = [predict(loaded, ["repeat cat"], max_new_tokens=4)[0],
                predict(loaded, ["repeat dog"], max_new_tokens=4, system="Other.")[0],
                predict(loaded, [{"conversations": [{"from": "human", "value": "repeat red"}]}], max_new_tokens=4)[0]]
    assert [p["output"] for p in printed] == expected
    assert printed[0]["prompt"] == "repeat cat"


def test_bad_generation_options_are_one_line(chat_run, capsys):
    assert main(["generate", str(chat_run), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: generate: --top-p must be in (0, 1]"
    assert main(["generate", str(chat_run)]) == 2


@pytest.mark.slow
def test_chat_is_multi_turn_with_the_runs_template(chat_run):
    script = "repeat cat\nrepeat dog\n/reset\nrepeat dog\n"
    out = subprocess.run([sys.executable, "-m", "tunekit", "chat", str(chat_run), "--max-new-tokens", "4"],
                         input=script, capture_output=True, text=True, timeout=300, encoding="utf-8")
    assert out.returncode == 0, out.stderr[-2000:]
    replies = [part.split("\nuser> ")[0] for part in out.stdout.split("assistant> ")[1:]]
    loaded = load_adapted(chat_run)
    system = [{"role": "system", "content": "Repeat twice."}]
    first = _hf(loaded, _rendered(loaded, [*system, {"role": "user", "content": "repeat cat"}]), max_new_tokens=4,
                do_sample=False, eos_token_id=loaded.stop_ids()).split("<|im_end|>")[0]
    history = [*system, {"role": "user", "content": "repeat cat"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "repeat dog"}]
    second = _hf(loaded, _rendered(loaded, history), max_new_tokens=4, do_sample=False,
                 eos_token_id=loaded.stop_ids()).split("<|im_end|>")[0]
    fresh = _hf(loaded, _rendered(loaded, [*system, {"role": "user", "content": "repeat dog"}]), max_new_tokens=4,
                do_sample=False, eos_token_id=loaded.stop_ids()).split("<|im_end|>")[0]
    assert replies[:3] == [first, second, fresh]
    assert "(history cleared)" in out.stdout
