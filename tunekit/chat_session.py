"""``tunekit chat``: an interactive multi-turn session with a trained model, as training rendered chats.

Every turn renders the whole conversation so far (the run's system prompt or
``--system``, then each user message and reply) with the run's chat template
and its generation prompt, which are the ids training saw before each reply;
the reply streams as it is generated and ends where training ended replies.
An instruction run without a chat template has no turns to continue: each
message is then a new instruction. ``/reset`` clears the history, ``/exit``
(or end of input) ends the session.

Example:
    >>> import io
    >>> from tunekit.chat_session import run_chat
    >>> run_chat(loaded, stdin=io.StringIO("hi\\n"), stdout=sys.stdout)  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from typing import IO

from tunekit.generation import GenerationOptions, generate_text

__all__ = ["ChatSession", "run_chat"]

USER_PROMPT, ASSISTANT_PROMPT = "user> ", "assistant> "


class ChatSession:
    """A conversation with a ``Loaded`` model: ``reply(text)`` adds a user turn and the model's answer."""

    def __init__(self, loaded, system: str | None = None, options: GenerationOptions | None = None):
        if loaded.task != "causal_lm":
            raise ValueError(f"tunekit chat needs a causal language model; this one is a {loaded.task} model "
                             "(use tunekit generate)")
        self.loaded, self.options = loaded, options or GenerationOptions(max_new_tokens=256)
        self.system = system if system is not None else loaded.system
        fmt = (loaded.data or {}).get("format")
        # An instruction run renders one prompt at a time unless it trained through a chat template.
        self.multi_turn = fmt in (None, "chat") or bool((loaded.data or {}).get("chat_template"))
        if fmt == "text":
            raise ValueError("this run trained on plain text (data.format: text), which has no turns; use "
                             "tunekit generate --prompt TEXT")
        self.history: list[dict] = []
        if self.multi_turn:  # fails now, not at the first message, when there is no chat template
            loaded.chat_ids([{"role": "user", "content": "hi"}])

    def reset(self) -> None:
        self.history.clear()

    def _ids(self, text: str) -> list[int]:
        if not self.multi_turn:
            return self.loaded.prompt_ids(text, system=self.system)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return self.loaded.chat_ids([*head, *self.history, {"role": "user", "content": text}])

    def reply(self, text: str, stream: IO[str] | None = None) -> str:
        """The model's answer to ``text`` after the conversation so far (streamed to ``stream``)."""
        answer = generate_text(self.loaded, self._ids(text), self.options, stream=stream)
        if self.multi_turn:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer


def run_chat(loaded, *, system: str | None = None, options: GenerationOptions | None = None,
             stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> int:
    """Read user messages from ``stdin`` line by line and stream the replies to ``stdout``; returns 0."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(loaded, system, options)
    mode = "multi-turn" if session.multi_turn else "one instruction per message (no chat template in this run)"
    stdout.write(f"tunekit chat: {mode}; /reset clears the history, /exit or Ctrl-D ends\n")
    while True:
        stdout.write(USER_PROMPT)
        stdout.flush()
        line = stdin.readline()
        if not line:
            stdout.write("\n")
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        if text:
            stdout.write(ASSISTANT_PROMPT)
            session.reply(text, stream=stdout)
