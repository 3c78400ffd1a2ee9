"""Runs tab: compare runs. Pick two or more of your runs: their loss curves overlaid (train and validation per
run), and their settings and results side by side with the rows where they differ highlighted."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from finetune.config import RunConfig
from finetune.errors import FinetuneError
from finetune.runs import RunStatus

from .context import AppContext, owner_of
from .messages import error_md, notice_md, ok_md
from .train_tab import metrics_table, run_choices

# Settings shown for every comparison (the rest of RunConfig only where the runs differ), in this order.
KEY_SETTINGS = ("base_model", "method", "dataset", "num_train_epochs", "max_steps", "learning_rate", "batch_size",
                "gradient_accumulation_steps", "max_seq_length", "lora_r", "lora_alpha", "seed")
# Different for any two runs by construction (each run has its own folder): never compared.
NOT_COMPARED = ("output_dir", "resume_from_checkpoint")
DIFF_STYLE = "background-color: #fef3c7; font-weight: 600"  # amber: the rows where the runs differ
PLOT_COLUMNS = {"step": "int64", "loss": "float64", "run": "str", "split": "str"}  # column → dtype
RUN_COLOURS = ["#4f46e5", "#d97706", "#059669", "#e11d48", "#0284c7", "#7c3aed"]  # one per run; repeats after six


def run_name(status: RunStatus) -> str:
    """A run's short name, as the Train tab's messages say it."""
    return status.run_id[:8]


def setting_value(status: RunStatus, name: str) -> str:
    """Setting `name` of a run, as text. The dataset is named by its file (each run holds its own copy)."""
    config = status.config
    if config is None:
        return "?"
    value = getattr(config, name)
    if name == "dataset" and value and Path(value).is_relative_to(status.run_dir):
        return Path(value).name
    if value is None:
        return "-"
    if name == "max_steps" and value == -1:
        return "- (epochs decide)"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)


def compare_table(runs: list[RunStatus]) -> tuple[list[str], list[list[str]], list[bool]]:
    """(headers, rows, differs): one column per run; the key settings, every other setting on which the runs
    differ, then their state and results (as the Train tab shows them). `differs[i]`: row i is not the same
    for all runs."""
    headers = ["", *(run_name(r) for r in runs)]
    rows: list[list[str]] = []
    names = [f.name for f in dataclasses.fields(RunConfig) if f.name not in NOT_COMPARED]
    others = [n for n in names if n not in KEY_SETTINGS]
    for name in KEY_SETTINGS:
        rows.append([name, *(setting_value(r, name) for r in runs)])
    for name in others:
        values = [setting_value(r, name) for r in runs]
        if len(set(values)) > 1:
            rows.append([name, *values])
    rows.append(["state", *(r.state for r in runs)])
    results = [dict(metrics_table(r.results)) if r.results else {} for r in runs]
    metrics = list(dict.fromkeys(key for table in results for key in table))  # every run's rows, in order
    for metric in metrics:
        rows.append([metric, *(table.get(metric, "-") for table in results)])
    differs = [len(set(row[1:])) > 1 for row in rows]
    return headers, rows, differs


def styled_table(headers: list[str], rows: list[list[str]], differs: list[bool]):
    """The table as a pandas Styler: gr.Dataframe shows its cell styles (the differing rows highlighted)."""
    frame = pd.DataFrame(rows, columns=headers)
    return frame.style.apply(lambda row: [DIFF_STYLE if differs[row.name] else ""] * len(row), axis=1)


def loss_curves(runs: list[RunStatus]) -> pd.DataFrame:
    """Every run's train and validation loss by step: columns step, loss, run, split."""
    rows = []
    for r in runs:
        rows += [[m["step"], m["loss"], run_name(r), "train"] for m in r.metrics if m.get("loss") is not None]
        rows += [[m["step"], m["eval_loss"], run_name(r), "validation"] for m in r.metrics
                 if m.get("eval_loss") is not None]
    return pd.DataFrame(rows, columns=list(PLOT_COLUMNS)).astype(PLOT_COLUMNS)


def loss_figure(runs: list[RunStatus]):
    """The runs' loss curves on one matplotlib figure: one colour per run, train solid, validation dashed. Labels start
    with "run ": matplotlib leaves labels that start with "_" (as run ids may) out of the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = loss_curves(runs)
    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=100)
    for i, r in enumerate(runs):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        for split, style in (("train", "-"), ("validation", "--")):
            points = curves[(curves["run"] == run_name(r)) & (curves["split"] == split)]
            if len(points):
                ax.plot(points["step"], points["loss"], style, color=colour, marker="o" if split == "validation"
                        else None, markersize=3, linewidth=1.6, label=f"run {run_name(r)} {split}")
    ax.set_title("Loss by run: train (solid) and validation (dashed)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.lines:
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.close(fig)
    return fig


def compare_runs(ctx: AppContext, owner: str, run_ids: list[str] | None) -> tuple[str, list[RunStatus], Any]:
    """(message, the runs, settings and results table) for the picked runs (no runs: none could be read)."""
    run_ids = list(dict.fromkeys(run_ids or []))
    if not run_ids:
        return notice_md("Pick two or more runs to compare."), [], None
    try:
        runs = [ctx.runs.status(run_id, owner) for run_id in run_ids]
    except FinetuneError as e:
        return error_md(str(e)), [], None
    headers, rows, differs = compare_table(runs)
    different = [row[0] for row, d in zip(rows, differs) if d]
    if len(runs) < 2:
        message = notice_md("Pick one more run to compare it with.")
    elif different:
        message = ok_md(f"{len(runs)} runs; they differ in: {', '.join(different)} (highlighted).")
    else:
        message = ok_md(f"{len(runs)} runs with the same settings and results.")
    return message, runs, styled_table(headers, rows, differs)


def column_widths(n_runs: int) -> list[str] | None:
    """The table's column widths: the row names, then the runs' columns sharing the rest, so that every run is on
    screen and long values wrap (by content, one long value would push the other runs off to the right)."""
    if not n_runs:
        return None
    return ["24%", *[f"{76 / n_runs:.2f}%"] * n_runs]


# ============================================================================ layout and wiring

def create_runs_tab() -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("### Compare runs", elem_classes="ft-subhead")
    with gr.Row():
        c["runs"] = gr.Dropdown([], value=[], multiselect=True, label="Runs", scale=5, elem_id="runs-pick",
                                info="Two or more of your runs: their curves overlaid, their settings side by side.")
        c["refresh"] = gr.Button("↻ Refresh list", scale=1, size="sm", min_width=120, elem_id="runs-refresh")
    c["message"] = gr.Markdown(notice_md("Pick two or more runs to compare."), elem_id="runs-message")
    # matplotlib, not gr.LinePlot: that plot keeps the series of the first data it shows, and the runs picked change
    c["plot"] = gr.Plot(label="Loss by run", show_label=False, elem_id="runs-loss-plot", visible=False)
    c["table"] = gr.Dataframe(label="Settings and results (differences highlighted)", interactive=False, wrap=True,
                              visible=False, max_height=1200, elem_id="runs-table")  # ~35 rows: no inner scroll
    return c


def wire_runs_tab(ctx: AppContext, c: dict, *, owner: gr.State, tab: gr.Tab) -> None:
    def on_pick(who: str, run_ids: list[str] | None, request: gr.Request):
        message, picked, table = compare_runs(ctx, owner_of(who, request.session_hash), run_ids)
        return (message, gr.update(value=loss_figure(picked) if picked else None, visible=bool(picked)),
                gr.update(value=table, visible=table is not None, column_widths=column_widths(len(picked))))

    c["runs"].change(on_pick, [owner, c["runs"]], [c["message"], c["plot"], c["table"]], show_progress="hidden",
                     api_name="compare_runs")

    def on_refresh(who: str, request: gr.Request):
        # choices only: a value sent back would undo a pick made while this was on its way
        return gr.update(choices=run_choices(ctx, owner_of(who, request.session_hash)))

    for trigger in (c["refresh"].click, tab.select):  # opening the tab lists runs that ended meanwhile
        trigger(on_refresh, owner, c["runs"], show_progress="hidden", api_visibility="private")
