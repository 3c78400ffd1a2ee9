"""Data tab: pick a dataset (bundled example, upload, pasted rows, Hub id), see its format, a preview of
examples exactly as the model sees them (loss-carrying text highlighted), rows per split and token lengths."""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from finetune.data import CANONICAL_FIELDS, FORMATS, SUPPORTED_EXTENSIONS, UnreadableLine, read_rows, rows_from_text
from finetune.errors import DataError, FinetuneError
from finetune.runs import safe_filename

from .context import AppContext, owner_of
from .forms import config_from_values, field_widget
from .messages import error_md, notice_md, ok_md

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "data"
DEFAULT_EXAMPLE = "python_qa.jsonl"
SOURCES = ("Example dataset", "Upload a file", "Paste rows", "Hub dataset id")
PREVIEW_EXAMPLES = 20     # examples kept for the preview slider
STATS_SAMPLE = 2000       # examples per split whose token length is measured (a sample beyond that)
LOSS_LABEL = "trained on (carries loss)"


def example_datasets() -> list[str]:
    if not EXAMPLES_DIR.is_dir():
        return []
    names = sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in SUPPORTED_EXTENSIONS)
    return sorted(names, key=lambda n: n != DEFAULT_EXAMPLE)  # the chat example first


@dataclass
class DataSource:
    dataset: str            # what the run config's `dataset` says before the run manager copies the file in
    file: Path | None       # a local file to copy into the run folder (None for Hub ids)
    name: str               # shown to people, and the copied file's name


def resolve_source(ctx: AppContext, owner: str, values: dict[str, Any]) -> DataSource:
    """The dataset the Data tab's widgets point at; DataError says what to fix."""
    source = values.get("source") or SOURCES[0]
    if source == "Example dataset":
        name = values.get("example") or ""
        if name not in example_datasets():
            raise DataError(f"unknown example dataset {name!r}; pick one of: {', '.join(example_datasets())}")
        return DataSource(str(EXAMPLES_DIR / name), EXAMPLES_DIR / name, name)
    if source == "Upload a file":
        upload = values.get("upload")
        if not upload:
            raise DataError(f"no file uploaded yet; drop a {', '.join(SUPPORTED_EXTENSIONS)} file on the upload box")
        path = Path(upload if isinstance(upload, str) else getattr(upload, "path", upload["path"]))
        size = path.stat().st_size
        if size > ctx.max_upload_bytes:
            raise DataError(f"{path.name} is {size / 1e6:.1f} MB; uploads here are limited to "
                            f"{ctx.max_upload_bytes / 1e6:.0f} MB. Use a smaller file, or train from the command "
                            "line (`python -m finetune train`)", source=path.name)
        return DataSource(str(path), path, safe_filename(path.name))
    if source == "Paste rows":
        text = values.get("paste") or ""
        rows = rows_from_text(text, skip_invalid=bool(values.get("skip_invalid")))
        folder = ctx.uploads_dir(owner) / secrets.token_hex(6)  # one folder per paste: errors name the file
        folder.mkdir()
        path = folder / "pasted_rows.jsonl"
        if any(isinstance(row, UnreadableLine) for row in rows):
            # JSON lines with malformed ones, skipped: kept as pasted, so that reading the file skips (and
            # reports) the same lines by the same numbers
            path.write_text(text, encoding="utf-8", errors="backslashreplace")
        else:
            # ASCII escapes: a lone surrogate (`\ud800`) in pasted JSON can't be written as UTF-8; normalisation
            # then reports its row and field instead of the write failing
            path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return DataSource(str(path), path, "pasted_rows.jsonl")
    if source == "Hub dataset id":
        hub_id = (values.get("hub_id") or "").strip()
        if not hub_id:
            raise DataError("type a Hub dataset id such as `tatsu-lab/alpaca`")
        return DataSource(hub_id, None, hub_id)
    raise DataError(f"unknown data source {source!r}; pick one of: {', '.join(SOURCES)}")


def data_config(values: dict[str, Any], settings: dict[str, Any], source: DataSource):
    """The RunConfig that the Data tab's widgets and the settings describe, for `source`."""
    data_fields = {k: values.get(k) for k in ("data_format", "column_mapping", "skip_invalid", "max_rows",
                                               "dataset_config", "dataset_split") if k in values}
    if source.file is None:  # Hub-only fields
        data_fields["dataset_split"] = data_fields.get("dataset_split") or "train"
    else:
        data_fields.pop("dataset_config", None)
        data_fields.pop("dataset_split", None)
    return config_from_values({**settings, **data_fields}, dataset=source.dataset)


def preview_segments(example: dict, tokenizer, config) -> list[tuple[str, str | None]]:
    """`render_preview` in HighlightedText's format: loss-carrying text labelled, the rest unlabelled."""
    from finetune.templates import render_preview

    segments = render_preview(example, tokenizer, max_seq_length=config.max_seq_length,
                              train_on_prompt=config.train_on_prompt)
    return [(text, LOSS_LABEL if loss else None) for text, loss in segments]


def load_tokenizer_for(ctx: AppContext, config):
    """The configured base model's tokenizer with its chat template (`finetune.prepare.TemplatedTokenizer`),
    cached per model folder, template choice, revision and `trust_remote_code` (a tokenizer loaded with its
    repository's code is never handed to a config that doesn't trust it)."""
    from finetune.models import resolve_base_model
    from finetune.prepare import TemplatedTokenizer, load_templated_tokenizer

    source = resolve_base_model(config)
    key = (source.path, config.chat_template, config.model_revision, config.trust_remote_code)
    with ctx.tokenizer_lock:
        if key not in ctx.tokenizers:
            loaded = load_templated_tokenizer(config, source)
            ctx.tokenizers[key] = (loaded.tokenizer, loaded.template)
        return TemplatedTokenizer(source, *ctx.tokenizers[key])  # this config's source: its own notice


def analyse(ctx: AppContext, owner: str, values: dict[str, Any], settings: dict[str, Any]) -> dict:
    """Load, split and encode the dataset as training will; return what the tab shows (raises FinetuneError
    for people). Token lengths are measured on the first STATS_SAMPLE examples of each split."""
    from finetune.prepare import prepare_data
    from finetune.templates import encoding_report_lines

    source = resolve_source(ctx, owner, values)
    config = data_config(values, settings, source)
    if source.file is not None:
        read_rows(source.file, max_rows=1, max_bytes=ctx.max_upload_bytes,  # size and type check first
                  skip_invalid=config.skip_invalid)
    encoded = prepare_data(config, tokenizer_for=lambda c: load_tokenizer_for(ctx, c), limit=STATS_SAMPLE)
    prepared, model = encoded.examples, encoded.model
    notice = model.source.notice if not config.base_model == "demo" else None
    preview = prepared.splits.train[:PREVIEW_EXAMPLES]
    return {"source": source, "config": config, "prepared": prepared, "lengths": encoded.lengths,
            "stats": encoded.stats, "preview": preview, "notice": notice, "notes": encoded.notices(preview),
            "encoded": encoding_report_lines(encoded.report, config.max_seq_length), "warning": encoded.warning,
            "segments": preview_segments(preview[0], model.tokenizer, config)}


def summary_markdown(result: dict) -> str:
    """What the data is and what training will make of it, in the library's words (what `python -m finetune preview`
    prints): rows per split, how the rows were read, the template's handling of system turns and tools, duplicates,
    skipped rows, truncation, and what encoding made of documents and answers."""
    prepared, config = result["prepared"], result["config"]
    rows = {k: len(v) for k, v in prepared.splits.as_dict().items()}
    lines = [f"**{result['source'].name}** · format **{prepared.format}** · {prepared.rows_read} rows read → "
             f"{rows['train']} train / {rows['validation']} validation / {rows['test']} test"]
    lines += [f"ℹ️ {note}." for note in result["notes"]]
    if prepared.splits.duplicates_removed:
        lines.append(f"{prepared.splits.duplicates_removed} exact duplicate rows removed.")
    if prepared.skipped:
        first = prepared.skipped[0]
        lines.append(f"{len(prepared.skipped)} invalid rows skipped (first: row {first.row}: {first.reason}).")
    truncated = sum(s["truncated"] for s in result["stats"].values())
    if truncated:
        lines.append(f"⚠️ {truncated} examples are longer than `max_seq_length` ({config.max_seq_length} tokens) "
                     "and will be truncated; raise it in Model & settings if answers get cut.")
    if result["encoded"]:
        measured = (f" (the first {STATS_SAMPLE:,} examples of each split)" if max(rows.values()) > STATS_SAMPLE
                    else "")
        lines.append(f"Encoded{measured}:  \n" + "  \n".join(f"· {line}" for line in result["encoded"]))
    if result["warning"]:
        lines.append(f"⚠️ {result['warning']}.")
    if result.get("notice"):
        lines.append(result["notice"])
    return ok_md("  \n".join(lines))


def stats_table(stats: dict[str, dict]) -> list[list]:
    def show(v):
        return "-" if v is None else (f"{v:g}" if isinstance(v, float) else v)

    return [[split, s["rows"], show(s["min"]), show(s["median"]), show(s["p95"]), show(s["max"]), s["truncated"]]
            for split, s in stats.items()]


STATS_HEADERS = ["split", "rows", "min tokens", "median", "p95", "max", "over max length"]


def histogram_range(data: list[list[int]], max_seq_length: int) -> float:
    """The x axis's right end: just past the longest example, and past the cutoff only when an example reaches it
    (a 512-token axis would squash 60-token data into its first bars)."""
    longest = max((max(v) for v in data if v), default=0)
    if longest >= max_seq_length:
        return longest * 1.05
    return max(longest * 1.1, 1.0)


def opens_column_mapping(error: FinetuneError) -> bool:
    """Whether the error is about which columns hold what (then the Format and columns section opens)."""
    if not isinstance(error, DataError):
        return False
    return error.field in ("column_mapping", "data_format") or (error.field in CANONICAL_FIELDS and error.row is None)


def mapping_fields_md() -> str:
    """The fields a column mapping can name (the library's list), under the mapping box."""
    return "Fields to map: " + ", ".join(f"`{name}`" for name in CANONICAL_FIELDS) + "."


def length_histogram(lengths: dict[str, list[int]], max_seq_length: int):
    """Token lengths per split, stacked, with the max_seq_length cutoff drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8), dpi=100)
    data = [v for v in lengths.values() if v]
    labels = [k for k, v in lengths.items() if v]
    right = histogram_range(data, max_seq_length)
    ax.hist(data, bins=30, range=(0, right), stacked=True, label=labels,
            color=["#6366f1", "#f59e0b", "#10b981"][: len(data)])
    ax.set_xlim(0, right)
    if max_seq_length <= right:
        ax.axvline(max_seq_length, color="#dc2626", linestyle="--", linewidth=1.5)
        ax.text(max_seq_length, ax.get_ylim()[1] * 0.92, f" max_seq_length = {max_seq_length}", color="#dc2626",
                fontsize=8, ha="right" if max_seq_length > right * 0.6 else "left")
    else:  # every example fits: the cutoff is off to the right, named above the bars rather than squashing them
        ax.set_title(f"max_seq_length = {max_seq_length} →", loc="right", color="#dc2626", fontsize=8)
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    plt.close(fig)
    return fig


# ============================================================================ layout

def create_data_tab(ctx: AppContext) -> dict[str, Any]:
    examples = example_datasets()
    c: dict[str, Any] = {}
    gr.Markdown("Choose training data. Chat data (`messages`, ShareGPT), instructions (Alpaca), "
                "prompt/completion pairs and plain text are detected automatically.", elem_classes="ft-help")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=320):
            c["source"] = gr.Radio(list(SOURCES), value=SOURCES[0], label="Source", elem_id="data-source")
            with gr.Group(visible=True) as c["example_group"]:
                c["example"] = gr.Dropdown(examples, value=examples[0] if examples else None,
                                           label="Bundled example", elem_id="data-example",
                                           info="Small datasets shipped with the app; work offline.")
            with gr.Group(visible=False) as c["upload_group"]:
                c["upload"] = gr.File(label="Dataset file", file_types=list(SUPPORTED_EXTENSIONS), type="filepath",
                                      elem_id="data-upload")
            with gr.Group(visible=False) as c["paste_group"]:
                c["paste"] = gr.Textbox(label="Rows (a JSON array, or one JSON object per line)", lines=8,
                                        max_lines=20, elem_id="data-paste",
                                        placeholder='{"instruction": "Say hi", "output": "Hi!"}\n'
                                                    '{"instruction": "Say bye", "output": "Bye!"}')
            with gr.Group(visible=False) as c["hub_group"]:
                c["hub_id"] = gr.Textbox(label="Hub dataset id", placeholder="tatsu-lab/alpaca", elem_id="data-hub")
                with gr.Row():
                    c["dataset_config"] = field_widget("dataset_config")
                    c["dataset_split"] = field_widget("dataset_split")
            with gr.Accordion("Format and columns", open=False) as c["format_accordion"]:
                c["data_format"] = gr.Dropdown(["auto", *FORMATS], value="auto", label="Format",
                                               info="`auto` detects it from the column names.",
                                               elem_id="data-format")
                c["column_mapping"] = field_widget("column_mapping", placeholder="prompt: question, completion: answer")
                c["mapping_fields"] = gr.Markdown(mapping_fields_md(), elem_classes="ft-help",
                                                  elem_id="data-mapping-fields")
                with gr.Row():
                    c["skip_invalid"] = field_widget("skip_invalid")
                    c["max_rows"] = field_widget("max_rows")
            c["load"] = gr.Button("Load and preview", variant="primary", elem_id="data-load")
        with gr.Column(scale=3, min_width=420):
            c["status"] = gr.Markdown(notice_md("Pick a dataset and press **Load and preview**."),
                                      elem_id="data-status")
            c["preview_index"] = gr.Slider(1, PREVIEW_EXAMPLES, value=1, step=1, label="Example", visible=False,
                                           elem_id="data-preview-index")
            c["preview"] = gr.HighlightedText(label="As the model sees it (highlighted: the tokens it learns to "
                                                    "write)", color_map={LOSS_LABEL: "green"}, show_legend=True,
                                              combine_adjacent=True, elem_id="data-preview",
                                              show_inline_category=False, visible=False)
            c["stats"] = gr.Dataframe(headers=STATS_HEADERS, label="Rows and token lengths per split",
                                      interactive=False, elem_id="data-stats", visible=False)
            c["histogram"] = gr.Plot(label="Token lengths", elem_id="data-histogram", visible=False)
    c["data_state"] = gr.State({})
    return c


def wire_data_tab(ctx: AppContext, c: dict, settings_form: dict, owner: gr.State) -> None:
    groups = [c["example_group"], c["upload_group"], c["paste_group"], c["hub_group"]]

    form = data_form(c)
    outputs = load_outputs(c)

    def on_load(who: str, request: gr.Request, **values):
        data_values = {k: values.pop(k) for k in form}
        return load_data(ctx, owner_of(who, request.session_hash), data_values, values)

    def on_source(who: str, request: gr.Request, **values):
        """Another source: its inputs, and no preview of the previous one (an example loads at once)."""
        shown = [gr.update(visible=values["source"] == name) for name in SOURCES]
        if values["source"] == "Example dataset":
            return *shown, *on_load(who, request, **values)
        return *shown, *cleared_preview(values["source"])

    kwargs = {**form, **settings_form}
    c["source"].change(on_source, owner, [*groups, *outputs], inputs_kwargs=kwargs, show_progress="hidden",
                       concurrency_limit=4, api_visibility="private")
    c["load"].click(on_load, owner, outputs, inputs_kwargs=kwargs, concurrency_limit=4, api_name="load_data")
    c["example"].input(on_load, owner, outputs, inputs_kwargs=kwargs, concurrency_limit=4,
                       api_visibility="private")  # picked by the user (a restored form reloads its data itself)
    c["upload"].upload(on_load, owner, outputs, inputs_kwargs=kwargs, concurrency_limit=4,
                       api_visibility="private")

    def on_index(index: float, state: dict, **settings):
        return show_example(ctx, state, int(index), settings)

    # .input: dragging, and typing a number in the slider's box (which .release misses)
    c["preview_index"].input(on_index, [c["preview_index"], c["data_state"]], c["preview"],
                             inputs_kwargs=settings_form, show_progress="hidden", trigger_mode="always_last",
                             api_visibility="private")


FORM_FIELDS = ("source", "example", "upload", "paste", "hub_id", "dataset_config", "dataset_split", "data_format",
               "column_mapping", "skip_invalid", "max_rows")


def data_form(c: dict) -> dict[str, Any]:
    """The Data tab's inputs by name (the handler's keyword arguments and the API's parameter names)."""
    return {k: c[k] for k in FORM_FIELDS}


LOAD_OUTPUTS = ("status", "preview", "preview_index", "stats", "histogram", "data_state", "format_accordion")


def load_outputs(c: dict) -> list:
    """The widgets `load_data` fills, in its order."""
    return [c[k] for k in LOAD_OUTPUTS]


def load_data(ctx: AppContext, owner: str, values: dict[str, Any], settings: dict[str, Any]) -> tuple:
    """The Load button: (status, preview, slider, stats, histogram, data state, format accordion)."""
    try:
        result = analyse(ctx, owner, values, settings)
    except FinetuneError as e:
        return (error_md(str(e)), *_hidden_preview(), gr.update(open=opens_column_mapping(e)))
    except Exception as e:  # a bug: say so inline, keep the traceback in the server log
        log.exception("loading data failed")
        return (error_md(f"Unexpected error while loading the data ({type(e).__name__}: {e})."), *_hidden_preview(),
                gr.update())
    source, config = result["source"], result["config"]
    state = {"dataset": source.dataset, "file": str(source.file) if source.file else None, "name": source.name,
             "format": result["prepared"].format, "preview": result["preview"],
             "rows": {k: len(v) for k, v in result["prepared"].splits.as_dict().items()},
             "train_lengths": result["lengths"]["train"], "tokenizer_model": config.base_model}  # for the duration
    n = len(result["preview"])
    return (summary_markdown(result), gr.update(value=result["segments"], visible=True),
            gr.update(visible=n > 1, maximum=max(n, 2), value=1),
            gr.update(value=stats_table(result["stats"]), visible=True),
            gr.update(value=length_histogram(result["lengths"], config.max_seq_length), visible=True), state,
            gr.update())


def _hidden_preview() -> tuple:
    """(preview, slider, stats, histogram, data state) with nothing loaded: hidden, not empty boxes."""
    return (gr.update(value=None, visible=False), gr.update(visible=False), gr.update(value=None, visible=False),
            gr.update(value=None, visible=False), {})


def cleared_preview(source: str) -> tuple:
    """What the tab shows after switching to `source` before its data is loaded (the load button's outputs)."""
    what = {"Upload a file": "Drop a file on the upload box", "Paste rows": "Paste rows",
            "Hub dataset id": "Type a Hub dataset id"}.get(source, "Pick a dataset")
    return notice_md(f"{what}, then press **Load and preview**."), *_hidden_preview(), gr.update()


def show_example(ctx: AppContext, state: dict, index: int, settings: dict[str, Any]):
    """The preview of example `index` (1-based) of the loaded data."""
    preview = (state or {}).get("preview") or []
    if not preview:
        return None
    example = preview[min(max(index, 1), len(preview)) - 1]
    try:
        config = config_from_values(settings, dataset=state["dataset"])
        return preview_segments(example, load_tokenizer_for(ctx, config).tokenizer, config)
    except FinetuneError as e:
        return [(str(e), None)]
