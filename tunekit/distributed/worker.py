"""``python -m tunekit.distributed.worker MODULE:FUNCTION ARGS...``: one rank of a launched command.

Calls ``FUNCTION(ARGS)`` (a CLI ``main(argv) -> int``) and records its failure for the
launcher: an exception (its traceback goes to the failure folder, one line to stderr),
or a non-zero return code with the last line the command printed to stderr (the
CLI's own one-line error).
"""

from __future__ import annotations

import importlib
import sys

from tunekit.distributed.failures import is_peer_failure, record_exception, record_failure


class _LastLine:
    """A stderr that remembers the last non-empty line written through it."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, ""

    def write(self, text: str) -> int:
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            self.last = lines[-1]
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def run(target: str, argv: list[str]) -> int:
    """Run ``target`` ("module:function") with ``argv``; return its exit code."""
    module, _, name = target.partition(":")
    fn = getattr(importlib.import_module(module), name)
    stderr = _LastLine(sys.stderr)
    sys.stderr = stderr
    try:
        code = fn(argv)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException as error:  # noqa: BLE001 - recorded for the launcher
        record_exception(error)
        return 1
    finally:
        sys.stderr = stderr.stream
    if code:
        message = stderr.last or f"exited with code {code}"
        record_failure(message, is_peer_failure(message))
    return int(code or 0)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m tunekit.distributed.worker MODULE:FUNCTION [ARGS...]")
    raise SystemExit(run(sys.argv[1], sys.argv[2:]))
