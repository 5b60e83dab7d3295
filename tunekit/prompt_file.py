"""``tunekit generate --file PROMPTS.jsonl``: one prompt per line in, one JSON object per line out.

A line is a JSON string (the prompt), an object ``{"prompt", "input"?, "system"?}``,
or a row of the training format (``{"instruction": ..., "input": ...}``,
``{"messages": [...]}``), which becomes the ids training built for that row. Each
output line is ``{"prompt": <the line's value>, "output": <text or label>}``, so a
reply with newlines stays one line. A line that is not JSON stops the run with its
number.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO

__all__ = ["read_prompt_file", "run_prompt_file"]


def read_prompt_file(path: str | Path) -> list[tuple[str | dict, str | None, str | None]]:
    """``(prompt or row, input, system)`` per non-blank line.

    Raises:
        FileNotFoundError: no such file. ValueError: a line is not a JSON string or object.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"generate --file: {path} not found")
    out = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"generate --file {path} line {number}: not JSON (write a JSON string or object per "
                             "line)") from None
        if isinstance(value, str):
            out.append((value, None, None))
        elif isinstance(value, dict) and isinstance(value.get("prompt"), str):
            out.append((value["prompt"], value.get("input"), value.get("system")))
        elif isinstance(value, dict):
            out.append((value, None, None))
        else:
            raise ValueError(f"generate --file {path} line {number}: a JSON string or object, not {type(value).__name__}")
    return out


def run_prompt_file(loaded, path: str | Path, options, *, raw: bool = False, system: str | None = None,
                    out: IO[str] | None = None) -> int:
    """Answer every prompt of ``path`` with ``loaded`` and write JSON lines to ``out``; returns 0."""
    from tunekit.inference import predict

    out = out or sys.stdout
    for prompt, second, own_system in read_prompt_file(path):
        output = predict(loaded, [prompt], raw=raw, inputs=None if second is None else [second],
                         system=own_system if own_system is not None else system, options=options)[0]
        out.write(json.dumps({"prompt": prompt, "output": output}, ensure_ascii=False) + "\n")
        out.flush()
    return 0
