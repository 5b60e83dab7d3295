"""Conversations as users bring them -> ``[{"role", "content"}]`` with standard roles.

Two shapes are known by name (``data.chat_format``), and ``auto`` tells them
apart row by row:

=========  ==============================  ================  ==================================
format     list field                      message keys      roles
=========  ==============================  ================  ==================================
openai     ``messages``                    role / content    system, user, assistant
sharegpt   ``conversations``               from / value      system, human, gpt
=========  ==============================  ================  ==================================

Any other shape is a mapping, as LLaMA-Factory's ``formatting: sharegpt`` +
``tags`` and axolotl's ``field_messages`` + ``message_property_mappings`` +
``roles`` express it: ``data.messages_field``, ``data.role_key``,
``data.content_key`` and ``data.roles`` (data role -> system / user /
assistant). A row that does not fit is skipped with a reason that names the
keys it has and the setting to change; when no row fits, the builder's error
shows that reason.

A system prompt comes from the row (``data.system_field``) or the config
(``data.system``) when the conversation has none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tunekit.data.chat import SkipRow

__all__ = ["INLINE_MESSAGES", "MessageReader"]

INLINE_MESSAGES = "_tunekit_messages"
"""Row key of a conversation already in standard form (prompts built at inference)."""

_FORMATS = {"openai": ("messages", "role", "content"), "sharegpt": ("conversations", "from", "value")}
_DEFAULT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
_STANDARD = ("system", "user", "assistant")
# Values that mark a key as the role key when guessing a mapping to suggest.
_ROLE_WORDS = {*_DEFAULT_ROLES, "bot", "model", "ai", "chatgpt", "customer", "agent", "speaker"}


@dataclass(frozen=True)
class _Shape:
    field: str
    role_key: str
    content_key: str


def _text(content) -> str | None:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None


def _suggest(keys: list[str], sample: dict) -> str:
    """``data.role_key=... data.content_key=...`` guessed from one message's keys and values."""
    role = next((k for k in keys if str(sample.get(k, "")).lower() in _ROLE_WORDS), None)
    content = next((k for k in keys if k != role and isinstance(sample.get(k), str)), None)
    if role and content:
        return f"data.role_key={role} data.content_key={content}"
    return "data.role_key=<key of the role> data.content_key=<key of the text>"


class MessageReader:
    """Reads a row's conversation as a config's chat fields describe it.

    Args:
        cfg: the ``data:`` config (``chat_format``, ``messages_field``, ``role_key``,
            ``content_key``, ``roles``, ``system``, ``system_field``, ``mask_prompt``).
    """

    def __init__(self, cfg):
        self.cfg = cfg
        self.roles = {**_DEFAULT_ROLES, **{k.lower(): v for k, v in (cfg.roles or {}).items()}}

    def field_name(self) -> str:
        """The row key of the conversation a prompt at inference is stored under."""
        return self.cfg.messages_field or _FORMATS.get(self.cfg.chat_format, _FORMATS["openai"])[0]

    def _shape(self, row: dict) -> _Shape:
        cfg = self.cfg
        if cfg.chat_format == "auto":
            names = [cfg.messages_field] if cfg.messages_field else [f for f, _, _ in _FORMATS.values()]
            field = next((f for f in names if f in row), None)
            if field is None:
                wanted = " or ".join(repr(n) for n in names)
                raise SkipRow(f"no {wanted} list (row keys: {', '.join(sorted(map(str, row)))}); set "
                              "data.messages_field to the key that holds the conversation")
            fmt = "sharegpt" if field == "conversations" and not cfg.messages_field else None
            keys = _FORMATS[fmt][1:] if fmt else (None, None)
        else:
            field = cfg.messages_field or _FORMATS[cfg.chat_format][0]
            keys = _FORMATS[cfg.chat_format][1:]
            if field not in row:
                raise SkipRow(f"no {field!r} list (row keys: {', '.join(sorted(map(str, row)))}); set "
                              "data.messages_field to the key that holds the conversation")
        return _Shape(field, cfg.role_key or keys[0] or "", cfg.content_key or keys[1] or "")

    def _keys_for(self, shape: _Shape, message: dict) -> tuple[str, str]:
        """(role key, content key) of a message: the configured ones, else OpenAI's or ShareGPT's."""
        if shape.role_key and shape.content_key:
            return shape.role_key, shape.content_key
        for _, role, content in _FORMATS.values():
            if role in message and content in message:
                return shape.role_key or role, shape.content_key or content
        return shape.role_key or "role", shape.content_key or "content"

    def read(self, row: dict, *, prompt: bool = False) -> list[dict]:
        """The row's conversation as ``[{"role": system|user|assistant, "content": str}]`` (``prompt``: a
        conversation to continue, which needs no reply in it).

        Raises:
            SkipRow: the row has no conversation of the configured shape (the reason names the keys found
                and the setting to change), a role is unknown, or (``mask_prompt``) no reply is in it.
        """
        if INLINE_MESSAGES in row:
            return self._with_system(list(row[INLINE_MESSAGES]), row)
        shape = self._shape(row)
        value = row[shape.field]
        if isinstance(value, str):  # a CSV cell holding JSON
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise SkipRow(f"field {shape.field!r} is not a list of messages (not JSON)") from None
        if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
            raise SkipRow(f"field {shape.field!r} is not a list of messages (objects)")
        messages = [self._message(shape, m) for m in value]
        messages = self._with_system(messages, row)
        if self.cfg.mask_prompt and not prompt and not any(m["role"] == "assistant" for m in messages):
            raise SkipRow("no assistant turn")
        return messages

    def _message(self, shape: _Shape, message: dict) -> dict:
        role_key, content_key = self._keys_for(shape, message)
        if role_key not in message or content_key not in message:
            keys = sorted(map(str, message))
            raise SkipRow(f"messages have keys [{', '.join(keys)}], not {role_key}/{content_key}; set "
                          f"{_suggest(keys, message)}")
        role, content = str(message[role_key]), _text(message[content_key])
        if content is None:
            raise SkipRow(f"message {content_key!r} is not text")
        standard = self.roles.get(role.lower())
        if standard not in _STANDARD:
            raise SkipRow(f"unknown role {role!r}; map it with data.roles (e.g. data.roles={{{role}: user}})")
        return {"role": standard, "content": content}

    def _with_system(self, messages: list[dict], row: dict) -> list[dict]:
        """Put the row's (``system_field``) or the config's system prompt first, when there is none."""
        if messages and messages[0]["role"] == "system":
            return messages
        field = self.cfg.system_field
        system = row.get(field) if field else None
        system = system if isinstance(system, str) and system.strip() else self.cfg.system
        return [{"role": "system", "content": system}, *messages] if system else messages
