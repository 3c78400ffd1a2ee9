"""The whole app: five tabs on one page, a session that survives reloads, and launch settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import gradio as gr

from .compare_tab import create_compare_tab, wire_compare_tab
from .context import AppContext, create_context, session_owner
from .data_tab import create_data_tab, wire_data_tab
from .export_tab import create_export_tab, wire_export_tab
from .forms import DATA_FIELDS
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
        owner = gr.State("")
        saved = gr.BrowserState({"owner": "", "last_run": ""}, storage_key=SESSION_KEY, secret=ctx.secret)
        with gr.Row(elem_classes="ft-header"):
            gr.Markdown(f"# {TITLE}\nData → settings → live training → side-by-side chat → export. "
                        "Every run is also a YAML file and a CLI command.", elem_classes="ft-title")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("1 · Data", id="data", elem_id="tab-data"):
                data = create_data_tab(ctx)
            with gr.Tab("2 · Model & settings", id="settings", elem_id="tab-settings"):
                settings = create_settings_tab(hub_ok)
            with gr.Tab("3 · Train", id="train", elem_id="tab-train"):
                train = create_train_tab()
            with gr.Tab("4 · Compare", id="compare", elem_id="tab-compare"):
                compare = create_compare_tab(ctx)
            with gr.Tab("5 · Export & share", id="export", elem_id="tab-export"):
                export = create_export_tab(ctx)
        gr.Markdown(f"Workspace: `{ctx.workspace}` · runs are kept on disk and listed again after a restart.",
                    elem_classes="ft-footer")

        form = settings_form(settings)
        data_form = {k: data[k] for k in DATA_FIELDS if k in data}
        wire_data_tab(ctx, data, form, owner)
        wire_settings_tab(ctx, settings, data["data_state"])
        wire_train_tab(ctx, train, owner=owner, saved=saved, data_state=data["data_state"], data_form=data_form,
                       settings_form=form, run_lists=[compare["run"], export["run"]])
        wire_compare_tab(ctx, compare, owner=owner)
        wire_export_tab(ctx, export, owner=owner)

        def on_page_load(stored: dict, profile: Optional[gr.OAuthProfile], **values):
            return restore_session(ctx, stored, getattr(profile, "username", None) if profile else None, values)

        demo.load(on_page_load, saved,
                  [owner, saved, train["run"], compare["run"], export["run"], train["timer"], settings["memory"]],
                  inputs_kwargs=form, api_visibility="private")
    demo.queue(default_concurrency_limit=4, max_size=256)
    demo.ctx = ctx  # for tests and app.py
    _ = tabs
    return demo


def restore_session(ctx: AppContext, stored: dict | None, username: str | None, settings: dict[str, Any]) -> tuple:
    """Page load: who this browser is, its runs, and the last run reattached to the live view."""
    owner = session_owner(stored, username)
    runs = run_choices(ctx, owner)
    ids = {run_id for _, run_id in runs}
    last = (stored or {}).get("last_run") if isinstance(stored, dict) else None
    last = last if last in ids else (runs[0][1] if runs else None)
    with_weights = run_choices(ctx, owner, with_weights=True)
    weights_value = last if last in {r for _, r in with_weights} else None
    return (owner, {"owner": owner if owner.startswith("s:") else "", "last_run": last or ""},
            gr.update(choices=runs, value=last), gr.update(choices=with_weights, value=weights_value),
            gr.update(choices=with_weights, value=weights_value), gr.Timer(active=bool(last)),
            update_memory(settings))


def launch_kwargs(ctx: AppContext) -> dict[str, Any]:
    """Theme, CSS and limits for `demo.launch` (Gradio 6 takes them there, not in Blocks)."""
    return {"theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="amber", neutral_hue="slate"),
            "css": CSS, "max_file_size": ctx.max_upload_bytes, "show_error": True, "ssr_mode": False}
