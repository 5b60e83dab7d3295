"""The ``tunekit`` command: finetune, merge, generate, chat, push, estimate.

    tunekit finetune CONFIG [key=value ...] [--print-config]     (flags and overrides in any order)
    tunekit finetune CONFIG --nproc N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]
    tunekit merge ADAPTER_DIR [--base MODEL] --out DIR
    tunekit generate MODEL_OR_ADAPTER --prompt TEXT | --file PROMPTS.jsonl [--system TEXT] [sampling options]
    tunekit chat MODEL_OR_ADAPTER [--system TEXT] [sampling options]
    tunekit push RUN_OR_ADAPTER_DIR --repo USER/NAME [--merged] [--base-model HUB_ID] ...
    tunekit estimate MODEL_OR_CONFIG_OR_YAML [--method ...] [--gpus N] [--gpu-memory 80GB] [--json]
    tunekit --version

``main(argv)`` returns the exit code, so tests call it in-process. The command
line is parsed before anything heavy is imported (``-h`` and ``--version``
never load torch). Errors print one line to stderr: exit 2 for an invalid
config or command line, 1 for anything that fails while running (``--debug``
shows the traceback instead).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tunekit import __version__

__all__ = ["main"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


# The config's sections, for `finetune -h` (static text: -h must not import torch; a test compares it
# with FinetuneConfig's fields).
CONFIG_SECTIONS = {
    "model": "the base model and tokenizer: name_or_path (Hub id, folder, pkg:), dtype, quantization, ...",
    "adapter": "method (lora, prefix, prompt, bottleneck) and its fields: rank, alpha, target_modules, ...",
    "data": "sources, format (text, instruction, chat, classification, seq2seq), fields, chat_template, lengths",
    "train": "steps or epochs, batch, lr, schedule, precision, eval, checkpoints, report_to",
    "distributed": "multi-process strategy",
    "hub": "push the result to the Hugging Face Hub",
    "output": "the run folder and what is written there",
}
FINETUNE_EPILOG = "config sections:\n" + "\n".join(f"  {k:<12} {v}" for k, v in CONFIG_SECTIONS.items()) + """

Every key, its type, default and meaning: docs/config.md (generated from the config models).

examples:
  tunekit finetune cookbook/quickstart.yaml train.lr=1e-3 adapter.rank=16
  tunekit finetune my_chat.yaml data.chat_template=llama3 data.train_turns=last --preview-data
"""


def _finetune_parser(sub, common) -> None:
    p = sub.add_parser(
        "finetune", parents=[common], help="train an adapter as a YAML config describes",
        description="Train an adapter. CONFIG is a YAML file (see cookbook/); key=value arguments override its "
                    "fields by dotted path (values are YAML: train.lr=1e-4, adapter.target_modules=[q_proj,v_proj]).",
        epilog=FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                   help="the config file (unless --config is given) and any dotted key=value overrides")
    p.add_argument("--config", "-c", help="the YAML config file (alternative to the positional CONFIG)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file + overrides + defaults) as YAML and exit without training "
                        "(with distributed.strategy: deepspeed, also the DeepSpeed JSON it generates)")
    p.add_argument("--preview-data", action="store_true",
                   help="print the first training examples as the model sees them (the part in the loss marked), "
                        "token counts and the packing layout, then exit (loads the tokenizer, not the model)")
    p.add_argument("--preview-rows", type=int, default=3, metavar="N", help="examples --preview-data shows (3)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="start N processes on this node (torchrun's --nproc-per-node); distributed.strategy says "
                        "how they share the work. Not needed under torchrun, accelerate launch, deepspeed or srun")
    p.add_argument("--nnodes", type=int, default=1, metavar="M", help="nodes of the job (with --nproc; default 1)")
    p.add_argument("--node-rank", type=int, metavar="R", help="this node's rank (multi-node, fixed node ranks)")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="the first node's address (multi-node)")


def _merge_parser(sub, common) -> None:
    p = sub.add_parser(
        "merge", parents=[common], help="merge a saved adapter into its base model",
        description="Fold the adapter into its base's weights and save a plain transformers model (+ tokenizer) "
                    "that loads without tunekit. LoRA / DoRA on an unquantized base stream the base's safetensors "
                    "shard by shard (memory about one shard); otherwise the base is loaded whole.",
    )
    p.add_argument("adapter_dir", help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--base", help="base model (Hub id, folder or pkg:<package>); default: the one the adapter records")
    p.add_argument("--out", required=True, help="folder to write the merged model and tokenizer to")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the merged model; default: the training dtype (fp32 if it was quantized)")


def _sampling_options(p) -> None:
    """Decoding flags shared by generate and chat."""
    p.add_argument("--base", help="base model for an adapter folder; default: the one the adapter records")
    p.add_argument("--system", help="system prompt replacing the run's data.system (chat and instruction runs)")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="prompt a plain model through this chat template (chatml, llama3, ..., a .jinja file, or "
                        "'tokenizer'); adapters use the template they were trained with")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length limit (default 64; chat 256)")
    p.add_argument("--temperature", type=float, help="sample at this temperature (0 or unset: greedy decoding)")
    p.add_argument("--top-p", type=float, help="nucleus sampling: keep the smallest set of tokens with this mass")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, help="penalise repeated tokens (> 1 repeats less)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="a string that ends the reply (repeat for several); the run's end-of-turn is always one")
    p.add_argument("--sample", action="store_true", help="sample (temperature 1) instead of greedy decoding")


def _generate_parser(sub, common) -> None:
    p = sub.add_parser(
        "generate", parents=[common], help="run a model or adapter on prompts",
        description="Causal and seq2seq models print the generated text as it is produced; classifiers print "
                    "the predicted label. Prompts become the ids training built for them.",
    )
    p.add_argument("model", help="an adapter folder (adapter_config.json), a model folder, a Hub id or pkg:<package>")
    p.add_argument("--prompt", action="append", help="input text (repeat for several prompts)")
    p.add_argument("--input", action="append", dest="inputs", metavar="TEXT",
                   help="the instruction's input (instruction runs), or the second text of a pair (classifiers "
                        "of text pairs); one per --prompt, in order")
    p.add_argument("--file", metavar="PROMPTS.jsonl",
                   help="read prompts from a JSONL file (a string, {prompt, input, system}, or a row of the "
                        "training format per line) and print one JSON object {prompt, output} per line")
    _sampling_options(p)
    p.add_argument("--raw", action="store_true",
                   help="feed the prompt as is (default: the token ids training built for it: the run's "
                        "instruction or chat template, special tokens as in training)")


def _chat_parser(sub, common) -> None:
    p = sub.add_parser(
        "chat", parents=[common], help="talk to a trained model, turn by turn",
        description="An interactive multi-turn session with the run's chat template (and system prompt): type a "
                    "message, the reply streams back. /reset clears the history, /exit or Ctrl-D ends.",
    )
    p.add_argument("model", help="an adapter folder, a model folder, a Hub id or pkg:<package>")
    _sampling_options(p)


def _push_parser(sub, common) -> None:
    p = sub.add_parser(
        "push", parents=[common], help="push a trained adapter or merged model to the Hugging Face Hub",
        description="Upload the adapter (or, with --merged, the merged model) and a model card in one atomic "
                    "commit. The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks a private Hub.",
    )
    p.add_argument("source", nargs="?", metavar="RUN_OR_ADAPTER_DIR",
                   help="a run folder (output.dir), its adapter/ folder, or (with --merged) a model folder")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="target repository (created when missing)")
    p.add_argument("--merged", action="store_true", help="push the merged model (<run>/merged) instead")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_const", const=True, default=None,
                     help="create the repo private (the default for new repos)")
    vis.add_argument("--public", dest="private", action="store_const", const=False,
                     help="create the repo public; an existing repo's visibility is never changed")
    p.add_argument("--revision", default="main", metavar="BRANCH", help="branch to push to (created from main)")
    p.add_argument("--commit-message", help="commit title (default: tunekit: <method> adapter for <base>)")
    p.add_argument("--base-model", metavar="HUB_ID",
                   help="the base's Hub id, when the run loaded a local copy of it (the pushed files name it)")
    p.add_argument("--push-base", action="store_true",
                   help="the base has no Hub id (model.from_config, a local folder): push it to <repo>-base too")
    p.add_argument("--force", action="store_true",
                   help="push into a repo holding files tunekit did not write, or another base model")
    p.add_argument("--overwrite-card", action="store_true",
                   help="replace the repo's README.md instead of merging tunekit's section into it")
    p.add_argument("--promote", metavar="BRANCH",
                   help="instead of uploading: make a large push's branch the content of --revision in one commit")


def _estimate_parser(sub, common) -> None:
    p = sub.add_parser(
        "estimate", parents=[common], help="estimate the GPU memory of a run and pick a strategy",
        description="Estimate the per-GPU peak memory of a fine-tuning run under every strategy tunekit can run "
                    "(single GPU, DDP, FSDP2 ZeRO-2/3, CPU offload, DeepSpeed ZeRO-3, tensor parallelism) and "
                    "recommend the cheapest that fits. Offline: only the model's config.json is read.",
    )
    p.add_argument("source", metavar="MODEL_OR_CONFIG_OR_YAML",
                   help="a finetune YAML, a config.json, a model folder, pkg:<package> or a Hub id")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of a finetune YAML")
    p.add_argument("--method", choices=["lora", "dora", "qlora", "prefix", "prompt", "bottleneck", "full"],
                   help="adapter method (default: the YAML's, else lora); qlora = LoRA on a 4-bit NF4 base")
    p.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    p.add_argument("--target-modules", nargs="+", metavar="MODULE",
                   help="modules to adapt (names or all-linear; default: the architecture's)")
    p.add_argument("--virtual-tokens", type=int, help="prefix / prompt length (default 20)")
    p.add_argument("--task", choices=["causal_lm", "seq_cls", "seq2seq"],
                   help="model head (default: seq2seq for encoder-decoders, seq_cls for BERT-like, else causal_lm)")
    p.add_argument("--num-labels", type=int, help="classes of a classification head (default: the YAML's labels, else 2)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in all (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; TP stays inside one (default 8)")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 24GB, 80GiB (default 80GB)")
    p.add_argument("--host-memory", help="host memory per node for CPU offload, e.g. 512GB (default: not checked)")
    p.add_argument("--headroom", type=float, default=0.1, help="share of memory kept free (default 0.1)")
    p.add_argument("--seq-len", type=int, help="tokens per row (default: the YAML's max_seq_len, else 512)")
    p.add_argument("--batch", type=int, help="rows per micro-batch per GPU (default: the YAML's, else 1)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing (default: the YAML's, else off)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="weights and autocast dtype (default: the YAML's, else bf16)")
    p.add_argument("--optimizer", choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"],
                   help="optimizer (default: the YAML's, else adamw)")
    p.add_argument("--attn", choices=["eager", "sdpa", "flash"],
                   help="attention implementation (default: the YAML's, else transformers' default)")
    p.add_argument("--tp-size", type=int, help="only this tensor-parallel degree in the TP rows")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (sizes in bytes)")
    p.add_argument("--plot", metavar="PNG", help="also write a bar chart of the breakdown per strategy")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="tunekit", description="Parameter-efficient fine-tuning of Hugging Face Transformers.")
    parser.add_argument("--version", action="version", version=f"tunekit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{finetune,merge,generate,chat,push,estimate}")
    _finetune_parser(sub, common)
    _merge_parser(sub, common)
    _generate_parser(sub, common)
    _chat_parser(sub, common)
    _push_parser(sub, common)
    _estimate_parser(sub, common)
    return parser


class UsageError(Exception):
    """A command line that cannot run (exit 2)."""


# A dotted config key (train.lr); config files end in one of _CONFIG_SUFFIXES.
_KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)+")
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _refuse_misspelled_override(items: list[str], i: int) -> None:
    """Raise for ``--key=value`` / ``--key value`` / ``key value``, showing the ``key=value`` form."""
    item = items[i]
    bare = item.lstrip("-")
    following = items[i + 1] if i + 1 < len(items) and "=" not in items[i + 1] else "VALUE"
    if item.startswith("-"):
        if "=" in bare:
            raise UsageError(f"finetune: overrides are key=value without dashes: {bare} (not {item})")
        if _KEY.fullmatch(bare):
            raise UsageError(f"finetune: overrides are key=value without dashes: {bare}={following} "
                             f"(not {item} {following})")
        raise UsageError(f"finetune: unknown option {item} (tunekit finetune -h lists the options)")
    if "=" not in item and _KEY.fullmatch(item) and not item.endswith(_CONFIG_SUFFIXES) and not Path(item).exists():
        raise UsageError(f"finetune: overrides are key=value: {item}={following} (not {item} {following})")


def _split_finetune_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    items = [*args.args, *args.unparsed]  # argparse leaves what follows a flag unparsed
    for i in range(len(items)):
        _refuse_misspelled_override(items, i)
    paths = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    if args.config:
        paths = [args.config, *paths]
    if len(paths) != 1:
        what = "no config file" if not paths else f"several config files {paths}"
        raise UsageError(f"finetune: {what}; give exactly one (tunekit finetune CONFIG [key=value ...])")
    return paths[0], overrides


def _mesh_comment(cfg, args: argparse.Namespace) -> str:
    """The device mesh the run's processes form, as a YAML comment (the printed config stays loadable)."""
    from tunekit.config import distributed_options
    from tunekit.distributed.env import read_env
    from tunekit.distributed.mesh import DIMS, mesh_shape

    world = args.nproc * args.nnodes if args.nproc else read_env().world_size
    strategy = cfg.distributed.strategy
    if world == 1:
        return f"# distributed.strategy: {strategy}: the mesh is set by the processes (--nproc N)\n"
    shape = mesh_shape(distributed_options(cfg), world)
    dims = ", ".join(f"{name}={getattr(shape, name)}" for name in DIMS)
    return f"# distributed.strategy: {strategy}, {world} processes: device mesh ({dims})\n"


def _deepspeed_comment(cfg, args: argparse.Namespace) -> str:
    """The DeepSpeed config a deepspeed run uses, as YAML comments (the printed config stays loadable)."""
    import json

    from tunekit.config import distributed_options
    from tunekit.distributed.deepspeed_zero import deepspeed_config
    from tunekit.distributed.env import read_env

    world = args.nproc * args.nnodes if args.nproc else read_env().world_size
    text = json.dumps(deepspeed_config(distributed_options(cfg), world), indent=2)
    source = cfg.distributed.deepspeed_config or "generated"
    head = (f"# distributed.strategy: deepspeed, {world} process(es): the DeepSpeed config ({source}); write it to a "
            "file and set distributed.deepspeed_config to replace it\n")
    return head + "".join(f"# {line}\n" for line in text.splitlines())


def _launch_finetune(args: argparse.Namespace, cfg, path: str, overrides: list[str]) -> int:
    """``--nproc N``: refuse what cannot work, then run the same command (without the launch flags) on N ranks."""
    from tunekit.api import check_runnable
    from tunekit.distributed.launch import launch_command

    if args.nproc < 1 or args.nnodes < 1:
        raise UsageError(f"finetune: --nproc {args.nproc} --nnodes {args.nnodes}: need at least 1 of each")
    check_runnable(cfg, nproc=args.nproc, nnodes=args.nnodes)
    argv = ["finetune", path, *overrides, *(["--debug"] if args.debug else [])]
    return launch_command(argv, nproc=args.nproc, nnodes=args.nnodes, node_rank=args.node_rank,
                          rdzv_endpoint=args.rdzv_endpoint)


def _run_finetune(args: argparse.Namespace) -> int:
    from tunekit.config import config_to_yaml, load_config

    path, overrides = _split_finetune_args(args)
    cfg = load_config(path, overrides)
    if args.print_config:
        if cfg.distributed.strategy == "auto":  # what this job (--nproc N, or this process) would run
            from tunekit.auto_strategy import job_size, resolve_auto

            resolved = resolve_auto(cfg, **job_size(args.nproc, args.nnodes))
            cfg = resolved.cfg
            print(f"# {resolved.line}")
        print(config_to_yaml(cfg), end="")
        if cfg.distributed.strategy != "none":
            print(_mesh_comment(cfg, args), end="")
        if cfg.distributed.strategy == "deepspeed":
            print(_deepspeed_comment(cfg, args), end="")
        return 0
    if args.preview_data:
        from tunekit.data.preview import preview_data

        print(preview_data(cfg, rows=args.preview_rows))
        return 0
    if args.nproc is None and (args.nnodes != 1 or args.node_rank is not None or args.rdzv_endpoint):
        raise UsageError("finetune: --nnodes, --node-rank and --rdzv-endpoint go with --nproc N (processes per node)")
    if args.nproc is not None and (args.nproc != 1 or args.nnodes != 1):
        return _launch_finetune(args, cfg, path, overrides)
    from tunekit.api import finetune

    result = finetune(cfg)  # one process (--nproc 1), or one rank of an external launcher's job
    return EXIT_INTERRUPTED if result.interrupted else 0


def _run_merge(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"merge: --out {args.out} is a file; give a folder (new or existing) to write the merged "
                         "model to")
    from tunekit.distributed.merge_plan import merge_saved_adapter

    # Streamed shard by shard from the base on disk where that gives the same model (peak memory
    # about one shard), else the base is loaded whole (a QLoRA adapter: into its dequantized weights).
    print(merge_saved_adapter(args.adapter_dir, Path(args.out), base=args.base, dtype=args.dtype).summary())
    return 0


def _options(args: argparse.Namespace, default_tokens: int):
    from tunekit.generation import GenerationOptions

    try:
        return GenerationOptions(max_new_tokens=args.max_new_tokens or default_tokens, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                 stop=args.stop, sample=args.sample)
    except ValueError as err:
        raise UsageError(f"{args.command}: {err}") from None


def _loaded(args: argparse.Namespace):
    from tunekit.inference import load_for_inference

    loaded = load_for_inference(args.model, args.base)
    if args.chat_template is not None:
        loaded.use_chat_template(None if args.chat_template == "tokenizer" else args.chat_template)
    return loaded


def _run_generate(args: argparse.Namespace) -> int:
    from tunekit.inference import predict

    if (args.prompt is None) == (args.file is None):
        raise UsageError("generate: give --prompt TEXT (repeatable) or --file PROMPTS.jsonl")
    if args.inputs is not None and len(args.inputs) != len(args.prompt or []):
        raise UsageError(f"generate: {len(args.inputs)} --input for {len(args.prompt or [])} --prompt; "
                         "give one per prompt")
    options = _options(args, 64)
    if args.file is not None:
        from tunekit.prompt_file import run_prompt_file

        return run_prompt_file(_loaded(args), args.file, options, raw=args.raw, system=args.system)
    predict(_loaded(args), args.prompt, raw=args.raw, inputs=args.inputs, system=args.system, options=options,
            stream=sys.stdout)
    return 0


def _run_chat(args: argparse.Namespace) -> int:
    from tunekit.chat_session import run_chat

    return run_chat(_loaded(args), system=args.system, options=_options(args, 256))


def _run_push(args: argparse.Namespace) -> int:
    from tunekit.hub import PushError, parse_repo_id, promote_branch, push_to_hub

    try:
        parse_repo_id(args.repo)
    except PushError as err:
        raise UsageError(str(err)) from None
    if args.promote:
        result = promote_branch(args.repo, args.promote, revision=args.revision, force=args.force,
                                commit_message=args.commit_message)
    elif args.source is None:
        raise UsageError("push: give RUN_OR_ADAPTER_DIR (tunekit push runs/NAME --repo USER/NAME)")
    else:
        result = push_to_hub(args.source, args.repo, merged=args.merged, private=args.private,
                             revision=args.revision, commit_message=args.commit_message, base_model=args.base_model,
                             force=args.force, push_base=args.push_base, overwrite_card=args.overwrite_card)
    print(result.summary())
    return 0


def _run_estimate(args: argparse.Namespace) -> int:
    from tunekit.estimate import inputs, report
    from tunekit.estimate.planner import Devices, plan
    from tunekit.estimate.units import parse_bytes

    choices = inputs.Choices(args.method, args.rank, args.target_modules, args.virtual_tokens, args.seq_len,
                             args.batch, args.grad_checkpointing, args.dtype, args.optimizer, args.attn, args.task,
                             args.num_labels)
    try:
        devices = Devices(args.gpus, parse_bytes(args.gpu_memory, "--gpu-memory"),
                          parse_bytes(args.host_memory, "--host-memory") if args.host_memory else None,
                          args.gpus_per_node, "cuda", args.headroom)
        if min(args.gpus, args.gpus_per_node) < 1 or not 0 <= args.headroom < 1:
            raise ValueError("--gpus and --gpus-per-node must be >= 1 and --headroom in [0, 1)")
        tp_sizes = [args.tp_size] if args.tp_size else None
        if args.source.endswith((".yaml", ".yml")):
            from tunekit.config import load_config

            spec, settings, fixed = inputs.from_finetune_config(load_config(args.source, args.overrides))
            spec, settings = inputs.merge_choices(spec, settings, choices)
            tp_sizes = tp_sizes or fixed
        elif args.overrides:
            raise ValueError(f"key=value overrides ({args.overrides[0]}) apply to a finetune YAML only")
        else:
            spec, settings = inputs.from_choices(args.source, choices)
        result = plan(spec, settings, devices, tp_sizes=tp_sizes)
    except ValueError as err:  # every estimate input error is the user's: exit 2
        raise UsageError(f"estimate: {_one_line(err)}") from None
    print(report.plan_json(result) if args.json else report.format_plan(result))
    if args.plot:
        out = report.plot_plan(result, args.plot)
        print(f"plot written to {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


_COMMANDS = {"finetune": _run_finetune, "merge": _run_merge, "generate": _run_generate, "chat": _run_chat,
             "push": _run_push, "estimate": _run_estimate}


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run the tunekit command line; returns the process exit code."""
    parser = build_parser()
    try:
        args, args.unparsed = parser.parse_known_args(argv)
        if args.unparsed and args.command != "finetune":  # finetune takes overrides after its flags too
            parser.error(f"unrecognized arguments: {' '.join(args.unparsed)}")
    except SystemExit as exit_:  # -h, --version, or an argparse usage error (already printed)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from tunekit.config import ConfigError  # only now: parsing (-h, --version) never imports torch

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
