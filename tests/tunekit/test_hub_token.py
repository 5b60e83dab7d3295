"""The token travels only in the Authorization header: a sentinel token is found nowhere else.

Checked: every file under the test's folders (run, pushed staging folders),
every file of every repo on the stand-in, everything printed (file
descriptors, so progress bars count too), every request body and every
other header the stand-in received, and the traceback ``--debug`` shows.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from _hub_runs import SENTINEL, finished_run, serving_base, shared_runs
from hub_server import HubServer

from tunekit.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(shared_runs(tmp_path_factory), save_merged=True)


@pytest.fixture
def hub(monkeypatch, run):
    with serving_base(monkeypatch, run) as server:
        yield server


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _assert_nowhere(hub: HubServer, roots: list[Path], printed: str) -> None:
    needle = SENTINEL.encode()
    assert SENTINEL not in printed
    for root in roots:
        assert _files_holding(root, needle) == []
    for repo in hub.repos.values():
        for commit in repo.commits.values():
            assert not any(needle in blob.content for blob in commit.files.values())
    assert any(r.authorized for r in hub.requests)  # the token did travel, in the Authorization header
    for request in hub.requests:
        assert needle not in request.body, request.path
        assert SENTINEL not in " ".join(f"{k}: {v}" for k, v in request.headers.items()), request.path


def test_pushes_leak_the_token_nowhere(hub, run, capfd):
    argv = ["push", str(run), "--repo", "alice/sentinel", "--base-model", "tiny/llama"]
    assert main(argv) == 0
    assert main([*argv[:3], "alice/sentinel-merged", "--merged", "--base-model", "tiny/llama"]) == 0
    from tunekit.hub import promote_branch, push_to_hub

    branch = push_to_hub(run, "alice/sentinel-big", merged=True, base_model="tiny/llama", large_bytes=0)
    promote_branch("alice/sentinel-big", branch.revision)
    printed = capfd.readouterr()
    _assert_nowhere(hub, [run.parent], printed.out + printed.err)
    assert any(r.path.endswith("/commit/main") for r in hub.requests)


def test_a_debug_traceback_holds_no_token(hub, run, monkeypatch, capfd):
    monkeypatch.setattr(hub, "commit", lambda req, repo_id, revision: (500, {"error": "storage is down"}))
    argv = ["push", str(run), "--repo", "alice/sentinel", "--base-model", "tiny/llama"]
    assert main(argv) == 1
    with pytest.raises(Exception) as caught:
        main([*argv, "--debug"])
    shown = "".join(traceback.format_exception(caught.value))
    printed = capfd.readouterr()
    assert "storage is down" in shown and "storage is down" in printed.err
    _assert_nowhere(hub, [run.parent], shown + printed.out + printed.err)
