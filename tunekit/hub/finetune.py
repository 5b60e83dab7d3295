"""``hub.push: true`` in a finetune config: checked before training, pushed after the final save.

The check runs before anything loads (offline mode, token, repo id, write
access), so a long run does not end in a push that could never work. The
push comes after the adapter, merged model and results are on disk; when it
fails they stay there and the error says the ``tunekit push`` command that
retries it. The adapter goes to ``hub.repo_id``; a merged model
(``output.save_merged``) to ``<hub.repo_id>-merged``; a ``model.from_config``
base, which exists only in the run folder, to ``<hub.repo_id>-base``.
"""

from __future__ import annotations

from typing import Any

from tunekit.hub.access import PushError, check_online, hub_api, parse_repo_id, require_token, writable_namespace
from tunekit.hub.push import PushResult, push_to_hub
from tunekit.run_report import train_stats

__all__ = ["PushAfterRunError", "check_push_config", "push_after_finetune", "train_stats"]


class PushAfterRunError(PushError):
    """The run finished and is saved, the push failed; ``result`` is the run's ``FinetuneResult``."""

    def __init__(self, message: str, result: Any):
        super().__init__(message)
        self.result = result


def check_push_config(hub_cfg, api=None) -> None:
    """Fail before training when ``hub.push`` cannot work (offline, no token, bad repo id, no write access)."""
    if not hub_cfg.push:
        return
    try:
        check_online()
        require_token()
        writable_namespace(hub_api(api), parse_repo_id(hub_cfg.repo_id or "", "hub.repo_id"))
    except PushError as err:
        raise PushError(f"hub.push=true: {err}") from None


def push_after_finetune(cfg, result, *, is_main_process: bool = True, api=None) -> list[PushResult]:
    """Push what ``finetune`` saved, as ``cfg.hub`` says; only where ``is_main_process``.

    Raises:
        PushAfterRunError: the push failed; the run's files are untouched and the message says how to retry.
    """
    if not (cfg.hub.push and is_main_process):
        return []
    hub, out = cfg.hub, result.output_dir
    private = hub.private if "private" in hub.model_fields_set else None
    base = {"base_model": hub.base_model} if hub.base_model else {"push_base": bool(cfg.model.from_config)}
    stats = train_stats(result.train)
    pushes = []
    try:
        pushes.append(push_to_hub(out, hub.repo_id, private=private, train_stats=stats, api=api, **base))
        if result.merged_dir is not None:
            pushes.append(push_to_hub(out, f"{hub.repo_id}-merged", merged=True, private=private,
                                      base_model=hub.base_model, train_stats=stats, api=api))
    except PushError as err:
        if pushes:  # the adapter is up, the merged model is not
            retry = f"tunekit push {out} --repo {hub.repo_id}-merged --merged"
        else:
            flag = f" --base-model {hub.base_model}" if hub.base_model else (" --push-base" if base.get("push_base")
                                                                            else "")
            retry = f"tunekit push {out} --repo {hub.repo_id}{flag}"
        # The retry command first: the CLI shortens long lines at the end.
        raise PushAfterRunError(f"training finished and is saved; the Hub push failed, retry with `{retry}` "
                                f"({err})", result) from err
    for push in pushes:
        print(push.summary())
    return pushes
