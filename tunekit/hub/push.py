"""``push_to_hub``: an adapter or merged model to the Hugging Face Hub in one atomic commit.

    check offline / token / repo id -> whoami: may the token write there?
    -> plan locally (manifest, validity gate, card) -> read the repo (head, files, card, record)
    -> refuse a foreign repo or another base unless forced -> validate the card
    -> create the repo (private by default) or branch -> one create_commit: adds + deletes,
       parent_commit = the head seen when planning

A concurrent writer moves the head, so the commit fails (HTTP 412) and the repo
is left as it was. A model larger than ``large_bytes`` goes to a new branch
with ``upload_folder`` (resumable: run the same push again) and is promoted to
the target revision later by one commit of server-side copies
(``promote_branch``, ``tunekit push --repo R --promote BRANCH``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from tunekit import __version__
from tunekit.hub.access import (PushError, check_online, hub_api, hub_failure, parse_repo_id, require_token, scrub,
                                writable_namespace)
from tunekit.hub.card import build_card, merge_cards, tunekit_section
from tunekit.hub.manifest import check_no_local_paths, hub_id_or_none, local_roots, locate
from tunekit.hub.plan import Plan, plan_adapter, plan_model, recorded_source
from tunekit.hub.remote import RECORD_NAME, RemoteRepo, fetch_remote, plan_deletions

__all__ = ["LARGE_PUSH_BYTES", "PushResult", "promote_branch", "push_to_hub"]

LARGE_PUSH_BYTES = 20 * 2**30
"""Models larger than this go to a new branch with a resumable, multi-commit upload."""


@dataclass
class PushResult:
    """What a push did."""

    repo_id: str
    revision: str
    commit: str
    """The commit created (the last one of a branch upload)."""
    url: str
    files: list[str]
    deleted: list[str] = field(default_factory=list)
    created_repo: bool = False
    branch_upload: bool = False
    """The model went to ``revision``, a new branch, to be promoted with ``promote_branch``."""
    notes: list[str] = field(default_factory=list)
    base_push: PushResult | None = None
    """The push of the base model (``push_base=True``)."""

    def summary(self) -> str:
        """A few lines for the user."""
        lines = [*(self.base_push.summary().splitlines() if self.base_push else []), *self.notes]
        where = f"{self.url}/tree/{self.revision}" if self.revision != "main" else self.url
        lines.append(f"pushed {len(self.files)} files to {where} in commit {self.commit[:8]}"
                     + (f" (deleted {', '.join(self.deleted)})" if self.deleted else ""))
        return "\n".join(lines)


def push_to_hub(source: str | Path, repo_id: str, *, merged: bool = False, private: bool | None = None,
                revision: str = "main", commit_message: str | None = None, base_model: str | None = None,
                force: bool = False, push_base: bool = False, overwrite_card: bool = False,
                is_main_process: bool = True, large_bytes: int = LARGE_PUSH_BYTES,
                train_stats: dict | None = None, api=None) -> PushResult | None:
    """Push a run's adapter (or merged model) to ``repo_id`` with a model card, in one commit.

    Call it on every process of a multi-process job with ``is_main_process``
    true on one of them: only that one talks to the Hub (nothing inside is a
    collective, so the others return None at once; add a barrier after it if
    they must wait for the upload).

    Args:
        source: a run folder (``output.dir``), its ``adapter/`` folder, or a model folder (with ``merged``).
        repo_id: ``user/name`` or ``org/name``.
        merged: push the merged model (``<run>/merged``) instead of the adapter.
        private: visibility of a new repo (None: private); an existing repo's is never changed.
        revision: the branch to push to (created from main when missing).
        commit_message: default "tunekit: <method> adapter for <base>".
        base_model: the base's Hub id, when the run loaded a local copy (required then for adapters).
        force: push into a repo holding files tunekit did not write, or another base model.
        push_base: no Hub id for the base (``model.from_config``, a local folder): push it to ``<repo_id>-base``.
        overwrite_card: replace the repo's README.md instead of merging tunekit's part into it.
        is_main_process: this process pushes; False returns None without doing anything.
        large_bytes: models above this size go to a new branch (resumable upload) to promote later.
        train_stats: training facts for the card (steps, train_seconds, tokens_per_second, peak_memory_mib, hardware).
        api: an ``HfApi``-like client (default: one on ``HF_ENDPOINT``, reading ``HF_TOKEN`` / the cached login).

    Raises:
        PushError: one line; nothing was committed.
    """
    if not is_main_process:
        return None
    check_online()
    require_token()
    repo_id = parse_repo_id(repo_id)
    if base_model is not None and hub_id_or_none(base_model) is None:
        raise PushError(f"--base-model={base_model!r} is not a Hub model id (e.g. meta-llama/Llama-3.2-1B)")
    api = hub_api(api)
    writable_namespace(api, repo_id)
    folder, run = locate(source, merged)
    options = dict(private=private, force=force, large_bytes=large_bytes)
    # Every repo is planned and checked (files, gate, remote, card) before the first write.
    if merged:
        plan = plan_model(api, folder, run, repo_id, revision, base_model, "merged", train_stats)
        return _execute(api, _prepare(api, plan, revision, commit_message, overwrite_card, run, **options))
    base_id, base_plan = _adapter_base(api, folder, repo_id, base_model, push_base)
    plan = plan_adapter(api, folder, run, repo_id, revision, base_id, train_stats, local_base=base_plan is not None)
    ready = [_prepare(api, base_plan, "main", None, False, None, **options)] if base_plan else []
    ready.append(_prepare(api, plan, revision, commit_message, overwrite_card, run, **options))
    *base_push, result = [_execute(api, step) for step in ready]
    result.base_push = base_push[0] if base_push else None
    return result


def _adapter_base(api, folder: Path, repo_id: str, base_model: str | None, push_base: bool):
    """(the base's Hub id, the plan of the base's own push when ``push_base``) for an adapter folder."""
    from tunekit.models import resolve_source

    recorded, _ = recorded_source(folder)
    base_id = base_model or hub_id_or_none(recorded)
    if base_id is not None:
        return base_id, None
    if not push_base:
        raise PushError(f"the adapter's base {recorded!r} has no Hub id (a local folder, pkg: or model.from_config); "
                        "pass --base-model HUB_ID (its id on the Hub), or --push-base to upload it too")
    base_repo = parse_repo_id(f"{repo_id}-base", "the base repo")
    return base_repo, plan_model(api, Path(resolve_source(recorded)), None, base_repo, "main", None, "base")


def _record(plan: Plan, files: list[str]) -> bytes:
    record = {"tunekit_version": __version__, "kind": plan.spec.kind, "base_model": plan.spec.base_model,
              "method": plan.spec.method_tag, "files": sorted(f for f in files if f != "README.md")}
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def _check_visibility(remote: RemoteRepo, private: bool | None) -> None:
    if remote.exists and private is not None and remote.private != private:
        actual = "private" if remote.private else "public"
        raise PushError(f"{remote.repo_id} is {actual}; tunekit never changes an existing repo's visibility: change "
                        f"it on the Hub, or drop --{'private' if private else 'public'}")


def _validate_card(api, text: str) -> None:
    """The Hub's own metadata check (``/api/validate-yaml``), before anything is created."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    response = get_session().post(f"{api.endpoint}/api/validate-yaml", json={"content": text, "repoType": "model"},
                                  headers=build_hf_headers())
    try:
        hf_raise_for_status(response)
    except HfHubHTTPError as err:
        errors = "; ".join(e.get("message", "") for e in (response.json().get("errors") or [])) if \
            response.status_code == 400 else ""
        if errors:
            raise PushError(scrub(f"the Hub rejected the model card: {errors}")) from None
        raise hub_failure("validating the model card", err) from None


@dataclass
class _Ready:
    """A push planned and checked against the remote: only the writes are left."""

    plan: Plan
    remote: RemoteRepo
    files: dict[str, Path | bytes]
    deletes: list[str]
    message: str
    private: bool | None
    large: bool


def _prepare(api, plan: Plan, revision: str, message: str | None, overwrite_card: bool, run: Path | None, *,
             private: bool | None, force: bool, large_bytes: int) -> _Ready:
    repo_id = plan.spec.repo_id
    remote = fetch_remote(api, repo_id, revision)
    _check_visibility(remote, private)
    files: dict[str, Path | bytes] = {**plan.manifest.files, **plan.extra}
    deletes = plan_deletions(remote, set(files) | {"README.md", RECORD_NAME}, plan.spec.base_model, force)
    section = tunekit_section(plan.spec).encode("utf-8")
    check_no_local_paths({**plan.manifest.files, "README.md": section}, local_roots(plan.manifest.folder, run))
    card = merge_cards(build_card(plan.spec), remote.card_text, overwrite=overwrite_card)
    _validate_card(api, str(card))
    files["README.md"] = str(card).encode("utf-8")
    files[RECORD_NAME] = _record(plan, list(files))
    spec = plan.spec
    message = message or f"tunekit: {spec.method_tag or spec.kind} {spec.kind} for {spec.base_model or 'a local base'}"
    large = plan.manifest.kind == "model" and plan.manifest.size() > large_bytes
    return _Ready(plan, remote, files, deletes, message, private, large)


def _execute(api, ready: _Ready) -> PushResult:
    remote, plan = ready.remote, ready.plan
    created = _ensure_target(api, remote, ready.private)
    url = f"{api.endpoint}/{remote.repo_id}"
    if ready.large:
        commit, branch = _branch_upload(api, plan, remote, ready.files, ready.deletes, ready.message)
        notes = [*plan.notes, f"{plan.manifest.size() / 2**30:.1f} GiB: uploaded to the new branch {branch} "
                 "(resumable: the same command continues an interrupted upload); check it, then make it "
                 f"{remote.revision} in one commit: tunekit push --repo {remote.repo_id} --promote {branch}"]
        return PushResult(remote.repo_id, branch, commit, url, sorted(ready.files), ready.deletes, created,
                          branch_upload=True, notes=notes)
    commit = _commit(api, remote.repo_id, remote.revision, ready.files, ready.deletes, ready.message, remote.head)
    return PushResult(remote.repo_id, remote.revision, commit, url, sorted(ready.files), ready.deletes, created,
                      notes=plan.notes)


def _ensure_target(api, remote: RemoteRepo, private: bool | None) -> bool:
    """Create the repo (private unless asked otherwise) and the branch when missing; True for a new repo."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        if not remote.exists:
            api.create_repo(remote.repo_id, private=True if private is None else private)
            remote.head = api.model_info(remote.repo_id).sha
        if not remote.branch_exists and remote.revision != "main":
            api.create_branch(remote.repo_id, branch=remote.revision, revision=remote.head)
    except HfHubHTTPError as err:
        raise hub_failure(f"creating {remote.repo_id}@{remote.revision}", err) from None
    return not remote.exists


def _operations(files: dict[str, Path | bytes], deletes: list[str]) -> list:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    adds = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(v) if isinstance(v, Path) else v)
            for p, v in sorted(files.items())]
    return [*adds, *(CommitOperationDelete(path_in_repo=p) for p in deletes)]


def _commit(api, repo_id: str, revision: str, files, deletes, message: str, parent: str | None) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    description = "Files: " + ", ".join(sorted(files)) + (f"\nDeleted: {', '.join(deletes)}" if deletes else "")
    try:
        info = api.create_commit(repo_id, _operations(files, deletes), commit_message=message,
                                 commit_description=description, revision=revision, parent_commit=parent)
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code in (409, 412):
            raise PushError(f"{repo_id}@{revision} changed while this push was planned (its head is no longer "
                            f"{(parent or '?')[:8]}): nothing was pushed; run the push again") from None
        raise hub_failure(f"committing to {repo_id}@{revision}", err) from None
    except OSError as err:
        raise hub_failure(f"uploading to {repo_id}@{revision}", err) from None
    return info.oid


def _branch_upload(api, plan: Plan, remote: RemoteRepo, files, deletes, message) -> tuple[str, str]:
    """A large model to a new branch with ``upload_folder`` (resumable) from a staging folder of links."""
    stamp = hashlib.sha1(json.dumps(sorted((p, v.stat().st_size if isinstance(v, Path) else len(v))
                                           for p, v in files.items())).encode()).hexdigest()[:10]
    branch = f"tunekit-upload-{stamp}"
    folder = plan.manifest.folder
    staging = folder.parent / f".{folder.name}.hub-upload-{stamp}"
    for path, value in files.items():
        target = staging / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Path):
            if not target.exists():
                os.symlink(value.resolve(), target)
        else:
            target.write_bytes(value)
    try:
        api.create_branch(remote.repo_id, branch=branch, revision=remote.head, exist_ok=True)
        info = api.upload_folder(repo_id=remote.repo_id, folder_path=staging, revision=branch,
                                 commit_message=message, delete_patterns=deletes or None)
    except OSError as err:
        raise hub_failure(f"uploading to {remote.repo_id}@{branch} (run the same command again to resume)",
                          err) from None
    shutil.rmtree(staging)  # links and small files only; kept above while an upload can still resume
    return info.oid, branch


def promote_branch(repo_id: str, branch: str, *, revision: str = "main", force: bool = False,
                   commit_message: str | None = None, is_main_process: bool = True, api=None) -> PushResult | None:
    """Make a branch upload the content of ``revision`` in one commit (server-side copies + deletes)."""
    from huggingface_hub import CommitOperationCopy, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError

    if not is_main_process:
        return None
    check_online()
    require_token()
    repo_id = parse_repo_id(repo_id)
    api = hub_api(api)
    writable_namespace(api, repo_id)
    source = fetch_remote(api, repo_id, branch)
    if not source.branch_exists or source.record is None:
        raise PushError(f"{repo_id}@{branch} is not a tunekit upload (no {RECORD_NAME} there)")
    target = fetch_remote(api, repo_id, revision)
    files = sorted({*source.record["files"], "README.md", RECORD_NAME})
    deletes = plan_deletions(target, set(files), source.record.get("base_model"), force)
    ops = [CommitOperationCopy(src_path_in_repo=f, path_in_repo=f, src_revision=source.head) for f in files]
    ops += [CommitOperationDelete(path_in_repo=p) for p in deletes]
    try:
        info = api.create_commit(repo_id, ops, commit_message=commit_message or f"tunekit: promote {branch}",
                                 revision=revision, parent_commit=target.head)
    except HfHubHTTPError as err:
        raise hub_failure(f"promoting {repo_id}@{branch} to {revision}", err) from None
    return PushResult(repo_id, revision, info.oid, f"{api.endpoint}/{repo_id}", files, deletes)
