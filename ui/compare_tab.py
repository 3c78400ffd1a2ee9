"""Compare tab: Base and Fine-tuned side by side. One message box sends to both and both stream together; the
answers come from one loaded copy of the base weights with the adapter switched off and on. "Run test prompts"
fills a table from the run's held-out test split. An adapter from an earlier run, a local folder or the
Hub can be loaded without training. Under the chat, the user judges the answers (or two samples of the
fine-tuned model); the judgements become the run's preferences.jsonl, and a DPO stage from the run trains on them."""

from __future__ import annotations

import html
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import gradio as gr

from finetune.errors import DataError, FinetuneError, ModelError
from finetune.preference_loop import (
    ANSWER_NAMES,
    CHOICES,
    already_judged,
    count_judgements,
    judgement_row,
    loop_config,
    preference_pairs,
    read_preference_pairs,
)
from finetune.run_folder import PREFERENCES_FILE, RunFolder

from .context import AppContext, owner_of
from .messages import error_md, notice_md, ok_md, warning_md

log = logging.getLogger(__name__)

CHAT_CONCURRENCY = 1  # one generation at a time per process: both panes share one model copy
# What chat_both shows in a pane whose answer is empty; a judgement reads it back as the empty answer it stands for.
EMPTY_ANSWER = "(empty answer: the model ended its turn at once)"
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
    demo = " The base is the tiny offline demo model: its own answers are noise." if _is_demo(model) else ""
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
            history[-1]["content"] = EMPTY_ANSWER
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
    c.update(create_preference_loop())
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
    wire_preference_loop(ctx, c, owner=owner)


def _table_rows(table) -> list[list]:
    """The Dataframe's rows as lists (Gradio hands the handler a pandas DataFrame, or None when empty)."""
    if table is None or getattr(table, "empty", False):
        return []
    return table.values.tolist() if hasattr(table, "values") else list(table)



# ============================================================================ judge and train (preference loop)
# After both answers stream, the user says which is better (or asks the fine-tuned model for two samples and
# picks one); each judgement becomes a row of the run's preferences.jsonl (finetune/preference_loop.py), and
# "Train on my N preferences" queues a DPO stage from this run's weights, which joins the Run list when done.

LOOP_POLL_S = 2.0


def judged_run(ctx: AppContext, owner: str, folder: str | None) -> RunFolder:
    """The loaded run, where judgements are saved: one of the caller's runs in this app (a Hub adapter or a folder
    elsewhere has no run folder of ours to keep them in, nor a run the DPO stage could start from in this list)."""
    if not folder:
        raise ModelError("Load a run first (pick one above and press **Load**).")
    resolved = Path(folder).resolve()
    if resolved.parent != ctx.runs.runs_dir.resolve():
        raise ModelError("judgements are saved in the run they judge, and the loaded model is not one of your runs "
                         "here; pick one from the Run list and press **Load**")
    ctx.runs.run_dir(resolved.name, owner)  # RunNotFound for another session's run
    return RunFolder(resolved)


def _conversation(history: list) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in history]


def _prompt_of(tuned_history: list, system_prompt: str | None) -> list[dict]:
    """The conversation the fine-tuned pane's last answer replies to (the context the next stage trains in), with
    the generation settings' system prompt when one was set."""
    if not tuned_history or tuned_history[-1].get("role") != "assistant":
        raise DataError("nothing to judge yet: ask both models something first")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + _conversation(tuned_history[:-1])


def _answer(history: list) -> str:
    text = history[-1]["content"] if history and history[-1].get("role") == "assistant" else ""
    return "" if text == EMPTY_ANSWER else text


def counter_view(ctx: AppContext, owner: str, folder: str | None) -> tuple[str, dict]:
    """(the counter markdown, the train button's update) for the loaded run."""
    try:
        run = judged_run(ctx, owner, folder)
        count = count_judgements(run.read_preferences())
    except FinetuneError:
        return notice_md("Load one of your runs to judge its answers."), gr.update(value="Train on my preferences",
                                                                                  interactive=False)
    unpaired = (f" (+{count.unpaired} both bad with no better answer: kept in the file, not trained on)"
                if count.unpaired else "")
    text = f"{count.pairs} preference pair{'s' if count.pairs != 1 else ''} in this run's preferences.jsonl{unpaired}."
    return notice_md(text), gr.update(value=f"Train on my {count.pairs} preferences", interactive=count.pairs > 0)


def save_judgement(run: RunFolder, prompt: list[dict], answers: dict[str, str], choice: str, better: str) -> str:
    """Append the judgement to preferences.jsonl; the status markdown. The same answers are judged once."""
    rows = run.read_preferences()
    earlier = already_judged(rows, prompt, answers)
    if earlier:
        raise DataError(f"these answers are already judged (row {earlier} of preferences.jsonl); ask something else")
    row = judgement_row(prompt, answers, choice, better)
    run.append_preference(row)
    if row["chosen"] is None:
        what = "both bad: recorded, but not a pair (write a better answer to make one)"
    else:
        good, bad = CHOICES[choice]
        chosen = "your answer" if row["edited"] else ANSWER_NAMES[good]
        what = f"{chosen} preferred to {ANSWER_NAMES[bad]}"
    return ok_md(f"Saved as row {len(rows) + 1} of preferences.jsonl: {what}.")


def judge(ctx: AppContext, owner: str, folder: str | None, choice: str, base_history: list, tuned_history: list,
          better: str, system_prompt: str | None) -> tuple[str, bool]:
    """Judge the last answers of both panes (base, finetuned or both_bad); (status markdown, saved?)."""
    try:
        run = judged_run(ctx, owner, folder)
        prompt = _prompt_of(tuned_history, (system_prompt or "").strip() or None)
        if not base_history or base_history[-1].get("role") != "assistant":
            raise DataError("nothing to judge yet: ask both models something first")
        answers = {"base": _answer(base_history), "finetuned": _answer(tuned_history)}
        return save_judgement(run, prompt, answers, choice, better), True
    except FinetuneError as e:
        return error_md(str(e)), False


def two_samples(ctx: AppContext, owner: str, folder: str | None, tuned_history: list, settings: dict
                ) -> Iterator[tuple[str, str, str, dict | None]]:
    """Two sampled answers of the fine-tuned model to the last message (seeds `seed` and `seed` + 1; temperature 0
    would make them equal, so it becomes the default); yields (sample 1, sample 2, status, samples state)."""
    try:
        run = judged_run(ctx, owner, folder)
        gen = generation_settings(settings)
        prompt = _prompt_of(tuned_history, gen["system_prompt"])
        model = ctx.chat_models.get(run.root)
    except FinetuneError as e:
        yield "", "", error_md(str(e)), None
        return
    note = ""
    if not gen["temperature"]:
        gen["temperature"] = GEN_DEFAULTS["temperature"]
        note = f" Temperature 0 gives one answer only, so these are sampled at {gen['temperature']}."
    seed = gen.pop("seed")
    texts = ["", ""]
    try:
        for i in range(2):
            for chunk in model.stream(_conversation(tuned_history[:-1]), adapter=True, seed=seed + i, **gen):
                texts[i] += chunk
                yield texts[0], texts[1], gr.skip(), None
    except (FinetuneError, ValueError) as e:
        yield texts[0], texts[1], error_md(str(e)), None
        return
    state = {"folder": str(run.root), "prompt": prompt, "answers": {"sample_1": texts[0], "sample_2": texts[1]}}
    yield texts[0], texts[1], notice_md("Two samples of the fine-tuned model: pick the better one." + note), state


def pick_sample(ctx: AppContext, owner: str, folder: str | None, choice: str, samples: dict | None,
                better: str) -> tuple[str, bool]:
    """Save `choice` (sample_1 or sample_2) over the other sample; (status markdown, saved?)."""
    try:
        run = judged_run(ctx, owner, folder)
        if not samples or samples.get("folder") != str(run.root):
            raise DataError("no samples of this run yet: press **Two samples** first")
        return save_judgement(run, samples["prompt"], samples["answers"], choice, better), True
    except FinetuneError as e:
        return error_md(str(e)), False


def train_on_preferences(ctx: AppContext, owner: str, folder: str | None, mix_file: str | None,
                         hub_token: str | None = None) -> tuple[str, str | None]:
    """Queue a DPO stage from the loaded run on its preference pairs (and a mixed-in preference file's); it trains
    through the run manager like any run. (status markdown, run id or None)."""
    from finetune.runs import estimate_total_steps

    try:
        run = judged_run(ctx, owner, folder)
        if run.final_dir is None:
            raise ModelError("this run has no adapter or model yet; judge a finished run")
        pairs = preference_pairs(run.read_preferences())
        if not pairs:
            raise DataError("no preference pairs yet: mark which answer is better (or write a better one) first")
        mixed = read_preference_pairs(mix_file, max_bytes=ctx.max_upload_bytes) if mix_file else []
        config = loop_config(run.read_config(), run.root, PREFERENCES_FILE, len(pairs) + len(mixed))
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / PREFERENCES_FILE
            rows.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs + mixed),
                            encoding="utf-8")
            run_id = ctx.runs.submit(config, owner, dataset_file=rows, dataset_name=PREFERENCES_FILE,
                                     hub_token=hub_token)
    except FinetuneError as e:
        return error_md(str(e)), None
    extra = f" + {len(mixed)} from {Path(mix_file).name}" if mixed else ""
    steps = estimate_total_steps(config, len(pairs) + len(mixed))
    return notice_md(f"DPO run `{run_id[:8]}` queued: your {len(pairs)} pairs{extra}, starting from run "
                     f"`{run.root.name[:8]}`, {steps} steps. Its loss and rewards are plotted live in the **Train** "
                     "tab (↻ Refresh list there)."), run_id


def loop_run_view(ctx: AppContext, owner: str, run_id: str | None) -> tuple[str, bool]:
    """(status markdown of the DPO run the loop started, whether it has ended)."""
    if not run_id:
        return "", True
    try:
        status = ctx.runs.status(run_id, owner)
    except FinetuneError as e:
        return error_md(str(e)), True
    name = f"DPO run `{run_id[:8]}`"
    if status.state == "queued":
        return notice_md(f"{name} is waiting in the queue (position {status.queue_position})."), False
    if status.state in ("running", "stopping"):
        rewards = [m for m in status.metrics if m.get("rewards/margins") is not None]
        last = (f"; reward margin {rewards[-1]['rewards/margins']:.3g}, accuracy "
                f"{rewards[-1].get('rewards/accuracies') or 0:.2f}") if rewards else ""
        return notice_md(f"{name} is training: step {status.step}/{status.total_steps or '?'}{last}."), False
    if status.state == "finished":
        return ok_md(f"{name} finished. It is selected in the Run list above: press **Load** to judge its "
                     "answers."), True
    if status.state == "stopped":
        return warning_md(f"{name} was stopped."), True
    return error_md(f"{name} failed: {status.error or 'see its log in the Train tab'}"), True


def create_preference_loop() -> dict[str, Any]:
    """The judge-and-train block, under the chat."""
    c: dict[str, Any] = {}
    with gr.Accordion("Judge the answers, then train on your preferences (DPO)", open=True, elem_id="pref-loop"):
        with gr.Row(equal_height=True):
            c["pref_base"] = gr.Button("Base better", elem_id="pref-base")
            c["pref_tuned"] = gr.Button("Fine-tuned better", elem_id="pref-tuned")
            c["pref_both_bad"] = gr.Button("Both bad", elem_id="pref-both-bad")
            c["pref_samples"] = gr.Button("Two samples", elem_id="pref-samples")
        c["pref_better"] = gr.Textbox(label="A better answer (optional)", lines=2, elem_id="pref-better",
                                      info="Written here, it is the chosen answer of the judgement you press next.")
        with gr.Row(visible=False) as c["pref_samples_row"]:
            with gr.Column():
                c["pref_sample_1"] = gr.Textbox(label="Fine-tuned sample 1", lines=3, interactive=False,
                                                elem_id="pref-sample-1")
                c["pref_pick_1"] = gr.Button("Pick sample 1", elem_id="pref-pick-1")
            with gr.Column():
                c["pref_sample_2"] = gr.Textbox(label="Fine-tuned sample 2", lines=3, interactive=False,
                                                elem_id="pref-sample-2")
                c["pref_pick_2"] = gr.Button("Pick sample 2", elem_id="pref-pick-2")
        c["pref_status"] = gr.Markdown(elem_id="pref-status")
        with gr.Row():
            with gr.Column(scale=3):
                c["pref_counter"] = gr.Markdown(notice_md("Load one of your runs to judge its answers."),
                                                elem_id="pref-counter")
                c["pref_train"] = gr.Button("Train on my preferences", variant="primary", interactive=False,
                                            elem_id="pref-train")
            c["pref_mix"] = gr.File(label="Mix in a preference file (optional): its chosen/rejected pairs train too",
                                    type="filepath", file_types=[".json", ".jsonl", ".csv", ".parquet"], scale=2,
                                    elem_id="pref-mix")
        c["pref_run_status"] = gr.Markdown(elem_id="pref-run-status")
    c["pref_samples_state"] = gr.State(None)
    c["pref_run"] = gr.State(None)
    c["pref_timer"] = gr.Timer(LOOP_POLL_S, active=False)
    return c


def wire_preference_loop(ctx: AppContext, c: dict, *, owner: gr.State) -> None:
    counter = [c["pref_counter"], c["pref_train"]]

    def on_folder(who: str, folder: str | None, request: gr.Request):
        return counter_view(ctx, owner_of(who, request.session_hash), folder)

    c["folder"].change(on_folder, [owner, c["folder"]], counter, show_progress="hidden", api_visibility="private")

    def judging(choice: str):
        def on_judge(who: str, folder: str | None, base: list, tuned: list, better: str, system_prompt: str,
                     request: gr.Request):
            me = owner_of(who, request.session_hash)
            status, saved = judge(ctx, me, folder, choice, base, tuned, better, system_prompt)
            return status, "" if saved else gr.skip(), *counter_view(ctx, me, folder)

        return on_judge

    judge_inputs = [owner, c["folder"], c["base_history"], c["tuned_history"], c["pref_better"], c["system_prompt"]]
    judge_outputs = [c["pref_status"], c["pref_better"], *counter]
    for button, choice in ((c["pref_base"], "base"), (c["pref_tuned"], "finetuned"),
                           (c["pref_both_bad"], "both_bad")):
        button.click(judging(choice), judge_inputs, judge_outputs, api_name=f"judge_{choice}")

    def on_samples(who: str, folder: str | None, tuned: list, request: gr.Request, **settings):
        me = owner_of(who, request.session_hash)
        for first, second, status, state in two_samples(ctx, me, folder, tuned, settings):
            yield gr.update(visible=True), first, second, status, state

    c["pref_samples"].click(on_samples, [owner, c["folder"], c["tuned_history"]],
                            [c["pref_samples_row"], c["pref_sample_1"], c["pref_sample_2"], c["pref_status"],
                             c["pref_samples_state"]], inputs_kwargs={k: c[k] for k in GEN_KEYS},
                            concurrency_limit=CHAT_CONCURRENCY, concurrency_id="model", show_progress="minimal",
                            api_name="two_samples")

    def picking(choice: str):
        def on_pick(who: str, folder: str | None, samples: dict | None, better: str, request: gr.Request):
            me = owner_of(who, request.session_hash)
            status, saved = pick_sample(ctx, me, folder, choice, samples, better)
            return status, "" if saved else gr.skip(), *counter_view(ctx, me, folder)

        return on_pick

    for button, choice in ((c["pref_pick_1"], "sample_1"), (c["pref_pick_2"], "sample_2")):
        button.click(picking(choice), [owner, c["folder"], c["pref_samples_state"], c["pref_better"]],
                     judge_outputs, api_name=f"pick_{choice}")

    def on_train(who: str, folder: str | None, mix: str | None, request: gr.Request,
                 oauth_token: Optional[gr.OAuthToken] = None):
        from finetune.hub import resolve_token

        hub_token = resolve_token(oauth_token, None, machine_tokens=False) if ctx.on_space else None
        status, run_id = train_on_preferences(ctx, owner_of(who, request.session_hash), folder, mix, hub_token)
        return status, run_id or gr.skip(), gr.Timer(active=bool(run_id))

    c["pref_train"].click(on_train, [owner, c["folder"], c["pref_mix"]],
                          [c["pref_run_status"], c["pref_run"], c["pref_timer"]], concurrency_limit=2,
                          api_name="train_on_preferences")

    def on_loop_poll(who: str, run_id: str | None, request: gr.Request):
        from .train_tab import run_choices

        me = owner_of(who, request.session_hash)
        status, ended = loop_run_view(ctx, me, run_id)
        runs = gr.skip()
        if ended and run_id:
            with_weights = run_choices(ctx, me, with_weights=True)
            pick = {"value": run_id} if run_id in {r for _, r in with_weights} else {}
            runs = gr.update(choices=with_weights, **pick)
        return status, gr.Timer(active=not ended), runs

    c["pref_timer"].tick(on_loop_poll, [owner, c["pref_run"]], [c["pref_run_status"], c["pref_timer"], c["run"]],
                         show_progress="hidden", api_visibility="private")
