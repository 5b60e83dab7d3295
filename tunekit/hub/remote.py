"""The target repository as it is before a push, and what the push may and must change in it.

A push plans against one commit: the head of the target branch when planning
(``RemoteRepo.head``, later sent as ``parent_commit``). tunekit records what it
pushed in ``tunekit_push.json``; files it did not write (other than the
Hub's ``.gitattributes`` and the card) make the repo foreign, and a foreign
repo or one holding another base model is refused unless ``force`` or the push
goes to a new branch. Then files tunekit wrote before and no longer pushes are
deleted in the same commit, and so are foreign weight files, so a loader can
never mix old and new shards.
"""

from __future__ import annotations

import fnmatch
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.hub.access import PushError, hub_failure

__all__ = ["RECORD_NAME", "RemoteRepo", "fetch_remote", "plan_deletions"]

RECORD_NAME = "tunekit_push.json"
HUB_OWNED = {".gitattributes", "README.md"}
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf",
                   "*.safetensors.index.json", "*.bin.index.json", "adapter_config.json", "config.json")


@dataclass
class RemoteRepo:
    """The target repo and branch at planning time."""

    repo_id: str
    revision: str
    exists: bool = False
    private: bool | None = None
    branch_exists: bool = False
    head: str | None = None
    """The commit the push builds on (its parent)."""
    files: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None
    """The previous push's ``tunekit_push.json``."""
    card_text: str | None = None

    @property
    def new_branch(self) -> bool:
        return self.exists and not self.branch_exists


def _download_text(api, repo_id: str, name: str, commit: str) -> str | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = api.hf_hub_download(repo_id, name, revision=commit, local_dir=tmp)
        return Path(path).read_text(encoding="utf-8")


def fetch_remote(api, repo_id: str, revision: str) -> RemoteRepo:
    """What is at ``repo_id`` / ``revision`` now (a missing repo or branch is a valid answer)."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    remote = RemoteRepo(repo_id, revision)
    try:
        info = api.model_info(repo_id)
    except RepositoryNotFoundError:
        return remote
    except (HfHubHTTPError, OSError) as err:
        raise hub_failure(f"reading {repo_id}", err) from None
    remote.exists, remote.private = True, bool(info.private)
    try:
        branches = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
        remote.branch_exists = revision in branches
        # A new branch starts from main's head.
        remote.head = branches.get(revision) or branches.get("main") or info.sha
        remote.files = sorted(f.path for f in api.list_repo_tree(repo_id, recursive=True, revision=remote.head)
                              if isinstance(f, RepoFile))
        if RECORD_NAME in remote.files:
            remote.record = json.loads(_download_text(api, repo_id, RECORD_NAME, remote.head) or "{}")
        if "README.md" in remote.files:
            remote.card_text = _download_text(api, repo_id, "README.md", remote.head)
    except (HfHubHTTPError, OSError) as err:
        raise hub_failure(f"reading {repo_id}@{revision}", err) from None
    return remote


def _card_base(card_text: str | None) -> list[str]:
    from huggingface_hub import ModelCard

    if not card_text:
        return []
    base = ModelCard(card_text, ignore_metadata_errors=True).data.base_model
    return [base] if isinstance(base, str) else list(base or [])


def plan_deletions(remote: RemoteRepo, pushed: set[str], base_model: str | None, force: bool) -> list[str]:
    """Files to delete in the push commit; raises PushError for a foreign repo or another base model.

    Args:
        remote: the repo at planning time.
        pushed: the paths this push adds.
        base_model: the Hub id the pushed files name (None for a model without one).
        force: push into a repo tunekit did not write, or that holds another base model.
    """
    previous = {*remote.record.get("files", []), RECORD_NAME} if remote.record else set()
    foreign = [f for f in remote.files if f not in HUB_OWNED and f not in previous]
    old_bases = [(remote.record or {}).get("base_model")] if remote.record else _card_base(remote.card_text)
    other_base = next((b for b in old_bases if b and base_model and b != base_model), None)
    allowed = force or remote.new_branch
    if foreign and not allowed:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise PushError(f"{remote.repo_id}@{remote.revision} holds files tunekit did not write ({shown}); "
                        "push with --force to add to it, or to a new --revision BRANCH")
    if other_base and not allowed:
        raise PushError(f"{remote.repo_id}@{remote.revision} holds an adapter or model of base {other_base!r}, not "
                        f"{base_model!r}; push with --force to replace it, or to a new --revision BRANCH")
    stale = [f for f in remote.files if f in previous and f not in pushed and f not in HUB_OWNED]
    clashing = [f for f in foreign if f not in pushed and any(fnmatch.fnmatch(Path(f).name, p)
                                                              for p in WEIGHT_PATTERNS)]
    return sorted(set(stale) | set(clashing))
