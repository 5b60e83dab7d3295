"""The ``tunekit`` command: finetune, merge, generate.

    tunekit finetune CONFIG [key=value ...] [--print-config]
    tunekit merge ADAPTER_DIR [--base MODEL] --out DIR
    tunekit generate MODEL_OR_ADAPTER --prompt TEXT [--base MODEL]
    tunekit --version

``main(argv)`` returns the exit code, so tests call it in-process. Errors
print one line to stderr: exit 2 for an invalid config or command line, 1 for
anything that fails while running (``--debug`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tunekit import __version__

__all__ = ["main"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _finetune_parser(sub, common) -> None:
    p = sub.add_parser(
        "finetune", parents=[common], help="train an adapter as a YAML config describes",
        description="Train an adapter. CONFIG is a YAML file (see cookbook/); key=value arguments override its "
                    "fields by dotted path (values are YAML: train.lr=1e-4, adapter.target_modules=[q_proj,v_proj]).",
    )
    p.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="the config file (unless --config is given) and any dotted key=value overrides")
    p.add_argument("--config", "-c", help="the YAML config file (alternative to the positional CONFIG)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file + overrides + defaults) as YAML and exit without training")


def _merge_parser(sub, common) -> None:
    p = sub.add_parser(
        "merge", parents=[common], help="merge a saved adapter into its base model",
        description="Load the base model, load the adapter, fold it into the weights and save a plain "
                    "transformers model (+ tokenizer) that loads without tunekit.",
    )
    p.add_argument("adapter_dir", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--base", help="base model (Hub id, folder or pkg:<package>); default: the one the adapter records")
    p.add_argument("--out", required=True, help="folder to write the merged model and tokenizer to")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the merged model; default: the training dtype (fp32 if it was quantized)")


def _generate_parser(sub, common) -> None:
    p = sub.add_parser(
        "generate", parents=[common], help="run a model or adapter on a prompt",
        description="Causal and seq2seq models print the generated text; classifiers print the predicted label.",
    )
    p.add_argument("model", help="an adapter folder (adapter_config.json), a model folder, a Hub id or pkg:<package>")
    p.add_argument("--prompt", required=True, action="append", help="input text (repeat for several prompts)")
    p.add_argument("--input", action="append", dest="inputs", metavar="TEXT",
                   help="the instruction's input (instruction runs), or the second text of a pair (classifiers "
                        "of text pairs); one per --prompt, in order")
    p.add_argument("--base", help="base model for an adapter folder; default: the one the adapter records")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation length limit (default 64)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as is (default: the token ids training built for it: the run's "
                        "instruction or chat template, special tokens as in training)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="tunekit", description="Parameter-efficient fine-tuning of Hugging Face Transformers.")
    parser.add_argument("--version", action="version", version=f"tunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,merge,generate}")
    _finetune_parser(sub, common)
    _merge_parser(sub, common)
    _generate_parser(sub, common)
    return parser


class UsageError(Exception):
    """A command line that cannot run (exit 2)."""


def _split_finetune_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    paths = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if args.config:
        paths = [args.config, *paths]
    if len(paths) != 1:
        what = "no config file" if not paths else f"several config files {paths}"
        raise UsageError(f"finetune: {what}; give exactly one (tunekit finetune CONFIG [key=value ...])")
    return paths[0], overrides


def _run_finetune(args: argparse.Namespace) -> int:
    from tunekit.config import config_to_yaml, load_config

    path, overrides = _split_finetune_args(args)
    cfg = load_config(path, overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    from tunekit.api import finetune

    result = finetune(cfg)
    return EXIT_INTERRUPTED if result.interrupted else 0


def _run_merge(args: argparse.Namespace) -> int:
    from tunekit.inference import merge_adapter

    out = merge_adapter(args.adapter_dir, Path(args.out), base=args.base, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from tunekit.inference import predict

    if args.inputs is not None and len(args.inputs) != len(args.prompt):
        raise UsageError(f"generate: {len(args.inputs)} --input for {len(args.prompt)} --prompt; give one per prompt")
    for line in predict(args.model, args.prompt, base=args.base, max_new_tokens=args.max_new_tokens,
                        sample=args.sample, raw=args.raw, inputs=args.inputs):
        print(line)
    return 0


_COMMANDS = {"finetune": _run_finetune, "merge": _run_merge, "generate": _run_generate}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run the tunekit command line; returns the process exit code."""
    from tunekit.config import ConfigError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # -h, --version, or an argparse usage error (already printed)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ConfigError, UsageError) as err:
        if args.debug:
            raise
        lines = err.lines if isinstance(err, ConfigError) else [str(err)]
        for line in lines:
            print(f"config error: {line}" if isinstance(err, ConfigError) else f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - the CLI's contract is one line, never a traceback
        if args.debug:
            raise
        kind = "" if isinstance(err, (ValueError, FileNotFoundError)) else f"{type(err).__name__}: "
        print(f"error: {kind}{_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
