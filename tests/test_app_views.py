"""What the app shows is readable and current (issue 17, round 2): the Data tab after errors and source switches,
the Settings views that follow every change, run labels and statuses, the test-prompt answers table, and wording."""

from __future__ import annotations

import json
import os

import gradio as gr
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app_helpers import SETTINGS, load
from finetune.errors import DataError
from finetune.estimate import save_throughput
from finetune.run_folder import RunFolder
from finetune.runs import RunSummary
from ui import compare_tab, data_tab, settings_tab, train_tab
from ui.context import create_context
from ui.forms import LABELS, advanced_fields, config_from_values, field_widget

GOOD_LINES = "\n".join(json.dumps({"instruction": f"Say {w}", "output": w.title()})
                       for w in ("hi", "bye", "yes", "no", "maybe", "never", "always", "soon", "later", "now"))


@pytest.fixture()
def ctx(tmp_path):
    context = create_context(tmp_path / "ws", start_worker=False)
    yield context
    context.runs.close()


# ----------------------------------------------------------------------------- Data tab

def test_a_json_error_does_not_open_the_column_mapping(ctx):
    """"(column 21)" in a JSON error is a text column, not a dataset column."""
    status, *_, accordion = load(ctx, source="Paste rows", paste='{"instruction": "a", "output": "b"}\n{"x",')
    assert "invalid JSON on line 2" in status and "(column" in status
    assert accordion["open"] is False
    assert data_tab.opens_column_mapping(DataError("could not detect the data format", field="column_mapping"))
    assert data_tab.opens_column_mapping(DataError("needs a column `output`", field="output"))
    assert not data_tab.opens_column_mapping(DataError("row 3: field `output` is empty", row=3, field="output"))


def test_switching_source_leaves_no_old_preview():
    status, preview, index, stats, histogram, state, _ = data_tab.cleared_preview("Paste rows")
    assert "Paste rows, then press **Load and preview**." in status and state == {}
    assert [box["visible"] for box in (preview, index, stats, histogram)] == [False] * 4


def test_histogram_axis_fits_short_data_and_shows_the_cutoff_only_when_reached():
    short = data_tab.length_histogram({"train": [20, 40, 60], "validation": [], "test": [30]}, 512)
    assert short.axes[0].get_xlim()[1] == pytest.approx(66.0)  # 60 x 1.1, not 512
    assert not [line for line in short.axes[0].get_lines()]     # no cutoff line squashed at the far right
    assert short.axes[0].get_title(loc="right") == "max_seq_length = 512 →"
    long = data_tab.length_histogram({"train": [100, 700]}, 512)
    assert long.axes[0].get_xlim()[1] == pytest.approx(735.0)
    assert any(line.get_xdata()[0] == 512 for line in long.axes[0].get_lines())


# ----------------------------------------------------------------------------- Settings tab

def test_advanced_fields_have_labels_and_unset_numbers_show_empty():
    assert all(name in LABELS for name in advanced_fields()), [n for n in advanced_fields() if n not in LABELS]
    box = field_widget("eval_steps")
    assert isinstance(box, gr.Textbox) and box.value == "" and box.placeholder == "unset"
    assert isinstance(field_widget("max_steps"), gr.Number)  # always has a value (-1: use epochs)
    config = config_from_values({"eval_steps": "", "save_steps": " 4 ", "early_stopping_patience": ""})
    assert (config.eval_steps, config.save_steps, config.early_stopping_patience) == (None, 4, None)


def test_demo_presets_keep_the_methods_learning_rates_apart():
    fields = settings_tab.PRESET_FIELDS
    rates = {m: dict(zip(fields, settings_tab.apply_preset(m, "demo")))["learning_rate"] for m in ("lora", "qlora",
                                                                                                  "full")}
    assert rates == {"lora": 1e-2, "qlora": 1e-2, "full": 1e-3}


def test_yaml_follows_every_change_once_shown():
    values = {**SETTINGS, "method": "full", "learning_rate": 2e-4}
    memory, time, error, yaml_box, command = settings_tab.refresh_views(values, {"dataset": "d.jsonl"}, True)
    assert "method: full" in yaml_box["value"] and "learning_rate: 0.0002" in yaml_box["value"]
    assert "dataset: d.jsonl" in yaml_box["value"] and yaml_box["visible"] is True and error["visible"] is False
    assert "Estimated memory" in memory and "Expected duration" in time
    hidden = settings_tab.refresh_views(values, {}, False)
    assert all(isinstance(v, type(gr.skip())) for v in hidden[2:])  # not shown yet: left alone
    bad = settings_tab.refresh_views({**values, "batch_size": 0}, {}, True)
    assert "`batch_size` must be at least 1" in bad[2]["value"] and bad[3]["visible"] is False


# ----------------------------------------------------------------------------- Train tab

def test_run_label_says_the_current_state_and_the_last_loss():
    summary = RunSummary(run_id="abcdef123456789012", state="running", created=0.0, base_model="demo",
                         method="lora", dataset="qa.jsonl", train_loss=2.5, has_weights=False)
    metrics = [{"step": 2, "loss": 3.0}, {"step": 4, "loss": 1.25}, {"step": 4, "eval_loss": 1.5}]
    assert train_tab.last_loss(metrics) == 1.25 and train_tab.last_loss([]) is None
    label = train_tab.run_label(summary, train_tab.last_loss(metrics))
    assert label.endswith(" · demo · lora · qa.jsonl · running, last loss 1.250 · abcdef")
    assert "2.5" not in label  # the whole-run average is not what the curve ends at


def test_poll_hides_empty_plots_and_flags_a_state_change(ctx):
    *_, state, _ = load(ctx)
    _, run_id = train_tab.start_training(ctx, "s:o", state, {}, {**SETTINGS, "max_steps": 1})
    try:
        out = train_tab.poll(ctx, "s:o", run_id, {})
        loss, lr, view = out[2], out[3], out[-2]  # the last output is the preference-reward plot
        assert loss["visible"] is False and lr["visible"] is False  # no point yet: no 0.000000 axis
        assert view["changed"] is False
        ctx.runs.stop(run_id, "s:o")
        later = train_tab.poll(ctx, "s:o", run_id, {**view, "state": "queued"})[-2]
        assert later["state"] in ("stopping", "stopped") and later["changed"] is True
    finally:
        ctx.runs.stop(run_id, "s:o")
    frame = train_tab.loss_frame([{"step": 1, "loss": 2.0}])
    assert train_tab.plot_update(frame, "loss")["visible"] is True


def test_start_records_the_estimate_shown_before_the_run(ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    *_, state, _ = load(ctx)
    settings = {**SETTINGS, "max_steps": 1}
    save_throughput(config_from_values(settings), 500.0)
    text, run_id = train_tab.start_training(ctx, "s:o", state, {}, settings)
    try:
        assert "Expected duration: about" in text
        estimate = RunFolder(ctx.runs.run_dir(run_id, "s:o")).read_estimate()
        assert estimate["tokens_per_s"] == 500.0 and estimate["duration_s"] > 0
    finally:
        ctx.runs.stop(run_id, "s:o")


# ----------------------------------------------------------------------------- Compare tab

def test_answers_table_is_four_wrapped_columns_with_scores_beside():
    rows = [["What is <b>2+2</b>?", "4", "five", "4", 0.0, 1.0, 0.1, 1.0],
            ["Say hi", "Hi!", "", "Hello", 0.5, 0.25, None, 0.3]]
    html = compare_tab.answers_html(rows)
    assert html.count("<th ") == 4 and html.count("<tr>") == 3
    assert [h.split(">")[1].split("<")[0] for h in html.split("<th ")[1:]] == \
        ["prompt", "reference", "base answer", "fine-tuned answer"]
    assert '<div class="ft-cell">What is &lt;b&gt;2+2&lt;/b&gt;?</div>' in html and "<em>(empty)</em>" in html
    blank_lines = compare_tab.answers_html([["p", "r", "a\n\n \n\n\nb", "c", 0, 0, 0, 0]])
    assert '<div class="ft-cell">a\n\nb</div>' in blank_lines
    assert '<span class="ft-better">token F1 1.000</span>' in html          # the better score stands out
    assert "token F1 0.000 · ROUGE-L 0.100" in html and "ROUGE-L -" in html
    assert "table-layout: fixed" in compare_tab.ANSWERS_CSS and "overflow-wrap: anywhere" in compare_tab.ANSWERS_CSS
    assert compare_tab.answers_html([]) == ""


# ----------------------------------------------------------------------------- wording

def test_model_card_says_peak_memory(make_adapter_run, tmp_path):
    from finetune.model_card import build_model_card

    run = make_adapter_run(tmp_path / "run")
    RunFolder(run).write_results({"peak_memory_mb": 1234.0, "train_loss": 1.0})
    card = build_model_card(run, "alice/x", loss_curve=None)
    assert "| Peak memory | 1,234 MB |" in card and "accelerator" not in card



def test_missing_results_read_as_a_bare_dash_without_a_unit():
    rows = dict(train_tab.metrics_table({"train_loss": 1.5}))
    assert rows["peak memory"] == "-" and rows["trainable parameters"] == "-"
    results = {"peak_memory_mb": 2048.4, "trainable_params": 12345, "trainable_percent": 1.5}
    rows = dict(train_tab.metrics_table(results))
    assert rows["peak memory"] == "2048 MB" and rows["trainable parameters"] == "12,345 (1.5%)"
