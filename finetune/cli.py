"""`python -m finetune {train,eval,merge,export,chat,preview,push,demo}`.

Expected mistakes (bad config, bad data, missing model) print one `error: ...` line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

from .config import RunConfig, parse_value
from .errors import FinetuneError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


# ----------------------------------------------------------------------------- config from CLI
def _add_config_args(p: argparse.ArgumentParser, *, config_required: bool) -> None:
    p.add_argument("config", nargs=None if config_required else "?", metavar="CONFIG.yaml",
                   help="run config (YAML); every field below overrides it")
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
    from .train import train

    from .distributed import finish_process, is_main_process

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
        print("note: trained the random-weight demo model; answers are only meaningful on trained prompts.",
              file=sys.stderr)


def cmd_preview(args) -> int:
    from .data import load_examples, split_stats
    from .models import load_tokenizer, resolve_base_model
    from .templates import apply_template_choice, encode_example, preview_text, render_preview

    config = config_from_args(args)
    source = resolve_base_model(config)
    if source.notice:
        print(source.notice, file=sys.stderr)
    tok = load_tokenizer(source.path, revision=config.model_revision, trust_remote_code=config.trust_remote_code)
    template = apply_template_choice(tok, config.chat_template)
    data = load_examples(config)
    print(f"format: {data.format}   template: {template}   source: {data.source}")
    if data.skipped:
        print(f"skipped {len(data.skipped)} invalid rows, e.g. row {data.skipped[0].row}: {data.skipped[0].reason}")
    print(f"duplicates removed: {data.splits.duplicates_removed}")
    for i, ex in enumerate(data.splits.train[: args.n]):
        segs = render_preview(ex, tok, max_seq_length=config.max_seq_length, train_on_prompt=config.train_on_prompt)
        print(f"\n--- example {i + 1} (loss on text inside [[ ]]) ---\n{preview_text(segs)}")
    stats = split_stats(data.splits, lambda ex: encode_example(ex, tok, max_seq_length=config.max_seq_length)["length"],
                        config.max_seq_length)
    print("\ntoken lengths per split (max_seq_length = %d):" % config.max_seq_length)
    for split, s in stats.items():
        print(f"  {split:<10} " + "  ".join(f"{k}={v}" for k, v in s.items()))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate_run

    summary = evaluate_run(args.run_dir, split=args.split, max_new_tokens=args.max_new_tokens, limit=args.limit)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_merge(args) -> int:
    from .merge import merge_adapter

    out = args.out or str(Path(args.run_dir) / "merged")
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
    from .inference import ChatModel

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
        sides = [("base", False), ("fine-tuned", True)] if args.compare else [("fine-tuned", True)]
        answer = ""
        for label, adapter in sides:
            print(f"{label}> ", end="", flush=True)
            answer = "".join(_echo(chat.stream(history, adapter=adapter, **settings)))
            print()
        history.append({"role": "assistant", "content": answer})  # the conversation follows the fine-tuned side


def _echo(chunks):
    for c in chunks:
        print(c, end="", flush=True)
        yield c


def cmd_push(args) -> int:
    from .hub import push_run, resolve_token

    token = resolve_token()  # HF_TOKEN, or the login saved by `hf auth login`; push_run explains when there is none
    merged_dir = None
    if args.what in ("merged", "both"):
        from .merge import merge_adapter

        run = Path(args.run_dir)
        if (run / "model").is_dir() and args.quantize:
            from .merge import save_bnb_quantized

            merged_dir = save_bnb_quantized(run / "model", run / f"model-{args.quantize}", args.quantize)
        elif (run / "model").is_dir():
            merged_dir = run / "model"
        else:
            merged_dir = Path(merge_adapter(args.run_dir, str(run / "merged"), quantize=args.quantize).out_dir)
    result = push_run(args.run_dir, args.repo, what=args.what, token=token, private=not args.public,
                      commit_message=args.message, merged_dir=merged_dir)
    print(result)
    return 0


def cmd_demo(args) -> int:
    from .demo import DEMO_LABEL, demo_model_path

    print(demo_model_path())
    print(DEMO_LABEL, file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune",
                                description="LoRA, QLoRA and full fine-tuning of causal language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a YAML config (fields can be overridden: --key value)")
    _add_config_args(t, config_required=False)
    t.set_defaults(func=cmd_train)

    pv = sub.add_parser("preview", help="show examples as the model sees them (loss in [[ ]]) and dataset stats")
    pv.add_argument("-n", type=int, default=3, help="examples to show (default: 3)")
    _add_config_args(pv, config_required=False)
    pv.set_defaults(func=cmd_preview)

    e = sub.add_parser("eval", help="loss/perplexity and answers of base vs fine-tuned on a split")
    e.add_argument("run_dir", help="run folder (output_dir of a training run)")
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--limit", type=int, default=None, help="evaluate at most N examples")
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("merge", help="merge a LoRA/QLoRA adapter into its (unquantised) base")
    m.add_argument("run_dir", help="run folder or adapter folder")
    m.add_argument("--out", default=None, help="output folder (default: RUN_DIR/merged)")
    m.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    m.add_argument("--quantize", default=None, choices=["4bit", "8bit"],
                   help="save the merged model in bitsandbytes 4-bit (NF4) or 8-bit form")
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser("export", help="export to GGUF (llama.cpp / Ollama) with a Modelfile and a parity check")
    x.add_argument("run_dir", help="run folder")
    x.add_argument("--format", default="gguf", choices=["gguf"])
    x.add_argument("--quant", default="f16", choices=["f16", "q8_0", "q4_k_m"])
    x.add_argument("--out", default=None, help="output folder (default: RUN_DIR/gguf)")
    x.add_argument("--prompt", action="append", help="a user message for the parity check (repeatable; default: "
                                                     "the run's test prompts)")
    x.add_argument("--limit", type=int, default=8, help="parity-check at most N prompts (default: 8)")
    x.add_argument("--compare-tokens", type=int, default=32, help="greedy tokens compared per prompt (default: 32)")
    x.set_defaults(func=cmd_export)

    c = sub.add_parser("chat", help="chat in the terminal with the fine-tuned model (--compare: base too)")
    c.add_argument("run_dir", help="run folder")
    c.add_argument("--compare", action="store_true", help="answer with the base model first, then fine-tuned")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=0.9)
    c.add_argument("--top-k", type=int, default=50)
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_chat)

    ps = sub.add_parser("push", help="push the adapter and/or merged model with a model card (token: HF_TOKEN)")
    ps.add_argument("run_dir", help="run folder")
    ps.add_argument("--repo", required=True, help="repo name (`name` under your user, or `org/name`)")
    ps.add_argument("--what", default="adapter", choices=["adapter", "merged", "both"])
    ps.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    ps.add_argument("--message", default=None, help="commit message")
    ps.add_argument("--quantize", default=None, choices=["4bit", "8bit"],
                    help="push the merged model in bitsandbytes 4-bit (NF4) or 8-bit form")
    ps.set_defaults(func=cmd_push)

    d = sub.add_parser("demo", help="build (once) and print the folder of the offline demo model")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes are not for our users
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
