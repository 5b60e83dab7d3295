"""Load pushed repos the way their model cards say, in a fresh process, and save what the models compute.

Run as ``python hub_load_check.py OUT JOBS`` with ``HF_ENDPOINT`` pointing at the Hub stand-in
(``hub_server.child_env``): huggingface_hub reads it when first imported, and transformers and PEFT
download through it. JOBS is a JSON list of ``{"repo": id, "input_ids": [[...]]}``. For each repo
every ```python block of its README.md is executed as a user would paste it; the ``model`` it builds
is run on ``input_ids`` and its logits (and adapter tensors) go to the safetensors file OUT under
``<repo>|<block>|logits`` and ``<repo>|<block>|state|<key>``; the block's first import names the
library (``<block>`` is tunekit, peft or transformers).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import save_file


def _library(code: str) -> str:
    for name in ("tunekit", "peft"):
        if re.search(rf"^from {name}\b", code, re.M):
            return name
    return "transformers"


def _adapter_state(library: str, model) -> dict[str, torch.Tensor]:
    if library == "peft":
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    if library == "tunekit":
        from tunekit.adapters import adapter_state_dict

        return adapter_state_dict(model)
    return {}


def main(out: str, jobs: str) -> None:
    results: dict[str, torch.Tensor] = {}
    for job in json.loads(jobs):
        card = Path(hf_hub_download(job["repo"], "README.md")).read_text(encoding="utf-8")
        for code in re.findall(r"```python\n(.*?)```", card, re.S):
            library, scope = _library(code), {}
            exec(code, scope)  # the card's snippet, exactly as published
            model = scope["model"].eval()
            ids = torch.tensor(job["input_ids"])
            with torch.no_grad():
                results[f"{job['repo']}|{library}|logits"] = model(input_ids=ids).logits.contiguous()
            for key, value in _adapter_state(library, model).items():
                results[f"{job['repo']}|{library}|state|{key}"] = value.detach().contiguous()
    save_file(results, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
