"""``tunekit push`` on the command line: what it prints, and one-line errors with nothing half-pushed."""

from __future__ import annotations

import pytest
from _hub_runs import finished_run, serving_base, shared_runs

from tunekit.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return finished_run(shared_runs(tmp_path_factory))


@pytest.fixture
def hub(monkeypatch, run):
    with serving_base(monkeypatch, run) as server:
        yield server


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_push_prints_where_it_went(hub, run, capsys):
    assert main(["push", str(run), "--repo", "alice/cli", "--base-model", "tiny/llama"]) == 0
    out = capsys.readouterr().out
    assert f"pushed 9 files to {hub.url}/alice/cli in commit {hub.head('alice/cli')[:8]}" in out
    assert main(["push", str(run / "adapter"), "--repo", "alice/cli", "--base-model", "tiny/llama",
                 "--revision", "v2", "--public", "--commit-message", "second"]) == 1
    assert "is private; tunekit never changes" in _one_error_line(capsys)
    assert main(["push", str(run / "adapter"), "--repo", "alice/cli", "--base-model", "tiny/llama",
                 "--revision", "v2", "--commit-message", "second"]) == 0
    assert hub.repos["alice/cli"].history("v2")[0].title == "second"


@pytest.mark.parametrize("argv, exit_code, message", [
    (["--repo", "not a repo"], 2, "is not a Hub repo id"),
    (["--repo", "alice/x", "--base-model", "/abs/base"], 1, "is not a Hub model id"),
    (["--repo", "bob/x", "--base-model", "tiny/llama"], 1,
     "cannot push to bob/x: it is neither your user nor one of your orgs; namespaces you can write to: alice"),
    (["--repo", "readonly-org/x", "--base-model", "tiny/llama"], 1,
     "cannot push to readonly-org/x: your role there is read-only"),
    (["--repo", "alice/x", "--merged"], 1, "no merged model in"),
])
def test_bad_pushes_fail_in_one_line_and_create_nothing(hub, run, capsys, argv, exit_code, message):
    assert main(["push", str(run), *argv]) == exit_code
    assert message in _one_error_line(capsys)
    assert set(hub.repos) == {"tiny/llama"}


def test_a_folder_without_adapter_is_named(hub, tmp_path, capsys):
    assert main(["push", str(tmp_path), "--repo", "alice/x"]) == 1
    assert f"no adapter in {tmp_path}" in _one_error_line(capsys)


def test_no_token_offline_and_a_read_only_token_are_refused(monkeypatch, run, capsys, tmp_path):
    from huggingface_hub import constants

    with serving_base(monkeypatch, run, token_role="read") as server:
        argv = ["push", str(run), "--repo", "alice/x", "--base-model", "tiny/llama"]
        assert main(argv) == 1
        assert "the token is read-only" in _one_error_line(capsys)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
        assert main(argv) == 1
        assert "the Hub rejected the token (HTTP 401)" in _one_error_line(capsys)
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        assert main(argv) == 1
        assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in _one_error_line(capsys)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert main(argv) == 1
        assert "offline mode is on (HF_HUB_OFFLINE=1)" in _one_error_line(capsys)
        assert set(server.repos) == {"tiny/llama"}


def test_a_card_the_hub_rejects_stops_the_push_before_the_repo_exists(hub, run, capsys):
    hub.seed("tiny/odd-license", {**hub.files("tiny/llama"), "README.md": b"---\nlicense: my-own\n---\n"})
    assert main(["push", str(run), "--repo", "alice/x", "--base-model", "tiny/odd-license"]) == 1
    assert 'the Hub rejected the model card: "license" must be one of' in _one_error_line(capsys)
    assert "alice/x" not in hub.repos


def test_promote_needs_a_tunekit_branch(hub, capsys):
    hub.create("alice/x")
    assert main(["push", "--repo", "alice/x", "--promote", "main"]) == 1
    assert "alice/x@main is not a tunekit upload" in _one_error_line(capsys)
    assert main(["push", "--repo", "alice/x"]) == 2
    assert "give RUN_OR_ADAPTER_DIR" in _one_error_line(capsys)
