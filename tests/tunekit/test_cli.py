"""The `tunekit` command line: version, help for every option, one-line errors, in-process main()."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunekit import __version__
from tunekit.cli import build_parser, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tunekit {__version__}"


@pytest.mark.parametrize("command", ["finetune", "merge", "generate"])
def test_help_explains_every_option(capsys, command):
    assert main([command, "-h"]) == 0
    text = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        assert action.help, f"{command}: {action.dest} has no help"
        assert (action.option_strings[0] if action.option_strings else action.metavar or action.dest) in text


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "finetune" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys):
    assert main(["train"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "needle"), [
    (["generate", "/no/such/adapter", "--prompt", "hi"], "local folder not found"),
    (["merge", "{tmp}", "--out", "{tmp}/x"], "is not an adapter folder"),
    # not a folder here and not loadable from the (offline) Hub
    (["generate", "no-such-model-xyz", "--prompt", "hi"], "neither an adapter folder"),
])
def test_runtime_errors_are_one_line_exit_1(capsys, tmp_path, argv, needle):
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "--debug" in err[0]


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="local folder not found"):
        main(["generate", "/no/such/adapter", "--prompt", "hi", "--debug"])


def test_merge_refuses_an_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    assert main(["merge", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {out} is a file" in err[0]
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize("argv", [["--version"], ["-h"], ["finetune", "-h"], ["merge", "-h"]])
def test_version_and_help_never_import_torch(argv):
    # A fresh interpreter: importing tunekit.cli and parsing must not load torch (seconds on a cold cache).
    code = ("import sys; from tunekit.cli import main; code = main(sys.argv[1:]); "
            "sys.stdout.flush(); print('TORCH', 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("TORCH False"), proc.stdout[-300:]


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "tunekit", "--version"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tunekit {__version__}"
