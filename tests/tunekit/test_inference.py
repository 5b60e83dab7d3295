"""`tunekit generate` on a chat adapter feeds the model the prompt ids training built.

The run's chat template is a ``.jinja`` file that writes ``{{ bos_token }}`` itself (as Llama 3's
does), and differs from the tokenizer's own. Oracle: the prompt written out by hand (one BOS, the
file's template), greedily continued by transformers' ``generate``.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from _tiny import tiny_tokenizer, write_rows
from _tiny_runs import save_tiny

from tunekit.cli import main
from tunekit.inference import load_adapted

# Differs from the tokenizer's own template: no newline after each turn.
CHAT_FILE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    (tmp / "chat.jinja").write_text(CHAT_FILE_TEMPLATE, encoding="utf-8")
    rows = [{"messages": [{"role": "user", "content": f"repeat {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ["cat", "dog", "sun", "red"]]
    cfg = {"model": {"name_or_path": str(save_tiny("llama", tmp / "llama"))},
           "adapter": {"method": "lora", "rank": 4, "alpha": 8},
           "data": {"train_files": [write_rows(tmp / "chat.jsonl", rows)], "format": "chat",
                    "chat_template": str(tmp / "chat.jinja")},
           "train": {"max_steps": 3, "batch_size": 4, "lr": 0.01},
           "output": {"dir": str(tmp / "run"), "eval_before": False}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["finetune", str(tmp / "run.yaml")]) == 0
    return tmp / "run" / "adapter"


def test_generate_continues_the_training_prompt(chat_run, capsys):
    capsys.readouterr()
    assert main(["generate", str(chat_run), "--prompt", "repeat cat", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    loaded = load_adapted(chat_run)
    tok = tiny_tokenizer()
    prompt = [tok.bos_token_id, *tok("<|user|>repeat cat<|end|><|assistant|>", add_special_tokens=False)["input_ids"]]
    assert loaded.prompt_ids("repeat cat") == prompt
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                         do_sample=False)
    assert printed == tok.decode(expected[0, len(prompt):], skip_special_tokens=True) + "\n"


def test_a_prompt_that_does_not_fit_the_format_is_one_line(chat_run, capsys):
    loaded = load_adapted(chat_run)
    with pytest.raises(ValueError, match="does not fit data.format 'chat'"):
        loaded.prompt_ids({"messages": "not a list"})


def test_generate_needs_one_input_per_prompt(capsys):
    assert main(["generate", "/no/such/adapter", "--prompt", "a", "--prompt", "b", "--input", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 --input for 2 --prompt" in err[0]
