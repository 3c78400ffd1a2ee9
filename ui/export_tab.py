"""Export & share tab: download the adapter (or full model) as a zip, merge the adapter into its base and
download or push that, and push to the Hugging Face Hub (token: Sign in with HF → HF_TOKEN → typed)."""

from __future__ import annotations

import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from finetune.errors import FinetuneError
from finetune.run_folder import RunFolder

from .context import AppContext, owner_of
from .messages import error_md, notice_md, ok_md

log = logging.getLogger(__name__)

EXPORT_ROOT = Path(tempfile.gettempdir()) / "finetune-exports"  # Gradio serves files from the temp dir


def zip_folder(folder: Path, out_zip: Path, extra: list[Path] = ()) -> Path:
    """Zip `folder`'s files (paths relative to it) plus `extra` files at the zip's root."""
    out_zip.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out_zip, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
        for path in extra:
            if path.is_file():
                z.write(path, path.name)
    return out_zip


def export_zip(ctx: AppContext, owner: str, run_id: str | None, which: str = "weights") -> Path:
    """A zip of the run's adapter/ (or model/) — or of merged/ with `which="merged"` — in a fresh temp folder."""
    if not run_id:
        raise FinetuneError("pick a run first")
    run = RunFolder(ctx.runs.run_dir(run_id, owner))
    if which == "merged":
        folder, label = run.merged_dir, "merged"
        if not folder.is_dir():
            raise FinetuneError("this run has no merged model yet; press **Merge** first")
    else:
        folder = run.final_dir
        if folder is None:
            raise FinetuneError("this run has no adapter or model yet: wait until it finishes (or stop it; a "
                                "stopped run saves its adapter)")
        label = folder.name
    out = EXPORT_ROOT / secrets.token_urlsafe(12) / f"{label}-{run_id[:8]}.zip"
    return zip_folder(folder, out, [run.config_file, run.results_file])  # provenance beside the weights


def download_update(path: Path, what: str) -> dict:
    size_mb = path.stat().st_size / 1e6
    return gr.update(value=str(path), label=f"⬇ Download {what} ({size_mb:.1f} MB)", visible=True)


def merge_run(ctx: AppContext, owner: str, run_id: str | None, dtype: str, progress=None) -> str:
    from finetune.merge import merge_adapter

    if not run_id:
        raise FinetuneError("pick a run first")
    run = RunFolder(ctx.runs.run_dir(run_id, owner))
    if progress:
        progress(0.1, desc="Loading base and adapter")
    report = merge_adapter(run.root, run.merged_dir, dtype=dtype)
    check = f" (max |logit difference| vs base + adapter: {report.max_abs_logit_diff:.1e})" \
        if report.max_abs_logit_diff is not None else ""
    return ok_md(f"Merged into a standalone {report.dtype} model{check}.")


def push(ctx: AppContext, owner: str, run_id: str | None, repo: str, what: str, private: bool,
         oauth_token: Any, typed_token: str | None, progress=None, *, include_gguf: bool = False) -> str:
    """Push to the Hub; every error is scrubbed of the token before it is shown."""
    from finetune.hub import push_run, resolve_token, scrub

    # In a Space, HF_TOKEN is the owner's secret: visitors push with their own sign-in or a pasted token only.
    token = resolve_token(oauth_token=oauth_token, typed_token=typed_token, machine_tokens=not ctx.on_space)
    try:
        if not run_id:
            raise FinetuneError("pick a run first")
        if not (repo or "").strip():
            raise FinetuneError("type a repo name, e.g. `my-adapter` (under your user) or `org/my-adapter`")
        run = RunFolder(ctx.runs.run_dir(run_id, owner))
        if token is None:
            raise FinetuneError("no Hugging Face token: sign in with Hugging Face, or paste a token with write "
                                "access (https://huggingface.co/settings/tokens)")
        merged = None
        if what in ("merged", "both") and not run.model_dir.is_dir():
            if not run.merged_dir.is_dir():
                raise FinetuneError("merge the adapter first (press **Merge**), then push the merged model")
            merged = run.merged_dir
        report = (lambda f, msg: progress(f, desc=msg)) if progress else None
        result = push_run(run.root, repo.strip(), what=what, token=token, private=private, merged_dir=merged,
                          include_gguf=include_gguf, progress=report)
    except FinetuneError as e:
        return error_md(scrub(str(e), token))
    except Exception as e:  # unexpected: still never echo the token
        log.error("push failed: %s", scrub(f"{type(e).__name__}: {e}", token))
        return error_md(scrub(f"Push failed ({type(e).__name__}: {e})", token))
    links = ", ".join(f"[{r.repo_id}]({r.url})" for r in result.repos)
    return ok_md(f"Pushed: {links}")


def login_available(ctx: AppContext) -> bool:
    """Sign in with Hugging Face works in a Space with OAuth's libraries installed."""
    if not ctx.on_space:
        return False
    try:
        import authlib  # noqa: F401
        import itsdangerous  # noqa: F401
    except ImportError:
        return False
    return True


# ============================================================================ GGUF for llama.cpp / Ollama

GGUF_QUANTS = [("f32: exact, twice f16's size", "f32"), ("f16: half precision", "f16"),
               ("q8_0: 8-bit, about half of f16", "q8_0"), ("q4_k_m: 4-bit, about a quarter of f16", "q4_k_m")]
PARITY_HEADERS = ["Prompt", "Identical first K tokens", "Same stop", "Max |Δ logit| (prompt)"]


def stream_gguf_export(ctx: AppContext, owner: str, run_id: str | None, quant: str) -> Iterator[tuple[list, Any]]:
    """`export_gguf` on a worker thread: yields (progress messages so far, None) as each arrives, then
    (messages, ExportResult). Its error is raised here, in the caller's thread."""
    from finetune.export import export_gguf

    if not run_id:
        raise FinetuneError("pick a run first")
    run = RunFolder(ctx.runs.run_dir(run_id, owner))  # someone else's run is not found
    messages: queue.Queue = queue.Queue()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = export_gguf(run.root, run.gguf_dir, quant=quant, progress=messages.put)
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e
        finally:
            messages.put(None)

    threading.Thread(target=work, name=f"gguf-export-{run_id[:8]}", daemon=True).start()
    lines: list[str] = []
    while (message := messages.get()) is not None:
        lines.append(message)
        yield lines, None
    if "error" in outcome:
        raise outcome["error"]
    yield lines, outcome["result"]


def parity_rows(report: dict) -> list[list]:
    """export_report.json's parity rows as the table shows them: the whole prompt, yes/no, and the logit gap."""
    k = report["parity"]["compare_tokens"]
    return [[row["prompt"],
             "yes" if row["identical"] else f"no: the first {row['common_prefix_tokens']} of {k} agree",
             "yes" if row["same_stop"] else "no",
             f"{row['max_abs_logit_diff']:.3g}"] for row in report["parity"]["rows"]]


def gguf_summary(result, local: bool) -> str:
    """What was exported (file names and sizes; the folder too when the browser is on this machine) and how it did."""
    parity = result.report["parity"]
    files = ", ".join(f"`{p.name}` ({_size(p)})" for p in (result.gguf_path, result.modelfile_path, result.report_path))
    where = f" in `{result.out_dir}`" if local else ""
    return (f"Exported {files}{where}. "
            f"Parity with the transformers model on {parity['prompts']} prompts (greedy, first "
            f"{parity['compare_tokens']} tokens): identical {parity['identical_first_k_rate']:.0%}, same stop "
            f"{parity['same_stop_rate']:.0%}, max |Δ logit| {parity['max_abs_logit_diff']:.3g}. Chat template, "
            "BOS and stop tokens are the run's.")


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def commands_md(result, local: bool) -> str:
    """How to run the export: with its paths where the app runs on the user's machine, else in the folder the
    downloads go to (a Space's paths mean nothing in a browser)."""
    from finetune.export import run_commands

    commands = run_commands(result.out_dir if local else None, result.report)
    lines = [f"# {label}\n{command}" for label, command in commands.items()]
    heading = ("**Run it** (paths on this machine):" if local else
               "**Run it**: download the files below into one folder, then in that folder:")
    return heading + "\n\n```bash\n" + "\n\n".join(lines) + "\n```"


def download_copies(paths: list[Path]) -> list[str]:
    """`paths` hard-linked (else copied) into a fresh folder in the temp dir, which Gradio serves files from."""
    folder = EXPORT_ROOT / secrets.token_urlsafe(12)
    folder.mkdir(parents=True)
    copies = []
    for path in paths:
        try:
            os.link(path, folder / path.name)
        except OSError:  # another file system
            shutil.copy2(path, folder / path.name)
        copies.append(str(folder / path.name))
    return copies


def export_gguf_updates(ctx: AppContext, owner: str, run_id: str | None, quant: str) -> Iterator[tuple]:
    """The GGUF section's widgets while exporting: (status, parity table, run commands, download files)."""
    hidden = gr.update(visible=False)
    try:
        for lines, result in stream_gguf_export(ctx, owner, run_id, quant):
            if result is None:
                yield notice_md("Exporting to GGUF…\n" + "\n".join(f"- {m}" for m in lines)), hidden, hidden, hidden
    except FinetuneError as e:  # the export extra missing, a run without weights, a failed parity check
        yield error_md(str(e)), hidden, hidden, hidden
        return
    except Exception as e:
        log.exception("GGUF export failed")
        yield error_md(f"GGUF export failed ({type(e).__name__}: {e})"), hidden, hidden, hidden
        return
    files = download_copies([result.gguf_path, result.modelfile_path, result.report_path])
    local = not ctx.on_space
    yield (ok_md(gguf_summary(result, local)), gr.update(value=parity_rows(result.report), visible=True),
           gr.update(value=commands_md(result, local), visible=True), gr.update(value=files, visible=True))


def create_gguf_section(ctx: AppContext) -> dict[str, Any]:
    c: dict[str, Any] = {}
    gr.Markdown("### GGUF for llama.cpp / Ollama", elem_classes="ft-subhead")
    gr.Markdown("A standalone GGUF file with an Ollama Modelfile, then a check that it answers the run's held-out "
                "prompts as the fine-tuned model does.", elem_classes="ft-help")
    with gr.Row():
        c["gguf_quant"] = gr.Radio(GGUF_QUANTS, value="f16", label="Quantisation", elem_id="export-gguf-quant")
        c["gguf_export"] = gr.Button("Export GGUF", elem_id="export-gguf")
    c["gguf_status"] = gr.Markdown(elem_id="export-gguf-status")
    c["gguf_table"] = gr.Dataframe(headers=PARITY_HEADERS, label="Parity: GGUF in llama.cpp vs the run in transformers",
                                   interactive=False, wrap=True, visible=False, elem_id="export-gguf-parity")
    c["gguf_commands"] = gr.Markdown(visible=False, elem_id="export-gguf-commands")
    c["gguf_files"] = gr.File(label="GGUF, Modelfile and export report", file_count="multiple", interactive=False,
                              visible=False, elem_id="export-gguf-files")
    return c


def wire_gguf_section(ctx: AppContext, c: dict, *, owner: gr.State) -> None:
    outputs = [c["gguf_status"], c["gguf_table"], c["gguf_commands"], c["gguf_files"]]

    def on_gguf(who: str, run_id: str | None, quant: str, request: gr.Request):
        yield from export_gguf_updates(ctx, owner_of(who, request.session_hash), run_id, quant)

    c["gguf_export"].click(on_gguf, [owner, c["run"], c["gguf_quant"]], outputs, concurrency_limit=1,
                           concurrency_id="model", api_name="export_gguf")
    c["run"].change(lambda: ("", *[gr.update(visible=False)] * 3), None, outputs, queue=False,
                    api_visibility="private")


# ============================================================================ layout and wiring

def create_export_tab(ctx: AppContext) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["run"] = gr.Dropdown([], value=None, label="Run", allow_custom_value=True, elem_id="export-run",
                           info="Your finished (or stopped) runs.")
    c["message"] = gr.Markdown(elem_id="export-message")
    with gr.Row(equal_height=False):
        with gr.Column():
            gr.Markdown("### Download", elem_classes="ft-subhead")
            c["zip"] = gr.Button("Prepare adapter zip", variant="primary", elem_id="export-zip")
            c["download"] = gr.DownloadButton("Download", visible=False, elem_id="export-download")
            gr.Markdown("### Merge", elem_classes="ft-subhead")
            gr.Markdown("Fold the LoRA adapter into the base weights: a standalone model that loads without PEFT.",
                        elem_classes="ft-help")
            c["dtype"] = gr.Dropdown(["fp32", "bf16", "fp16"], value="bf16", label="Merged weights dtype",
                                     info="bf16 halves the size; fp32 is exact.")
            c["merge"] = gr.Button("Merge", elem_id="export-merge")
            c["merge_zip"] = gr.Button("Prepare merged model zip", elem_id="export-merged-zip")
            c["merged_download"] = gr.DownloadButton("Download merged", visible=False, elem_id="export-merged-download")
        with gr.Column():
            gr.Markdown("### Push to the Hugging Face Hub", elem_classes="ft-subhead")
            if login_available(ctx):
                c["login"] = gr.LoginButton()
            c["token"] = gr.Textbox(label="Hugging Face token (write access)", type="password",
                                    placeholder="hf_… (not needed when signed in or when HF_TOKEN is set)",
                                    info="Used for this push only; never stored or shown.", elem_id="export-token")
            c["repo"] = gr.Textbox(label="Repo name", placeholder="my-adapter or org/my-adapter", elem_id="export-repo")
            with gr.Row():
                c["what"] = gr.Radio([("Adapter", "adapter"), ("Merged model", "merged"), ("Both", "both")],
                                     value="adapter", label="What")
                c["private"] = gr.Checkbox(value=True, label="Private repo", info="Applies when the repo is created.")
            c["push_gguf"] = gr.Checkbox(value=False, label="Include GGUF files", elem_id="export-push-gguf",
                                         info="The last GGUF export (.gguf and Modelfile) goes into the merged "
                                              "model's repo, else the adapter's.")
            c["push"] = gr.Button("Push", variant="primary", elem_id="export-push")
            c["push_status"] = gr.Markdown(elem_id="export-push-status")
    c.update(create_gguf_section(ctx))
    return c


def wire_export_tab(ctx: AppContext, c: dict, *, owner: gr.State) -> None:
    def on_zip(who: str, run_id: str | None, request: gr.Request):
        try:
            path = export_zip(ctx, owner_of(who, request.session_hash), run_id)
        except FinetuneError as e:
            return error_md(str(e)), gr.update(visible=False)
        return ok_md(f"`{path.name}` is ready."), download_update(path, path.name)

    c["zip"].click(on_zip, [owner, c["run"]], [c["message"], c["download"]], concurrency_limit=2,
                   api_name="export_zip")

    def on_merge(who: str, run_id: str | None, dtype: str, request: gr.Request, progress=gr.Progress()):
        try:
            return merge_run(ctx, owner_of(who, request.session_hash), run_id, dtype, progress)
        except FinetuneError as e:
            return error_md(str(e))

    c["merge"].click(on_merge, [owner, c["run"], c["dtype"]], c["message"], concurrency_limit=1,
                     concurrency_id="model", api_name="merge")

    def on_merged_zip(who: str, run_id: str | None, request: gr.Request):
        try:
            path = export_zip(ctx, owner_of(who, request.session_hash), run_id, "merged")
        except FinetuneError as e:
            return error_md(str(e)), gr.update(visible=False)
        return ok_md(f"`{path.name}` is ready."), download_update(path, path.name)

    c["merge_zip"].click(on_merged_zip, [owner, c["run"]], [c["message"], c["merged_download"]],
                         concurrency_limit=2, api_name="export_merged_zip")

    def on_push(who: str, run_id: str | None, repo: str, what: str, private: bool, typed: str, include_gguf: bool,
                request: gr.Request, oauth_token: Optional[gr.OAuthToken], progress=gr.Progress()):
        return push(ctx, owner_of(who, request.session_hash), run_id, repo, what, private, oauth_token, typed,
                    progress, include_gguf=include_gguf)

    c["push"].click(on_push, [owner, c["run"], c["repo"], c["what"], c["private"], c["token"], c["push_gguf"]],
                    c["push_status"], concurrency_limit=1, api_name="push")
    c["run"].change(lambda: (gr.update(visible=False), gr.update(visible=False), ""), None,
                    [c["download"], c["merged_download"], c["message"]], queue=False, api_visibility="private")
    wire_gguf_section(ctx, c, owner=owner)

