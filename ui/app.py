"""The whole app: six tabs on one page, runs and a form that survive reloads, and launch settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gradio as gr

from .compare_tab import create_compare_tab, wire_compare_tab
from .context import AppContext, create_context, owner_of
from .data_tab import FORM_FIELDS as DATA_TAB_FIELDS
from .data_tab import LOAD_OUTPUTS, create_data_tab, data_form, example_datasets, load_data, load_outputs, wire_data_tab
from .export_tab import create_export_tab, wire_export_tab
from .forms import DATA_FIELDS
from .runs_tab import create_runs_tab, wire_runs_tab
from .settings_tab import create_settings_tab, settings_form, update_memory, wire_settings_tab
from .train_tab import create_train_tab, run_choices, wire_train_tab

TITLE = "finetune: LoRA, QLoRA and full fine-tuning"
CSS = (Path(__file__).with_name("style.css")).read_text(encoding="utf-8")
SESSION_KEY = "finetune-session"


def build_app(ctx: AppContext | None = None, *, hub_ok: bool | None = None) -> gr.Blocks:
    """The Gradio Blocks of the app on `ctx` (default: the workspace from FINETUNE_WORKSPACE)."""
    ctx = ctx or create_context()
    if hub_ok is None:
        from finetune.models import hub_reachable

        hub_ok = hub_reachable(timeout_s=2.0)
    with gr.Blocks(title=TITLE, fill_width=False) as demo:
        owner = gr.State(ctx.policy.initial_owner)
        saved = gr.BrowserState({"owner": "", "last_run": ""}, storage_key=SESSION_KEY, secret=ctx.secret)
        with gr.Row(elem_classes="ft-header"):
            gr.Markdown(f"# {TITLE}\nData → settings → live training → side-by-side chat → export. "
                        "Every run is also a YAML file and a CLI command.", elem_classes="ft-title")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("1 · Data", id="data", elem_id="tab-data"):
                data = create_data_tab(ctx)
            with gr.Tab("2 · Model & settings", id="settings", elem_id="tab-settings"):
                settings = create_settings_tab(hub_ok)
            with gr.Tab("3 · Train", id="train", elem_id="tab-train") as train_tab:
                train = create_train_tab()
            with gr.Tab("4 · Compare", id="compare", elem_id="tab-compare"):
                compare = create_compare_tab(ctx)
            with gr.Tab("5 · Export & share", id="export", elem_id="tab-export"):
                export = create_export_tab(ctx)
            with gr.Tab("6 · Runs", id="runs", elem_id="tab-runs") as runs_tab:
                runs = create_runs_tab()
        footer = gr.Markdown(elem_classes="ft-footer", elem_id="footer")  # filled on page load: whose runs

        form = settings_form(settings)
        run_data_form = {k: data[k] for k in DATA_FIELDS if k in data}  # the data fields of a RunConfig
        wire_data_tab(ctx, data, form, owner)
        wire_settings_tab(ctx, settings, data["data_state"])
        wire_train_tab(ctx, train, owner=owner, saved=saved, data_state=data["data_state"], data_form=run_data_form,
                       settings_form=form, run_lists=[compare["run"], export["run"]], tab=train_tab)
        wire_compare_tab(ctx, compare, owner=owner)
        wire_export_tab(ctx, export, owner=owner)
        wire_runs_tab(ctx, runs, owner=owner, tab=runs_tab)

        # The whole form (data source, dataset, every setting) is saved per owner as it changes, and restored
        # with the owner's runs when a page loads; a dataset that was loaded is loaded again.
        whole_form = {**data_form(data), **form}
        wire_form_saving(ctx, whole_form, owner, data["data_state"])

        def on_page_load(stored: dict, profile: Optional[gr.OAuthProfile], **values):
            return restore_session(ctx, stored, getattr(profile, "username", None) if profile else None, values)

        def on_reload_data(who: str, request: gr.Request, **values):
            return reload_data(ctx, owner_of(who, request.session_hash), values)

        demo.load(on_page_load, saved,
                  [owner, saved, train["run"], compare["run"], export["run"], runs["runs"], train["timer"],
                   settings["memory"], footer, *whole_form.values()],
                  inputs_kwargs=whole_form, api_visibility="private") \
            .then(on_reload_data, owner, load_outputs(data), inputs_kwargs=whole_form, api_visibility="private")
    demo.queue(default_concurrency_limit=4, max_size=256)
    demo.ctx = ctx  # for tests and app.py
    _ = tabs
    return demo


def restore_session(ctx: AppContext, stored: dict | None, username: str | None, values: dict[str, Any]) -> tuple:
    """Page load: who this browser is (`ctx.policy`), its runs, the last run reattached to the live view, the footer
    saying whose runs these are, and its saved form (`values`: the form as the page starts, in the order of the
    widgets it updates)."""
    owner = ctx.policy.owner(stored, username)
    runs = run_choices(ctx, owner)
    ids = {run_id for _, run_id in runs}
    last = (stored or {}).get("last_run") if isinstance(stored, dict) else None
    last = last if last in ids else (runs[0][1] if runs else None)
    with_weights = run_choices(ctx, owner, with_weights=True)
    weights_value = last if last in {r for _, r in with_weights} else None
    restored = restorable_values(ctx.saved_form(owner)["values"], values)
    return (owner, {"owner": owner if owner.startswith("s:") else "", "last_run": last or ""},
            gr.update(choices=runs, value=last), gr.update(choices=with_weights, value=weights_value),
            gr.update(choices=with_weights, value=weights_value), gr.update(choices=runs),
            gr.Timer(active=bool(last)), update_memory({**values, **restored}),
            ctx.policy.describe(ctx.workspace, owner),
            *[gr.update(value=restored[name]) if name in restored else gr.skip() for name in values])


def restorable_values(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The saved form values that still fit the page: fields it still has, an example that still ships, an upload
    whose file is still there."""
    out = {name: value for name, value in saved.items() if name in current}
    if "example" in out and out["example"] not in example_datasets():
        del out["example"]
    if out.get("upload") and not Path(out["upload"]).is_file():
        del out["upload"]
    return out


def reload_data(ctx: AppContext, owner: str, values: dict[str, Any]) -> tuple:
    """After a reload: load the dataset again if one was loaded (the Data tab's outputs), else change nothing.
    `values`: the restored form."""
    if not ctx.saved_form(owner)["loaded"]:
        return tuple(gr.skip() for _ in LOAD_OUTPUTS)
    data_values = {name: values.get(name) for name in DATA_TAB_FIELDS}
    settings = {name: value for name, value in values.items() if name not in data_values}
    return load_data(ctx, owner, data_values, settings)


def wire_form_saving(ctx: AppContext, widgets: dict[str, Any], owner: gr.State, data_state: gr.State) -> None:
    """Save each form widget's value as it changes, and whether a dataset is loaded, for the page's owner."""
    def saver(name: str):
        def save(who: str, value: Any):
            if who:  # "" only before the page has loaded (or for API clients in a Space): nobody's form yet
                ctx.save_form(who, {name: value})
        return save

    for name, widget in widgets.items():
        widget.change(saver(name), [owner, widget], None, queue=False, show_progress="hidden",
                      api_visibility="private")

    def save_loaded(who: str, state: dict):
        if who:
            ctx.save_form(who, loaded=bool(state))

    data_state.change(save_loaded, [owner, data_state], None, queue=False, show_progress="hidden",
                      api_visibility="private")


def launch_kwargs(ctx: AppContext) -> dict[str, Any]:
    """Theme, CSS and limits for `demo.launch` (Gradio 6 takes them there, not in Blocks)."""
    return {"theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="amber", neutral_hue="slate"),
            "css": CSS, "max_file_size": ctx.max_upload_bytes, "show_error": True, "ssr_mode": False}
