"""Data files, templates and run records are read as UTF-8 whatever the locale says.

A subprocess runs under ``LC_ALL=C`` with Python's UTF-8 mode and locale coercion off, so
``open()`` without an encoding would use ASCII there (the script checks that it would). It
builds datasets from every text file type and a ``.jinja`` chat template holding non-ASCII
text, and reads an adapter's ``tunekit_base.json`` written as raw UTF-8. Oracle: the texts
written here, and the same computation in this (UTF-8) process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _bpe import bpe_tokenizer
from _tiny import tiny_llama, write_rows

from tunekit.adapters import LoRAConfig, inject_adapters, save_adapters
from tunekit.api import BASE_INFO_NAME
from tunekit.data import DataConfig

TEXTS = ["café au lait", "日本語のテキスト", "emoji 🙂 ok", "naïve — “quoted”"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} » {{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}assistant » {% endif %}")

SCRIPT = r'''
import json, locale, sys
assert locale.getpreferredencoding(False).lower() in ("ascii", "ansi_x3.4-1968", "us-ascii"), \
    locale.getpreferredencoding(False)
from _bpe import bpe_tokenizer
from tunekit.data import DataConfig, build_dataset
from tunekit.inference import Loaded, _base_info  # what load_adapted reads, without loading the model
from pathlib import Path
spec = json.loads(sys.argv[1])
tok = bpe_tokenizer()
out = {"texts": [], "prompt_ids": None}
for path in spec["text_files"]:
    bundle = build_dataset(DataConfig(train_files=[path]), tok)
    out["texts"].append([tok.decode(r["input_ids"], skip_special_tokens=True) for r in bundle.train])
chat = build_dataset(DataConfig(train_files=[spec["chat_file"]], format="chat", chat_template=spec["template"]), tok)
out["chat_ids"] = chat.train[0]["input_ids"]
_, task, _, data = _base_info(Path(spec["adapter"]), None)
out["prompt_ids"] = Loaded(None, tok, task, data).prompt_ids(spec["prompt"])
print(json.dumps(out))
'''


def _adapter(tmp_path: Path, data: DataConfig) -> Path:
    """An adapter folder whose record holds raw (unescaped) UTF-8 text."""
    model = tiny_llama()
    inject_adapters(model, LoRAConfig(rank=2))
    save_adapters(model, tmp_path / "adapter")
    record = {"model": {"name_or_path": str(tmp_path)}, "task": "causal_lm", "label_names": None,
              "data": data.model_dump(mode="json")}
    (tmp_path / "adapter" / BASE_INFO_NAME).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return tmp_path / "adapter"


@pytest.mark.slow
def test_non_ascii_files_and_templates_under_the_c_locale(tmp_path):
    rows = [{"text": t} for t in TEXTS]
    text_files = [write_rows(tmp_path / f"t.{ext}", rows) for ext in ("jsonl", "json", "csv", "txt")]
    (tmp_path / "chat.jinja").write_text(TEMPLATE, encoding="utf-8")
    messages = [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[2]}]
    chat_file = write_rows(tmp_path / "chat.jsonl", [{"messages": messages}])
    data = DataConfig(train_files=[chat_file], format="instruction",
                      prompt_template_no_input="Frage » {prompt}\nAntwort:",
                      prompt_template="Frage » {prompt} {input}\nAntwort:")
    spec = {"text_files": text_files, "chat_file": chat_file, "template": str(tmp_path / "chat.jinja"),
            "adapter": str(_adapter(tmp_path, data)), "prompt": TEXTS[1]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONUTF8", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0",
               PYTHONPATH=str(Path(__file__).parents[1] / "support"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          encoding="utf-8", env=env, cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["texts"] == [TEXTS] * len(text_files)
    tok = bpe_tokenizer()
    rendered = f"user » {TEXTS[0]}<|end|>assistant » {TEXTS[2]}<|end|>"
    assert out["chat_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert out["prompt_ids"] == tok(f"Frage » {TEXTS[1]}\nAntwort:")["input_ids"]
