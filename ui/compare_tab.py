"""Compare tab: Base and Fine-tuned side by side. One message box sends to both and both stream; the answers
come from one loaded copy of the base weights with the adapter switched off and on. "Run test prompts"
fills a table from the run's held-out test split. An adapter from an earlier run, a local folder or the
Hub can be loaded without training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from finetune.errors import FinetuneError, ModelError
from finetune.run_folder import RunFolder

from .context import AppContext, owner_of
from .messages import error_md, notice_md, ok_md

log = logging.getLogger(__name__)

CHAT_CONCURRENCY = 1  # one generation at a time per process: both panes share one model copy
TABLE_HEADERS = ["prompt", "reference", "base answer", "fine-tuned answer", "base F1", "fine-tuned F1",
                 "base ROUGE-L", "fine-tuned ROUGE-L"]
GEN_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1,
                "seed": 0, "system_prompt": ""}


def resolve_target(ctx: AppContext, owner: str, run_id: str | None, path_or_id: str | None) -> Path:
    """The folder to load: one of the caller's runs, or (when allowed here) a local folder, or a Hub adapter id."""
    text = (path_or_id or "").strip()
    if text:
        local = Path(text).expanduser()
        if local.exists():
            if not ctx.allow_local_paths:
                raise ModelError("loading folders from this machine is turned off here; give a Hub adapter id "
                                 "(`user/name`) or pick one of your runs")
            resolved = local.resolve()
            check_owner(ctx, owner, resolved)  # a run folder typed as a path: only its owner's
            return resolved
        from finetune.hub import resolve_model_source

        return Path(resolve_model_source(text))
    if not run_id:
        raise ModelError("pick one of your runs, or give an adapter folder or Hub id")
    return ctx.runs.run_dir(run_id, owner)


def check_owner(ctx: AppContext, owner: str, folder: str | Path) -> None:
    """RunNotFound unless `folder` is outside the runs folder or inside one of `owner`'s runs."""
    resolved = Path(folder).resolve()
    if not resolved.is_relative_to(ctx.workspace):
        return
    parts = resolved.relative_to(ctx.workspace).parts
    if len(parts) < 2 or parts[0] != "runs":  # the workspace itself, uploads: never loadable
        raise ModelError("that folder holds other sessions' files; pick one of your runs instead")
    ctx.runs.run_dir(parts[1], owner)


def describe(model, folder: Path) -> str:
    kind = "adapter switched off / on (one copy of the base weights)" if model.has_adapter else \
        "base model and full fine-tune (two copies)"
    demo = " The base is the random-weight demo model: its own answers are noise." if _is_demo(model) else ""
    name = f"run `{folder.name[:8]}`" if RunFolder(folder).has_config else f"`{folder.name}`"
    return ok_md(f"Loaded {name} on base `{Path(model.base_path).name}`: {kind}.{demo}")


def _is_demo(model) -> bool:
    from finetune.demo import is_demo_model

    return is_demo_model(model.base_path)


def load_model(ctx: AppContext, owner: str, run_id: str | None, path_or_id: str | None) -> tuple[str, str | None]:
    """(status markdown, the loaded folder or None)."""
    try:
        folder = resolve_target(ctx, owner, run_id, path_or_id)
        model = ctx.chat_models.get(folder)
    except FinetuneError as e:
        return error_md(str(e)), None
    except Exception as e:  # e.g. a corrupt adapter: inline, not a traceback
        log.exception("loading a model for Compare failed")
        return error_md(f"Could not load the model ({type(e).__name__}: {e})."), None
    return describe(model, folder), str(folder)


def generation_settings(values: dict[str, Any]) -> dict[str, Any]:
    """ChatModel.stream keyword arguments from the generation widgets (blank → defaults)."""
    out = {}
    for key, default in GEN_DEFAULTS.items():
        value = values.get(key)
        out[key] = default if value is None or value == "" else value
    out["max_new_tokens"] = int(out["max_new_tokens"])
    out["top_k"] = int(out["top_k"])
    out["seed"] = int(out["seed"])
    out["system_prompt"] = out["system_prompt"].strip() or None
    return out


def chat_both(ctx: AppContext, owner: str, folder: str | None, message: str, base_history: list,
              tuned_history: list, settings: dict) -> Iterator[tuple[list, list, str]]:
    """Stream the base answer, then the fine-tuned one; yields (base history, tuned history, status)."""
    message = (message or "").strip()
    if not message:
        yield base_history, tuned_history, error_md("Type a message first.")
        return
    if not folder:
        yield base_history, tuned_history, error_md("Load a run first (pick one above and press **Load**).")
        return
    try:
        check_owner(ctx, owner, folder)
        model = ctx.chat_models.get(folder)
    except FinetuneError as e:
        yield base_history, tuned_history, error_md(str(e))
        return
    gen = generation_settings(settings)
    histories = {False: list(base_history) + [{"role": "user", "content": message}],
                 True: list(tuned_history) + [{"role": "user", "content": message}]}
    for adapter in (False, True):
        conversation = [{"role": m["role"], "content": m["content"]} for m in histories[adapter]]
        histories[adapter].append({"role": "assistant", "content": ""})
        try:
            for chunk in model.stream(conversation, adapter=adapter, **gen):
                histories[adapter][-1]["content"] += chunk
                yield histories[False], histories[True], ""
        except (FinetuneError, ValueError) as e:
            yield histories[False], histories[True], error_md(str(e))
            return
        if not histories[adapter][-1]["content"].strip():
            histories[adapter][-1]["content"] = "(empty answer: the model ended its turn at once)"
    yield histories[False], histories[True], ""


def test_prompts(ctx: AppContext, owner: str, folder: str | None, limit: int | None, max_new_tokens: int,
                 progress=None) -> tuple[str, list[list] | None]:
    """Run the held-out test prompts through base and fine-tuned; (summary markdown, table rows)."""
    from finetune.evaluate import evaluate_run

    if not folder:
        return error_md("Load a run first."), None
    try:
        check_owner(ctx, owner, folder)
        model = ctx.chat_models.get(folder)
        summary = evaluate_run(folder, split="test", max_new_tokens=int(max_new_tokens or 64),
                               limit=int(limit) if limit else None, chat=model,
                               progress=(lambda f, msg: progress(f, desc=msg)) if progress else None)
    except FinetuneError as e:
        return error_md(str(e)), None
    rows = []
    for r in RunFolder(folder).read_answers():
        rows.append([r["prompt"], r["reference"], r["base_answer"], r["finetuned_answer"],
                     round(r["base_token_f1"], 3), round(r["finetuned_token_f1"], 3),
                     round(r["base_rouge_l"], 3), round(r["finetuned_rouge_l"], 3)])

    def f(key: str) -> str:
        value = summary.get(key)
        return "-" if value is None else f"{value:.3g}"

    text = (f"{summary['answered']} test prompts. Perplexity base {f('base_perplexity')} → fine-tuned "
            f"{f('finetuned_perplexity')}; token F1 {f('base_token_f1')} → {f('finetuned_token_f1')}; "
            f"ROUGE-L {f('base_rouge_l')} → {f('finetuned_rouge_l')}. Saved to eval/answers.csv in the run folder.")
    return ok_md(text), rows


# ============================================================================ layout and wiring

def create_compare_tab(ctx: AppContext) -> dict[str, Any]:
    c: dict[str, Any] = {}
    # the run list on a row of its own: a run's name (date · model · method · data · state · loss · id) is long
    c["run"] = gr.Dropdown([], value=None, label="Run", allow_custom_value=True, elem_id="compare-run",
                           info="Your finished (or stopped) runs.")
    with gr.Row(equal_height=True):
        c["path"] = gr.Textbox(label="…or an adapter: " + ("local folder or Hub id" if ctx.allow_local_paths
                                                          else "Hub id"), scale=5, elem_id="compare-path",
                               placeholder="user/my-adapter" + (" or /path/to/run" if ctx.allow_local_paths else ""))
        c["load"] = gr.Button("Load", variant="primary", scale=1, elem_id="compare-load")
    c["status"] = gr.Markdown(notice_md("Load a run to chat with its base and fine-tuned models side by side."),
                              elem_id="compare-status")
    with gr.Row():
        c["base_chat"] = gr.Chatbot(label="Base", height=380, elem_id="chat-base", buttons=["copy"],
                                    placeholder="The base model's answers appear here.")
        c["tuned_chat"] = gr.Chatbot(label="Fine-tuned", height=380, elem_id="chat-tuned", buttons=["copy"],
                                     placeholder="The fine-tuned model's answers appear here.")
    with gr.Row(equal_height=True):
        c["message"] = gr.Textbox(show_label=False, placeholder="Ask both models…", scale=6, elem_id="chat-message",
                                  submit_btn=False)
        c["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        c["clear"] = gr.Button("Clear", scale=1, elem_id="chat-clear")
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            c["max_new_tokens"] = gr.Slider(1, 1024, value=GEN_DEFAULTS["max_new_tokens"], step=1,
                                            label="Max new tokens", info="Longest answer, in tokens.")
            c["temperature"] = gr.Slider(0, 2, value=GEN_DEFAULTS["temperature"], step=0.05, label="Temperature",
                                         info="0 = greedy (always the most likely token).")
            c["top_p"] = gr.Slider(0.05, 1, value=GEN_DEFAULTS["top_p"], step=0.05, label="Top-p",
                                   info="Sample from the smallest set of tokens whose probabilities add up to p.")
        with gr.Row():
            c["top_k"] = gr.Slider(0, 200, value=GEN_DEFAULTS["top_k"], step=1, label="Top-k",
                                   info="Sample from the k most likely tokens (0 = off).")
            c["repetition_penalty"] = gr.Slider(1.0, 2.0, value=GEN_DEFAULTS["repetition_penalty"], step=0.05,
                                                label="Repetition penalty", info="> 1 discourages repeating.")
            c["seed"] = gr.Number(value=GEN_DEFAULTS["seed"], precision=0, label="Seed",
                                  info="Same seed, same settings → same answers.")
        c["system_prompt"] = gr.Textbox(label="System prompt (optional)", lines=2,
                                        info="Added before the conversation, for both models.")
    with gr.Accordion("Test prompts: base vs fine-tuned on the held-out test split", open=False):
        with gr.Row(equal_height=True):
            c["limit"] = gr.Number(value=10, precision=0, label="Prompts to answer", minimum=1, scale=1)
            c["eval_tokens"] = gr.Number(value=64, precision=0, label="Max new tokens per answer", minimum=1, scale=1)
            c["run_tests"] = gr.Button("Run test prompts", scale=2, elem_id="compare-run-tests")
        c["test_summary"] = gr.Markdown()
        c["table"] = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True, elem_id="compare-table")
    c["folder"] = gr.State(None)
    c["base_history"] = gr.State([])
    c["tuned_history"] = gr.State([])
    return c


GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "system_prompt")


def wire_compare_tab(ctx: AppContext, c: dict, *, owner: gr.State) -> None:
    def on_load(who: str, run_id: str | None, path: str, request: gr.Request):
        status, folder = load_model(ctx, owner_of(who, request.session_hash), run_id, path)
        return status, folder, [], [], [], []

    c["load"].click(on_load, [owner, c["run"], c["path"]],
                    [c["status"], c["folder"], c["base_chat"], c["tuned_chat"], c["base_history"],
                     c["tuned_history"]], concurrency_limit=CHAT_CONCURRENCY, concurrency_id="model",
                    api_name="load_model")

    gen_inputs = {k: c[k] for k in GEN_KEYS}

    def on_send(who: str, folder: str | None, message: str, base: list, tuned: list, request: gr.Request,
                **settings):
        me = owner_of(who, request.session_hash)
        for base, tuned, status in chat_both(ctx, me, folder, message, base, tuned, settings):
            yield base, tuned, base, tuned, status or gr.skip(), ""

    inputs = [owner, c["folder"], c["message"], c["base_history"], c["tuned_history"]]
    outputs = [c["base_chat"], c["tuned_chat"], c["base_history"], c["tuned_history"], c["status"], c["message"]]
    c["send"].click(on_send, inputs, outputs, inputs_kwargs=gen_inputs, concurrency_limit=CHAT_CONCURRENCY,
                    concurrency_id="model", show_progress="minimal", api_name="chat")
    c["message"].submit(on_send, inputs, outputs, inputs_kwargs=gen_inputs, concurrency_limit=CHAT_CONCURRENCY,
                        concurrency_id="model", show_progress="minimal", api_visibility="private")
    c["clear"].click(lambda: ([], [], [], []), None,
                     [c["base_chat"], c["tuned_chat"], c["base_history"], c["tuned_history"]], queue=False,
                     api_visibility="private")

    def on_tests(who: str, folder: str | None, limit, tokens, request: gr.Request,
                 progress=gr.Progress()):
        summary, rows = test_prompts(ctx, owner_of(who, request.session_hash), folder, limit, tokens, progress)
        return summary, rows

    c["run_tests"].click(on_tests, [owner, c["folder"], c["limit"], c["eval_tokens"]],
                         [c["test_summary"], c["table"]], concurrency_limit=CHAT_CONCURRENCY,
                         concurrency_id="model", api_name="test_prompts")

