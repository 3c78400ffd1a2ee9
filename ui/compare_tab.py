"""Compare tab: Base and Fine-tuned side by side. One message box sends to both and both stream together; the
answers come from one loaded copy of the base weights with the adapter switched off and on. "Run test prompts"
fills a table from the run's held-out test split. An adapter from an earlier run, a local folder or the
Hub can be loaded without training."""

from __future__ import annotations

import html
import logging
import re
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
# The answers as people read them: one row per prompt, the four texts side by side in fixed shares of the width,
# wrapped (never a table wider than its box), each answer with its scores under it.
ANSWERS_CSS = """
.ft-answers { width: 100%; table-layout: fixed; border-collapse: collapse; font-size: 0.88rem; }
.ft-answers th, .ft-answers td { border: 1px solid var(--border-color-primary); padding: 6px 8px;
  vertical-align: top; text-align: left; white-space: pre-wrap; overflow-wrap: anywhere; }
.ft-answers th { background: var(--background-fill-secondary); }
.ft-answers .ft-cell { max-height: 16em; overflow-y: auto; }
.ft-answers .ft-scores { display: block; margin-top: 6px; font-size: 0.78rem; color: var(--body-text-color-subdued);
  white-space: normal; }
.ft-answers .ft-better { font-weight: 600; color: #047857; }
"""
ANSWER_COLUMNS = (("prompt", "20%"), ("reference", "20%"), ("base answer", "30%"), ("fine-tuned answer", "30%"))
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
    """Stream both answers together (one batched pass; see ChatModel.stream_both); yields (base history, tuned
    history, status)."""
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
    histories = [list(history) + [{"role": "user", "content": message}] for history in (base_history, tuned_history)]
    conversations = [[{"role": m["role"], "content": m["content"]} for m in history] for history in histories]
    for history in histories:
        history.append({"role": "assistant", "content": ""})
    try:
        for panes in model.stream_both(*conversations, **gen):
            for history, pane in zip(histories, panes):
                history[-1]["content"] = pane.text
            yield histories[0], histories[1], ""
    except (FinetuneError, ValueError) as e:
        yield histories[0], histories[1], error_md(str(e))
        return
    for history in histories:
        if not history[-1]["content"].strip():
            history[-1]["content"] = "(empty answer: the model ended its turn at once)"
    yield histories[0], histories[1], ""


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


def answers_html(rows: list[list] | None) -> str:
    """The test-prompt table (TABLE_HEADERS rows) as readable HTML: prompt, reference, base and fine-tuned answers
    side by side, wrapped, with each answer's token F1 and ROUGE-L under it (the better one in bold)."""
    if not rows:
        return ""
    head = "".join(f'<th style="width:{width}">{name}</th>' for name, width in ANSWER_COLUMNS)
    body = []
    for prompt, reference, base, tuned, base_f1, tuned_f1, base_rouge, tuned_rouge in rows:
        base_scores = _scores(base_f1, base_rouge, tuned_f1, tuned_rouge)
        tuned_scores = _scores(tuned_f1, tuned_rouge, base_f1, base_rouge)
        body.append(f"<tr><td>{_text(prompt)}</td><td>{_text(reference)}</td>"
                    f"<td>{_text(base)}{base_scores}</td><td>{_text(tuned)}{tuned_scores}</td></tr>")
    return (f'<table class="ft-answers" id="compare-answers-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _text(value) -> str:
    """A cell's text: escaped, runs of blank lines kept to one, long texts scrolling inside their cell."""
    text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", "" if value is None else str(value).strip())
    return f'<div class="ft-cell">{html.escape(text)}</div>' if text else "<em>(empty)</em>"


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number  # NaN: no score


def _scores(f1, rouge, other_f1, other_rouge) -> str:
    def one(name, value, other):
        value, other = _number(value), _number(other)
        if value is None:
            return f"{name} -"
        better = other is not None and value > other
        return f'<span class="ft-better">{name} {value:.3f}</span>' if better else f"{name} {value:.3f}"

    return f'<span class="ft-scores">{one("token F1", f1, other_f1)} · {one("ROUGE-L", rouge, other_rouge)}</span>'


# ============================================================================ layout and wiring

def create_compare_tab(ctx: AppContext) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row(equal_height=True):
        c["run"] = gr.Dropdown([], value=None, label="Run", allow_custom_value=True, scale=3, elem_id="compare-run",
                               info="Your finished (or stopped) runs.")
        c["path"] = gr.Textbox(label="…or an adapter: " + ("local folder or Hub id" if ctx.allow_local_paths
                                                          else "Hub id"), scale=3, elem_id="compare-path",
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
        # the API returns the table's data (this hidden Dataframe); the page shows it as wrapped HTML
        c["table"] = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, visible=False, elem_id="compare-table")
        c["answers"] = gr.HTML(css_template=ANSWERS_CSS, elem_id="compare-answers", js_on_load=None)
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
        for base_pane, tuned_pane, status in chat_both(ctx, me, folder, message, base, tuned, settings):
            yield base_pane, tuned_pane, base_pane, tuned_pane, status or gr.skip(), ""

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
                         concurrency_id="model", api_name="test_prompts") \
        .then(lambda table: answers_html(_table_rows(table)), c["table"], c["answers"], show_progress="hidden",
              api_visibility="private")


def _table_rows(table) -> list[list]:
    """The Dataframe's rows as lists (Gradio hands the handler a pandas DataFrame, or None when empty)."""
    if table is None or getattr(table, "empty", False):
        return []
    return table.values.tolist() if hasattr(table, "values") else list(table)

