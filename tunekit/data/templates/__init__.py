"""Named chat templates shipped with tunekit, and how ``data.chat_template`` picks one.

``data.chat_template`` is one of:

- a name below (``chatml``, ``llama3``, ...): a Jinja file in this folder;
- ``tokenizer`` or unset: the tokenizer's own template;
- a path ending in ``.jinja``: that file;
- Jinja text (it holds ``{%`` or ``{{``).

Each shipped template renders a conversation exactly as the model family's own
template does (tool calls left out: use the tokenizer's template for those),
and marks the assistant replies with ``{% generation %}`` tags so the loss mask
comes from the template (``tunekit.data.chat``). A model family whose own
template refuses a system message (Mistral v0.2, Gemma 2) gets it before the
first user message instead, as the family's newer templates do; the file's
header says so.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["TEMPLATE_NAMES", "named_template", "resolve_chat_template"]

TEMPLATE_NAMES = ("alpaca", "chatml", "gemma", "llama3", "mistral", "phi3", "qwen2", "qwen2.5", "qwen3", "vicuna")
"""Names ``data.chat_template`` accepts for a shipped template."""

# Other spellings users bring from LLaMA-Factory / axolotl.
_ALIASES = {"llama-3": "llama3", "llama3.1": "llama3", "llama3.2": "llama3", "gemma2": "gemma", "phi-3": "phi3",
            "phi3.5": "phi3", "qwen": "qwen2", "qwen2_5": "qwen2.5", "mistral_v2": "mistral"}


def named_template(name: str) -> str:
    """The Jinja text of a shipped template (``TEMPLATE_NAMES`` or an alias).

    Raises:
        ValueError: no such name.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TEMPLATE_NAMES:
        raise ValueError(f"data.chat_template={name!r} is not a template name ({', '.join(TEMPLATE_NAMES)}), "
                         "'tokenizer', a .jinja file or Jinja text")
    return (resources.files(__name__) / f"{key}.jinja").read_text(encoding="utf-8")


def resolve_chat_template(spec: str | None, tokenizer) -> str:
    """The Jinja text ``data.chat_template = spec`` means for ``tokenizer``.

    Raises:
        FileNotFoundError: a ``.jinja`` path that does not exist.
        ValueError: an unknown name, or no template at all (unset and the tokenizer has none).
    """
    if spec is not None and spec != "tokenizer":
        if spec.endswith(".jinja"):
            path = Path(spec).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"data.chat_template: file not found: {spec!r}")
            return path.read_text(encoding="utf-8")
        if "{%" in spec or "{{" in spec:
            return spec
        return named_template(spec)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates in one tokenizer: the default one
        own = own.get("default")
    if not own:
        raise ValueError("the tokenizer has no chat template; set data.chat_template to a name "
                         f"({', '.join(TEMPLATE_NAMES)}), a .jinja file or Jinja text")
    return own
