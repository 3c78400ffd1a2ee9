"""Train tab: Start (queued, one training at a time), Stop, and a live view polled from the run folder: progress
with step, epoch and ETA, train/validation loss, learning rate (and, for preference stages, the reward margin and
accuracy), the log tail, and the final metrics table."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import gradio as gr
import pandas as pd

from finetune.errors import FinetuneError
from finetune.estimate import duration_text
from finetune.hub import resolve_token
from finetune.run_folder import RunFolder
from finetune.runs import RunStatus, RunSummary

from .context import AppContext, owner_of
from .data_tab import DataSource, data_config
from .messages import error_md, notice_md, ok_md, warning_md
from .settings_tab import duration_estimate, memory_check

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
LOSS_COLUMNS = {"step": "int64", "loss": "float64", "split": "str"}  # column → dtype
LR_COLUMNS = {"step": "int64", "learning_rate": "float64"}
REWARD_COLUMNS = {"step": "int64", "value": "float64", "reward": "str"}
# The preference stages' per-step rewards the reward plot shows (metrics field → series name).
REWARD_SERIES = {"rewards/margins": "margin", "rewards/accuracies": "accuracy"}
METRICS_HEADERS = ["metric", "value"]
# After each new log: scroll the log box to its last line, unless the user scrolled up to read (then it waits until
# they scroll back to the bottom). Gradio's own autoscroll stops for good once a poll adds more than ~100 px at once.
# A box not shown yet (its tab just opened) is waited for, up to 1 s.
FOLLOW_LOG_JS = """() => { let tries = 0; const follow = () => {
  const box = document.querySelector('#train-log textarea');
  if (!box || !box.clientHeight) { if (++tries < 20) setTimeout(follow, 50); return; }
  if (!box.dataset.follow) {
    box.dataset.follow = '1';
    box.addEventListener('scroll', () => {
      box.dataset.follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 8 ? '1' : '0';
    });
  }
  if (box.dataset.follow === '1') box.scrollTop = box.scrollHeight;
}; setTimeout(follow, 50); }"""


# ============================================================================ pure views of a run's status

def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:  # None or NaN
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_numbers(status: RunStatus) -> dict[str, Any]:
    """step, total, fraction (0..1), epoch, elapsed and ETA (seconds) from the metrics so far."""
    records = [m for m in status.metrics if m.get("step") is not None]
    step = max((m["step"] for m in records), default=0)
    total = status.total_steps or 0
    if status.state == "finished" and total:
        step = total
    last = max(records, key=lambda m: (m["step"], m.get("elapsed_s") or 0), default={})
    elapsed = last.get("elapsed_s")
    eta = None
    if elapsed and step and total and step < total:
        eta = elapsed / step * (total - step)  # seconds, at the average pace so far
    fraction = min(1.0, step / total) if total else 0.0
    return {"step": step, "total": total, "fraction": fraction, "epoch": last.get("epoch"), "elapsed": elapsed,
            "eta": eta}


def progress_html(status: RunStatus) -> str:
    p = progress_numbers(status)
    percent = 100 * p["fraction"]
    parts = [f"step {p['step']}/{p['total'] or '?'}"]
    if p["epoch"] is not None:
        parts.append(f"epoch {p['epoch']:.2f}")
    parts.append(f"{percent:.0f}%")
    parts.append(f"elapsed {format_duration(p['elapsed'])}")
    if status.state in ("running", "stopping"):
        parts.append(f"ETA {format_duration(p['eta'])}")
    kind = {"failed": "failed", "stopped": "stopped", "finished": "finished"}.get(status.state, "running")
    return (f'<div class="ft-progress ft-{kind}" role="progressbar" aria-valuenow="{percent:.0f}" '
            f'aria-valuemin="0" aria-valuemax="100"><div class="ft-bar" style="width:{percent:.1f}%"></div></div>'
            f'<div class="ft-progress-text" id="train-progress-text">{" · ".join(parts)}</div>')


def _typed_frame(rows: list[list], columns: dict[str, str]) -> pd.DataFrame:
    """A DataFrame with fixed dtypes even when empty: the plot takes its axis types (numeric or category)
    from the dtypes, and an empty frame's default `object` would make every axis a category."""
    frame = pd.DataFrame(rows, columns=list(columns))
    return frame.astype(columns)


def loss_frame(metrics: list[dict]) -> pd.DataFrame:
    # One point without a value per series first: the plot fixes its colour legend from the first data it
    # gets, so both series must be in it from the start (points without a y value are not drawn).
    rows = [[0, float("nan"), "train"], [0, float("nan"), "validation"]]
    rows += [[m["step"], m["loss"], "train"] for m in metrics if m.get("loss") is not None]
    rows += [[m["step"], m["eval_loss"], "validation"] for m in metrics if m.get("eval_loss") is not None]
    return _typed_frame(rows, LOSS_COLUMNS)


def lr_frame(metrics: list[dict]) -> pd.DataFrame:
    rows = [[m["step"], m["learning_rate"]] for m in metrics if m.get("learning_rate") is not None]
    return _typed_frame(rows, LR_COLUMNS)


def has_rewards(metrics: list[dict]) -> bool:
    """True for a preference stage's metrics (SFT logs no rewards)."""
    return any(m.get(field) is not None for m in metrics for field in REWARD_SERIES)


def reward_frame(metrics: list[dict]) -> pd.DataFrame:
    """A preference stage's reward margin (chosen minus rejected reward) and accuracy (share of pairs whose chosen
    reward is higher) per logged step. Both series are seeded with a point without a value, as in `loss_frame`."""
    rows = [[0, float("nan"), name] for name in REWARD_SERIES.values()]
    rows += [[m["step"], m[field], name] for field, name in REWARD_SERIES.items() for m in metrics
             if m.get(field) is not None]
    return _typed_frame(rows, REWARD_COLUMNS)


def _fmt(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value == float("inf"):
        return "∞"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def metrics_table(results: dict) -> list[list[str]]:
    """The end-of-run table: losses, perplexities, test perplexity before → after, speed, trainable share."""
    r = results
    runtime = r.get("train_runtime")
    tokens_per_s = (r["num_tokens"] / runtime) if r.get("num_tokens") and runtime else None
    rows = [
        ["train loss", _fmt(r.get("train_loss"))],
        ["validation loss", _fmt(r.get("eval_loss"))],
        ["train perplexity", _fmt(r.get("train_perplexity"))],
        ["validation perplexity", _fmt(r.get("eval_perplexity"))],
        ["test perplexity before → after",
         f"{_fmt(r.get('test_perplexity_before'))} → {_fmt(r.get('test_perplexity_after'))}"],
        ["runtime", format_duration(runtime)],
        ["samples / s", _fmt(r.get("train_samples_per_second"), ".3g")],
        ["tokens / s", _fmt(tokens_per_s, ".4g")],
        ["trainable parameters", _with_unit(r.get("trainable_params"), ",",
                                            f" ({_fmt(r.get('trainable_percent'), '.3g')}%)")],
        ["peak memory", _with_unit(r.get("peak_memory_mb"), ".0f", " MB")],
        ["steps", _fmt(r.get("global_step"), "d")],
    ]
    if r.get("estimated_duration_s") is not None:
        actual = r.get("actual_duration_s")
        rows.insert(6, ["duration: estimated → actual", f"{duration_text(r['estimated_duration_s'])} → "
                                                        f"{'-' if actual is None else duration_text(actual)}"])
    if r.get("is_demo_model"):
        rows.append(["base model", "tiny offline demo model (answers are only meaningful on trained prompts)"])
    return rows


def _with_unit(value, spec: str, unit: str) -> str:
    """`_fmt(value) + unit`, or a bare "-" when the value is missing ("- MB" read as a measurement)."""
    return "-" if value is None else _fmt(value, spec) + unit


def status_markdown(status: RunStatus) -> str:
    name = f"Run `{status.run_id[:8]}`"
    if status.state == "queued":
        ahead = (status.queue_position or 1) - 1
        return notice_md(f"{name} is waiting in the queue: position {status.queue_position} "
                         f"({ahead} run{'s' if ahead != 1 else ''} ahead of it, plus the training in progress). "
                         "One training runs at a time on this machine; it starts by itself.")
    if status.state == "running":
        if not status.metrics:
            return notice_md(f"{name} is starting: loading the model and tokenising the data…")
        return notice_md(f"{name} is training.")
    if status.state == "stopping":
        return warning_md(f"{name} is stopping: saving a checkpoint and the adapter…")
    if status.state == "finished":
        return ok_md(f"{name} finished. Try it in **Compare**, or download it in **Export**.")
    if status.state == "stopped":
        usable = " The adapter saved at the stop is usable in Compare and Export." if status.final_dir else ""
        return warning_md(f"{name} was stopped.{usable}")
    return error_md(f"{name} failed: {status.error or 'see the log below'}")


# ============================================================================ handlers

def run_choices(ctx: AppContext, owner: str, *, with_weights: bool = False) -> list[tuple[str, str]]:
    return [(run_label(s, last_loss(RunFolder(ctx.runs.runs_dir / s.run_id).read_metrics())), s.run_id)
            for s in ctx.runs.list_runs(owner) if s.has_weights or not with_weights]


def last_loss(metrics: list[dict]) -> float | None:
    """The last logged train loss: what the loss plot ends at (the results' train_loss averages the whole run)."""
    return next((m["loss"] for m in reversed(metrics) if m.get("loss") is not None), None)


def run_label(summary: RunSummary, loss: float | None) -> str:
    """The run list's label: when, model, method, data, state (as of now), the last logged loss, short id."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(summary.created))
    last = f", last loss {loss:.3f}" if loss is not None else ""
    return (f"{when} · {summary.base_model} · {summary.method} · {summary.dataset} · {summary.state}{last} · "
            f"{summary.run_id[:6]}")


def start_training(ctx: AppContext, owner: str, data_state: dict, data_values: dict, settings: dict,
                   force: bool = False, oauth_token: Any = None) -> tuple[str, str | None]:
    """Validate, check memory, queue the run. Returns (status markdown, run id or None).

    In a Space the run loads Hub repos with the signed-in visitor's token (`oauth_token`) or with none: never the
    owner's (finetune.hub.keep_owner_token_from_visitors)."""
    if not data_state or not data_state.get("dataset"):
        return error_md("No dataset yet: load one on the **Data** tab first."), None
    file = data_state.get("file")
    source = DataSource(data_state["dataset"], None if file is None else Path(file),
                        data_state.get("name") or "dataset")
    try:
        config = data_config(data_values, settings, source)
        report, short = memory_check(config)
        if short is not None and not force:
            return report + "\n\n" + error_md(f"Not started: by the memory estimate, {short}. Change the settings, "
                                              "or tick “Start anyway”."), None
        hub_token = resolve_token(oauth_token, None, machine_tokens=False) if ctx.on_space else None
        estimate = duration_estimate(config, data_state)
        run_id = ctx.runs.submit(config, owner, dataset_file=source.file, dataset_name=source.name,
                                 num_processes=int(settings.get("num_processes") or 1), hub_token=hub_token)
    except FinetuneError as e:
        return error_md(str(e)), None
    expected = ""
    if estimate is not None:  # results.json sets it beside the actual duration when the run ends
        RunFolder(ctx.runs.run_dir(run_id, owner)).write_estimate(
            {"duration_s": estimate.total_s, "train_s": estimate.train_s, "eval_s": estimate.eval_s,
             "tokens_per_s": estimate.tokens_per_s, "train_tokens": estimate.train_tokens})
        expected = f" Expected duration: about {duration_text(estimate.total_s)}."
    position = ctx.runs.queue_position(run_id)
    where = f" It is number {position} in the queue." if position else " It started at once."
    return ok_md(f"Run `{run_id[:8]}` queued.{where}{expected}"), run_id


def poll(ctx: AppContext, owner: str, run_id: str | None, view: dict) -> tuple:
    """The live view of `run_id`: (status, progress, loss plot, lr plot, log, metrics table, timer, view state,
    reward plot: shown for preference stages only).

    Plots are re-sent only when new metrics arrived (`view` remembers how many were shown)."""
    if not run_id:
        return (notice_md("No run selected. Start one with **Start training**."), "", gr.skip(), gr.skip(), "",
                gr.update(visible=False), gr.Timer(active=False), {}, gr.update(visible=False))
    try:
        status = ctx.runs.status(run_id, owner)
    except FinetuneError as e:
        return (error_md(str(e)), "", None, None, "", gr.update(visible=False), gr.Timer(active=False), {},
                gr.update(visible=False))
    n = len(status.metrics)
    fresh = view.get("run_id") != run_id or view.get("n") != n or view.get("state") != status.state
    loss = plot_update(loss_frame(status.metrics), "loss") if fresh else gr.skip()
    lr = plot_update(lr_frame(status.metrics), "learning_rate") if fresh else gr.skip()
    rewards = reward_view(status.metrics) if fresh else gr.skip()
    table = gr.update(value=metrics_table(status.results), visible=True) if status.results and status.done \
        else gr.update(visible=False)
    # the state moved on since the last poll of this run: what an action's message said about it is outdated
    changed = view.get("run_id") == run_id and view.get("state") not in (None, status.state)
    return (status_markdown(status), progress_html(status), loss, lr, status.log_tail, table,
            gr.Timer(active=not status.done), {"run_id": run_id, "n": n, "state": status.state, "changed": changed},
            rewards)


def reward_view(metrics: list[dict]) -> dict:
    """The reward plot's update: the rewards so far, or hidden for a run without them."""
    return gr.update(value=reward_frame(metrics), visible=True) if has_rewards(metrics) else gr.update(visible=False)


def plot_update(frame: pd.DataFrame, column: str) -> dict:
    """A plot shown only once it has a point to draw (an empty one shows a meaningless 0.000000 axis)."""
    return gr.update(value=frame, visible=bool(frame[column].notna().any()))


def stop_run(ctx: AppContext, owner: str, run_id: str | None) -> str:
    if not run_id:
        return error_md("No run selected.")
    try:
        state = ctx.runs.stop(run_id, owner)
    except FinetuneError as e:
        return error_md(str(e))
    if state == "stopping":
        return warning_md("Stopping: the trainer saves a checkpoint and the adapter, then ends.")
    return notice_md(f"The run is {state}.")


def resume_run(ctx: AppContext, owner: str, run_id: str | None) -> str:
    """Queue a failed or stopped run again; it continues from its last complete checkpoint."""
    if not run_id:
        return error_md("No run selected.")
    try:
        state = ctx.runs.resume(run_id, owner)
    except FinetuneError as e:
        return error_md(str(e))
    config = ctx.runs.status(run_id, owner).config
    where = (f"from `{Path(config.resume_from_checkpoint).name}`" if config and config.resume_from_checkpoint
             else "from the start (it had no complete checkpoint)")
    position = ctx.runs.queue_position(run_id)
    queued = f" It is number {position} in the queue." if position else ""
    return ok_md(f"Run `{run_id[:8]}` resumes {where}; it is {state}.{queued}")


# ============================================================================ layout and wiring

def create_train_tab() -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row(equal_height=True):
        c["start"] = gr.Button("Start training", variant="primary", scale=2, elem_id="train-start")
        c["stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="train-stop")
        c["resume"] = gr.Button("Resume", scale=1, elem_id="train-resume")
        c["force"] = gr.Checkbox(label="Start anyway when the memory estimate says it won't fit", value=False,
                                 scale=2, elem_id="train-force")
    c["message"] = gr.Markdown(elem_id="train-message")
    with gr.Row():
        c["run"] = gr.Dropdown([], value=None, label="Run", allow_custom_value=True, scale=4, elem_id="train-run",
                               info="Your runs on this machine, newest first.")
        c["refresh"] = gr.Button("↻ Refresh list", scale=1, size="sm")
    c["status"] = gr.Markdown(elem_id="train-status")
    c["progress"] = gr.HTML(elem_id="train-progress")
    with gr.Row():
        c["loss_plot"] = gr.LinePlot(loss_frame([]), x="step", y="loss", color="split",
                                     title="Loss", color_map={"train": "#6366f1", "validation": "#f59e0b"},
                                     height=280, elem_id="train-loss-plot", x_title="step", y_title="loss",
                                     visible=False)
        c["lr_plot"] = gr.LinePlot(lr_frame([]), x="step", y="learning_rate",
                                   title="Learning rate", height=280, elem_id="train-lr-plot", y_axis_format=".1e",
                                   visible=False)
        c["reward_plot"] = gr.LinePlot(reward_frame([]), x="step", y="value", color="reward",
                                       title="Preference rewards", height=280, visible=False,
                                       color_map={"margin": "#059669", "accuracy": "#d97706"},
                                       elem_id="train-reward-plot", x_title="step", y_title="")
    c["metrics"] = gr.Dataframe(headers=METRICS_HEADERS, label="Results", interactive=False, visible=False,
                                elem_id="train-metrics")
    c["log"] = gr.Textbox(label="Log (last lines)", lines=10, max_lines=10, autoscroll=True, interactive=False,
                          elem_id="train-log", elem_classes="ft-log")
    c["timer"] = gr.Timer(POLL_INTERVAL_S, active=False)
    c["view"] = gr.State({})
    return c


def wire_train_tab(ctx: AppContext, c: dict, *, owner: gr.State, saved: gr.BrowserState, data_state: gr.State,
                   data_form: dict, settings_form: dict, run_lists: list, tab: gr.Tab) -> None:
    view_outputs = [c["status"], c["progress"], c["loss_plot"], c["lr_plot"], c["log"], c["metrics"], c["timer"],
                    c["view"], c["reward_plot"]]

    def on_start(who: str, stored: dict, state: dict, force: bool, request: gr.Request,
                 oauth_token: Optional[gr.OAuthToken] = None, **values):
        me = owner_of(who, request.session_hash)
        data_values = {k: values.pop(k) for k in data_form}
        message, run_id = start_training(ctx, me, state, data_values, values, bool(force), oauth_token)
        stored = dict(stored or {})
        if run_id:
            stored["last_run"] = run_id
        with_weights = run_choices(ctx, me, with_weights=True)
        runs = gr.update(choices=run_choices(ctx, me), value=run_id) if run_id else gr.update()
        return (message, runs, stored,
                gr.Timer(active=bool(run_id)), *[gr.update(choices=with_weights) for _ in run_lists])

    c["start"].click(on_start, [owner, saved, data_state, c["force"]],
                     [c["message"], c["run"], saved, c["timer"], *run_lists],
                     inputs_kwargs={**data_form, **settings_form}, concurrency_limit=2, api_name="start_training")

    def on_poll(who: str, run_id: str | None, view: dict, request: gr.Request):
        return poll(ctx, owner_of(who, request.session_hash), run_id, view or {})

    c["timer"].tick(on_poll, [owner, c["run"], c["view"]], view_outputs, show_progress="hidden",
                    concurrency_limit=16, api_name="poll")
    c["log"].change(None, None, None, js=FOLLOW_LOG_JS, show_progress="hidden", api_visibility="private")
    # a log filled while another tab showed (the page load's run) has no box to scroll yet: scroll it on opening
    tab.select(None, None, None, js=FOLLOW_LOG_JS, show_progress="hidden", api_visibility="private")
    c["run"].change(lambda: {}, None, c["view"], show_progress="hidden", api_visibility="private") \
        .then(on_poll, [owner, c["run"], c["view"]], view_outputs, show_progress="hidden", api_visibility="private")

    def on_stop(who: str, run_id: str | None, request: gr.Request):
        return stop_run(ctx, owner_of(who, request.session_hash), run_id), gr.Timer(active=True)

    c["stop"].click(on_stop, [owner, c["run"]], [c["message"], c["timer"]], concurrency_limit=4, api_name="stop")

    def on_resume(who: str, run_id: str | None, request: gr.Request):
        """A failed or stopped run continues from its last checkpoint (same folder, same settings)."""
        me = owner_of(who, request.session_hash)
        message = resume_run(ctx, me, run_id)
        return message, {}, gr.Timer(active=True), gr.update(choices=run_choices(ctx, me))  # relabelled: queued

    c["resume"].click(on_resume, [owner, c["run"]], [c["message"], c["view"], c["timer"], c["run"]],
                      concurrency_limit=4, api_name="resume")

    def on_refresh(who: str, run_id: str | None, request: gr.Request):
        me = owner_of(who, request.session_hash)
        return (gr.update(choices=run_choices(ctx, me), value=run_id),
                *[gr.update(choices=run_choices(ctx, me, with_weights=True)) for _ in run_lists])

    c["refresh"].click(on_refresh, [owner, c["run"]], [c["run"], *run_lists], show_progress="hidden",
                       api_name="list_runs")

    def on_state_change(who: str, view: dict, request: gr.Request):
        """The run's state moved on: relabel it in the Train list and clear the outdated action message; once it
        ended, offer it in Compare and Export."""
        view = view or {}
        if not view.get("changed"):
            return [gr.skip() for _ in range(2 + len(run_lists))]
        me = owner_of(who, request.session_hash)
        if view.get("state") not in ("finished", "stopped", "failed"):
            return gr.update(choices=run_choices(ctx, me)), "", *[gr.skip() for _ in run_lists]
        with_weights = run_choices(ctx, me, with_weights=True)
        pick = {"value": view["run_id"]} if view["run_id"] in {r for _, r in with_weights} else {}
        return (gr.update(choices=run_choices(ctx, me)), "",
                *[gr.update(choices=with_weights, **pick) for _ in run_lists])

    c["view"].change(on_state_change, [owner, c["view"]], [c["run"], c["message"], *run_lists],
                     show_progress="hidden", api_visibility="private")

