"""`finetune {train,eval,merge,export,chat,preview,push,demo,cache}` (or `python -m finetune ...`).

Expected mistakes (bad config, bad data, missing model) print one `error: ...` line and exit 2;
anything else is a bug and keeps its traceback. The package's log messages reach stderr as plain lines
(info by default; `--quiet`: warnings and errors; `--verbose`: debug too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .config import RunConfig, parse_value
from .errors import FinetuneError
from .run_folder import RunFolder

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- config from CLI
def _add_config_args(p: argparse.ArgumentParser, *, config_required: bool,
                     config_help: str = "run config (YAML); every field below overrides it") -> None:
    p.add_argument("config", nargs=None if config_required else "?", metavar="CONFIG.yaml", help=config_help)
    for group, names in RunConfig.field_groups().items():
        g = p.add_argument_group(f"{group} settings")
        for f in dataclasses.fields(RunConfig):
            if f.name in names:
                g.add_argument(f"--{f.name}", dest=f"cfg_{f.name}", metavar="V", default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} (default: {_default_repr(f)})")


def _default_repr(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "unset" if f.default is None else str(f.default)
    return str(f.default_factory())  # type: ignore[misc]


def config_from_args(args: argparse.Namespace) -> RunConfig:
    data: dict = {}
    if getattr(args, "config", None):
        data = RunConfig.from_yaml(args.config).to_dict()
        if "learning_rate" not in _yaml_keys(args.config):
            data["learning_rate"] = None  # re-derive from the (possibly overridden) method
    for key, raw in vars(args).items():
        if key.startswith("cfg_"):
            name = key[4:]
            data[name] = parse_value(name, raw)
    config = RunConfig.from_dict(data, source=getattr(args, "config", None) or "command line")
    if config.trust_remote_code:
        from .models import TRUST_REMOTE_CODE_WARNING

        print(f"warning: {TRUST_REMOTE_CODE_WARNING}", file=sys.stderr)
    return config


def _yaml_keys(path: str) -> set[str]:
    import yaml
    return set((yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).keys())


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from .distributed import finish_process, is_main_process
    from .train import train

    config = config_from_args(args)
    try:
        result = train(config)
    finally:
        finish_process()
    if is_main_process():  # under torchrun/accelerate, one summary, not one per process
        _print_results(result.results, result.final_dir)
    return 0


def _print_results(r: dict, final_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    t = Table(title=f"run {r['status']}: {final_dir}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key in ("train_loss", "eval_loss", "eval_perplexity", "test_perplexity_before", "test_perplexity_after",
                "train_runtime", "train_samples_per_second", "trainable_percent", "peak_memory_mb"):
        t.add_row(key, fmt(r.get(key)))
    Console(stderr=True).print(t)
    if r.get("is_demo_model"):
        print("note: trained the tiny offline demo model; answers are only meaningful on trained prompts.",
              file=sys.stderr)


def cmd_preview(args) -> int:
    from .prepare import preview_data
    from .templates import encoding_report_lines, labelled_turns, preview_text, render_preview

    _data_file_as_dataset(args)
    config = config_from_args(args)
    prepared = preview_data(config)  # what training encodes: the same data, template and lengths
    data, tok = prepared.examples, prepared.model.tokenizer
    if prepared.model.source.notice:
        print(prepared.model.source.notice, file=sys.stderr)
    print(f"format: {data.format}   template: {prepared.model.template}   source: {data.source}")
    if prepared.sample:
        print(f"note: previewing the first {prepared.sample:,} rows of a larger dataset; the counts and token "
              "lengths below are estimated from them")
    shown = data.splits.train[: args.n]
    for notice in prepared.notices(shown):
        print(f"note: {notice}")
    if data.skipped:
        print(f"skipped {len(data.skipped)} invalid rows, e.g. row {data.skipped[0].row}: {data.skipped[0].reason}")
    print(f"duplicates removed: {data.splits.duplicates_removed}")
    for i, ex in enumerate(shown):
        segs = render_preview(ex, tok, max_seq_length=config.max_seq_length, train_on_prompt=config.train_on_prompt,
                              train_on_reasoning=config.train_on_reasoning)
        print(f"\n--- example {i + 1} (loss on text inside [[ ]]) ---")
        for line in labelled_turns(ex, train_on_reasoning=config.train_on_reasoning):
            print(f"» {line}")
        print(preview_text(segs))
    sampled = f", estimated from a sample of {prepared.sample:,} rows" if prepared.sample else ""
    print(f"\ntoken lengths per split (max_seq_length = {config.max_seq_length}{sampled}):")
    for split, s in prepared.stats.items():
        print(f"  {split:<10} " + "  ".join(f"{k}={v}" for k, v in s.items()))
    lines = encoding_report_lines(prepared.report, config.max_seq_length)
    if lines:
        print("\nencoded:\n" + "\n".join(f"  {line}" for line in lines))
    return 0


def _data_file_as_dataset(args) -> None:
    """`preview data.jsonl`: a data file where the config goes is the dataset, previewed with the default model."""
    from .data import SUPPORTED_EXTENSIONS
    from .errors import ConfigError

    given = args.config
    if given and Path(given).suffix.lower() in SUPPORTED_EXTENSIONS:
        if hasattr(args, "cfg_dataset"):
            raise ConfigError(f"{given} is a data file and --dataset is set too; give the data file once")
        args.config, args.cfg_dataset = None, given


def cmd_eval(args) -> int:
    from .evaluate import evaluate_run

    summary = evaluate_run(args.run_dir, split=args.split, max_new_tokens=args.max_new_tokens, limit=args.limit)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_merge(args) -> int:
    from .merge import merge_adapter

    out = args.out or str(RunFolder(args.run_dir).merged_dir)
    report = merge_adapter(args.run_dir, out, dtype=args.dtype, quantize=args.quantize)
    saved = f" (saved in bitsandbytes {args.quantize} form)" if args.quantize else ""
    print(f"merged model written to {report.out_dir}{saved} (max |logit diff| vs base+adapter: "
          f"{report.max_abs_logit_diff:.2e})")
    return 0


def cmd_export(args) -> int:
    from .export import export_gguf, print_export

    result = export_gguf(args.run_dir, args.out, quant=args.quant, prompts=args.prompt or None, limit=args.limit,
                         compare_tokens=args.compare_tokens,
                         progress=lambda message: print(message, file=sys.stderr))
    print_export(result)
    return 0


def cmd_chat(args) -> int:
    from .inference import ChatModel, describe_tool_calls

    chat = ChatModel.from_run(args.run_dir)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    print("chat: type a message, /reset to clear the history, /quit (or Ctrl-D) to leave", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        if args.compare:
            answer = _print_both(chat.stream_both(history, **settings))
        else:
            print("fine-tuned> ", end="", flush=True)
            answer = "".join(_echo(chat.stream(history, adapter=True, **settings)))
            print()
        for line in describe_tool_calls(answer):  # a tool call the fine-tuned model emits, shown as one
            print(f"  (fine-tuned {line})")
        history.append({"role": "assistant", "content": answer})  # the conversation follows the fine-tuned side


def _echo(chunks):
    for c in chunks:
        print(c, end="", flush=True)
        yield c


def _print_both(updates) -> str:
    """Print the base answer as it grows, then the fine-tuned one, generated alongside it (it catches up at once
    when the base answer ends); return the fine-tuned text."""
    print("base> ", end="", flush=True)
    side = printed = 0
    panes = None
    for panes in updates:
        text = panes[side].text
        print(text[printed:], end="", flush=True)
        printed = len(text)
        if side == 0 and panes[0].done:
            text = panes[1].text
            print("\nfine-tuned> " + text, end="", flush=True)
            side, printed = 1, len(text)
    print()
    return panes[1].text


def cmd_push(args) -> int:
    from .hub import push_run, resolve_token

    token = resolve_token()  # HF_TOKEN, or the login saved by `hf auth login`; push_run explains when there is none
    merged_dir = None
    if args.what in ("merged", "both"):
        from .merge import merge_adapter

        run = RunFolder(args.run_dir)
        if run.model_dir.is_dir() and args.quantize:
            from .merge import save_bnb_quantized

            merged_dir = save_bnb_quantized(run.model_dir, run.root / f"model-{args.quantize}", args.quantize)
        elif run.model_dir.is_dir():
            merged_dir = run.model_dir
        else:
            merged_dir = Path(merge_adapter(args.run_dir, str(run.merged_dir), quantize=args.quantize).out_dir)
    result = push_run(args.run_dir, args.repo, what=args.what, token=token, private=not args.public,
                      commit_message=args.message, merged_dir=merged_dir, include_gguf=args.gguf)
    print(result)
    return 0


def cmd_demo(args) -> int:
    from .demo import DEMO_LABEL, demo_model_path

    print(demo_model_path())
    print(DEMO_LABEL, file=sys.stderr)
    return 0


def cmd_cache(args) -> int:
    """`cache list`: the data cache's entries, least recently used first, and its budget; `cache clear`: empty it."""
    from . import data_cache

    root = data_cache.cache_root()
    if args.action == "clear":
        entries, freed = data_cache.clear(root)
        print(f"removed {entries} entries ({data_cache.human_size(freed)}) from {root}")
        return 0
    entries = data_cache.cache_entries(root)
    budget = data_cache.max_cache_bytes()
    for entry in entries:
        print(f"{entry.path.name}  {data_cache.human_size(entry.bytes):>9}  last used {entry.last_used_text}  "
              f"{entry.source or '(unknown data)'}")
    total = data_cache.human_size(sum(entry.bytes for entry in entries))
    limit = "never pruned" if budget is None else f"budget {data_cache.human_size(budget)}"
    print(f"{root}: {len(entries)} entries, {total} ({limit}; ${data_cache.MAX_GB_ENV} changes it)")
    return 0


# ----------------------------------------------------------------------------- log messages
def _verbosity_flags() -> argparse.ArgumentParser:
    """`-q`/`-v`, accepted before the command and after it (`finetune -q train x.yaml`, `finetune train x.yaml -q`)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                   default=argparse.SUPPRESS, help="print only warnings and errors")
    g.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                   default=argparse.SUPPRESS, help="print debug messages too")
    return p


class _PlainFormatter(logging.Formatter):
    """The message alone; warnings and errors say so, like the CLI's own `error: ...` lines."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


@contextlib.contextmanager
def _log_to_stderr(level: int):
    """While a command runs, the package's log records at `level` and above go to stderr (so a run's own
    messages, e.g. "padding-free batches are off: ...", reach the user and the app's log.txt). Under
    torchrun only rank 0 prints below warnings. Afterwards logging is as it was: `main()` can run in-process."""
    from .distributed import is_main_process

    logger = logging.getLogger("finetune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter())
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level if is_main_process() else max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


# ----------------------------------------------------------------------------- parser
def build_parser(prog: str = "finetune") -> argparse.ArgumentParser:
    flags = _verbosity_flags()
    p = argparse.ArgumentParser(prog=prog, parents=[flags],
                                description="LoRA, QLoRA and full fine-tuning of causal language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", parents=[flags],
                       help="fine-tune from a YAML config (fields can be overridden: --key value)")
    _add_config_args(t, config_required=False)
    t.set_defaults(func=cmd_train)

    pv = sub.add_parser("preview", parents=[flags],
                        help="show examples as the model sees them (loss in [[ ]]) and dataset stats")
    pv.add_argument("-n", type=int, default=3, help="examples to show (default: 3)")
    _add_config_args(pv, config_required=False, config_help="run config (YAML), or a data file (.jsonl, .json, .csv, "
                     ".parquet, .txt) to preview with the default model; every field below overrides it")
    pv.set_defaults(func=cmd_preview)

    e = sub.add_parser("eval", parents=[flags], help="loss/perplexity and answers of base vs fine-tuned on a split")
    e.add_argument("run_dir", help="run folder (output_dir of a training run)")
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--limit", type=int, default=None, help="evaluate at most N examples")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("merge", parents=[flags], help="merge a LoRA/QLoRA adapter into its (unquantised) base")
    m.add_argument("run_dir", help="run folder or adapter folder")
    m.add_argument("--out", default=None, help="output folder (default: RUN_DIR/merged)")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    m.add_argument("--quantize", default=None, choices=["4bit", "8bit"],
                   help="save the merged model in bitsandbytes 4-bit (NF4) or 8-bit form")
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser("export", parents=[flags],
                       help="export to GGUF (llama.cpp / Ollama) with a Modelfile and a parity check")
    x.add_argument("run_dir", help="run folder")
    x.add_argument("--format", default="gguf", choices=["gguf"])
    x.add_argument("--quant", default="f16", choices=["f32", "f16", "q8_0", "q4_k_m"])
    x.add_argument("--out", default=None, help="output folder (default: RUN_DIR/gguf)")
    x.add_argument("--prompt", action="append", help="a user message for the parity check (repeatable; default: "
                                                     "the run's test prompts)")
    x.add_argument("--limit", type=int, default=8, help="parity-check at most N prompts (default: 8)")
    x.add_argument("--compare-tokens", type=int, default=32, help="greedy tokens compared per prompt (default: 32)")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("chat", parents=[flags],
                       help="chat in the terminal with the fine-tuned model (--compare: base too)")
    c.add_argument("run_dir", help="run folder")
    c.add_argument("--compare", action="store_true", help="answer with the base model too (both in one pass)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--top-k", type=int, default=50)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_chat)

    ps = sub.add_parser("push", parents=[flags],
                        help="push the adapter and/or merged model with a model card (token: HF_TOKEN)")
    ps.add_argument("run_dir", help="run folder")
    ps.add_argument("--repo", required=True, help="repo name (`name` under your user, or `org/name`)")
    ps.add_argument("--what", default="adapter", choices=["adapter", "merged", "both"])
    ps.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    ps.add_argument("--message", default=None, help="commit message")
    ps.add_argument("--quantize", default=None, choices=["4bit", "8bit"],
                    help="push the merged model in bitsandbytes 4-bit (NF4) or 8-bit form")
    ps.add_argument("--gguf", action="store_true", help="also push the run's GGUF export and its Modelfile (from "
                                                       "`finetune export`) into the model repo")
    ps.set_defaults(func=cmd_push)

    d = sub.add_parser("demo", parents=[flags], help="build (once) and print the folder of the offline demo model")
    d.set_defaults(func=cmd_demo)

    ca = sub.add_parser("cache", parents=[flags], help="list or clear the data cache (normalised examples and "
                                                       "their encodings, reused across runs)")
    ca.add_argument("action", nargs="?", default="list", choices=["list", "clear"],
                    help="list: entries, sizes and last use (default); clear: remove them all")
    ca.set_defaults(func=cmd_cache)
    return p


def main(argv: list[str] | None = None, prog: str = "finetune") -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for our users
    args = build_parser(prog).parse_args(argv)
    try:
        with _log_to_stderr(getattr(args, "log_level", logging.INFO)):
            return args.func(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
