"""`python -m finetune`: every subcommand end to end, and expected mistakes as one clear line, exit 2."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import EXIT_USER_ERROR, _log_to_stderr, build_parser, config_from_args, main
from finetune.demo import DEMO_LABEL, demo_folder_name

ROOT = Path(__file__).resolve().parents[1]
QA = ROOT / "examples" / "data" / "python_qa.jsonl"


def run_cli(*args: str, env: dict | None = None, stdin: str | None = None, timeout: int = 300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=full_env,
                          input=stdin, timeout=timeout, cwd=ROOT)


def user_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; assert it exits 2 with exactly one `error:` line and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- expected mistakes
def test_bad_config_value(capsys, demo_model_dir, tmp_path):
    msg = user_error(capsys, ["train", "--base_model", str(demo_model_dir), "--dataset", str(QA), "--lora_r", "0",
                              "--output_dir", str(tmp_path)])
    assert msg == "error: `lora_r` must be > 0 (got 0); 8, 16 or 32 are typical"


def test_bad_config_type(capsys):
    assert user_error(capsys, ["train", "--max_steps", "ten"]) == "error: `max_steps` must be an integer (got 'ten')"


def test_missing_config_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert user_error(capsys, ["train", str(missing)]) == f"error: config file not found: {missing}"


def test_unknown_field_in_yaml(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("base_model: demo\nlearnig_rate: 0.1\n", encoding="utf-8")
    assert user_error(capsys, ["train", str(cfg)]) == \
        f"error: {cfg}: unknown field `learnig_rate`; did you mean `learning_rate`?"


def test_dataset_not_set(capsys, demo_model_dir, tmp_path):
    msg = user_error(capsys, ["train", "--base_model", str(demo_model_dir), "--output_dir", str(tmp_path)])
    assert msg == "error: `dataset` is not set; give a file path, a Hub dataset id, or rows"


def test_bad_data_names_file_and_line(capsys, demo_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", \n', encoding="utf-8")
    msg = user_error(capsys, ["train", "--base_model", str(demo_model_dir), "--dataset", str(bad),
                              "--output_dir", str(tmp_path / "run")])
    assert msg == ("error: bad.jsonl: invalid JSON on line 2: Expecting property name enclosed in double quotes "
                   "(column 1); each line must hold one complete JSON object (or set skip_invalid: true to drop bad "
                   "rows)")


def test_bad_row_names_row_and_field(capsys, demo_model_dir, tmp_path):
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n', encoding="utf-8")
    msg = user_error(capsys, ["train", "--base_model", str(demo_model_dir), "--dataset", str(bad),
                              "--output_dir", str(tmp_path / "run")])
    assert msg == ("error: rows.jsonl, row 2: field `output` is empty; every row needs a non-empty answer "
                   "(or set skip_invalid: true to drop bad rows)")


def test_missing_model_folder(capsys, tmp_path):
    msg = user_error(capsys, ["train", "--base_model", "./no/such/model", "--dataset", str(QA),
                              "--output_dir", str(tmp_path)])
    assert msg == ("error: `base_model` folder not found: ./no/such/model; check the path, or give a Hub id such as "
                   "`HuggingFaceTB/SmolLM2-135M-Instruct`, or `demo`")


def test_offline_without_fallback(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    msg = user_error(capsys, ["train", "--base_model", "someorg/some-model", "--offline_fallback", "false",
                              "--dataset", str(QA), "--output_dir", str(tmp_path / "run")])
    assert msg == ("error: can't reach the Hugging Face Hub to download `someorg/some-model`, and it is not in the "
                   "local cache; check your connection, or use `base_model: demo` to try the offline demo model")


def test_unknown_model_id_on_the_hub(tmp_path):
    """Through the real client against the local Hub stand-in: a repo that doesn't exist."""
    from hub_server import HubStandIn

    with HubStandIn(tokens={}) as hub:
        proc = run_cli("train", "--base_model", "nobody/no-such-model", "--dataset", str(QA),
                       "--output_dir", str(tmp_path / "run"),
                       env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"})
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("error: model `nobody/no-such-model` was not found on the Hugging Face Hub; check the spelling "
            "(`org/name`, case matters)") in proc.stderr


def test_missing_run_folder_for_merge_eval_chat(capsys, tmp_path):
    for cmd in ("merge", "eval", "chat"):
        msg = user_error(capsys, [cmd, str(tmp_path / "no-run")])
        assert str(tmp_path / "no-run") in msg, msg


def test_help_lists_every_config_field():
    from finetune.cli import build_parser
    from finetune.config import RunConfig

    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in RunConfig.field_help():
        assert f"--{name}" in train_help, name


# ----------------------------------------------------------------------------- log messages: --quiet, --verbose
def test_info_messages_reach_stderr_unless_quiet(capsys, tmp_path, monkeypatch):
    """A library info message (building the demo model) is printed by default, not with --quiet."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "a"))
    assert main(["demo"]) == 0
    out, err = capsys.readouterr()
    built = tmp_path / "a" / demo_folder_name()
    assert out == f"{built}\n"
    assert err.startswith(f"Building the {DEMO_LABEL} into {built}\n") and err.endswith(f"\n{DEMO_LABEL}\n")

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "b"))
    assert main(["demo", "--quiet"]) == 0  # builds again, without saying so
    out, err = capsys.readouterr()
    assert out == f"{tmp_path / 'b' / built.name}\n"
    assert "Building" not in err and err.endswith(f"\n{DEMO_LABEL}\n")
    assert logging.getLogger("finetune").handlers == []  # main() leaves logging as it found it


def test_verbosity_flags_go_before_or_after_the_command():
    parse = build_parser().parse_args
    assert parse(["-q", "demo"]).log_level == parse(["demo", "--quiet"]).log_level == logging.WARNING
    assert parse(["--verbose", "merge", "x"]).log_level == parse(["merge", "x", "-v"]).log_level == logging.DEBUG
    assert not hasattr(parse(["demo"]), "log_level")  # main() then uses INFO


@pytest.mark.parametrize("level, shown", [(logging.DEBUG, ["debug detail", "what was decided", "warning: odd"]),
                                          (logging.INFO, ["what was decided", "warning: odd"]),
                                          (logging.WARNING, ["warning: odd"])])
def test_log_levels_and_format(capsys, level, shown):
    log = logging.getLogger("finetune.somewhere")
    with _log_to_stderr(level):
        log.debug("debug detail")
        log.info("what was decided")
        log.warning("odd")
    assert capsys.readouterr().err.splitlines() == shown


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, demo_model_dir):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("train", "examples/quickstart.yaml", "--base_model", str(demo_model_dir), "--max_steps", "4",
                   "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_train_end_to_end(cli_run):
    out, proc = cli_run
    assert "run finished" in proc.stderr and "test_perplexity_after" in proc.stderr
    assert "training: 100%" in proc.stderr, "a progress bar on the terminal"
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 4 and results["status"] == "finished"


def test_preview_shows_loss_marks_and_stats(demo_model_dir):
    proc = run_cli("preview", "--base_model", str(demo_model_dir), "--dataset", str(QA), "-n", "1")
    assert proc.returncode == 0, proc.stderr
    assert "format: messages" in proc.stdout
    assert "<|im_start|>assistant\n[[" in proc.stdout and "<|im_end|>]]" in proc.stdout
    assert "train " in proc.stdout and "truncated=" in proc.stdout


def test_preview_takes_a_data_file_as_its_argument(capsys, demo_model_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("First document.\nSecond document.\nThird document.\n", encoding="utf-8")
    assert main(["preview", str(corpus), "--base_model", str(demo_model_dir), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "format: text" in out and "source: corpus.txt" in out
    assert "note: corpus.txt has no blank lines between its text, so each of its 3 lines is one document" in out
    assert main(["preview", str(QA), "--base_model", str(demo_model_dir), "-n", "1"]) == 0
    assert "format: messages" in capsys.readouterr().out
    msg = user_error(capsys, ["preview", str(corpus), "--dataset", str(QA)])
    assert msg == f"error: {corpus} is a data file and --dataset is set too; give the data file once"


def test_preview_measures_lengths_with_the_loss_mask_training_uses(capsys, demo_model_dir, tmp_path):
    """`train_on_prompt: true` needs no prompt mask, so a template that can't mask prompts (it re-renders its
    header as turns are added, without generation markers) previews, and its lengths are training's."""
    import shutil

    from transformers import AutoTokenizer

    from finetune.data import length_stats, load_examples
    from finetune.templates import encode_example

    model = shutil.copytree(demo_model_dir, tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(str(model))
    tok.chat_template = ("{{ messages | length }} turns\n{% for message in messages %}"
                         "{{ message['role'] + ':\n' + message['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")
    tok.save_pretrained(str(model))
    args = ["--base_model", str(model), "--dataset", str(QA), "--chat_template", "tokenizer",
            "--train_on_prompt", "true", "--max_seq_length", "64"]
    assert main(["preview", *args, "-n", "1"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "template: tokenizer" in out and "\n[[2 turns\nuser:\n" in out  # every token carries loss
    config = config_from_args(build_parser().parse_args(["preview", *args]))
    tok = AutoTokenizer.from_pretrained(str(model))
    train = [encode_example(ex, tok, max_seq_length=64, train_on_prompt=True)["length"]
             for ex in load_examples(config).splits.train]
    expected = "  ".join(f"{k}={v}" for k, v in length_stats(train, 64).items())
    assert f"  train      {expected}\n" in out


def test_eval_merge_chat_on_the_trained_run(cli_run):
    out, _ = cli_run
    proc = run_cli("eval", str(out), "--limit", "2", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["base_loss"] > summary["finetuned_loss"]
    assert len((out / "eval" / "answers.jsonl").read_text().splitlines()) == 2

    proc = run_cli("merge", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "max |logit diff| vs base+adapter" in proc.stdout
    assert (out / "merged" / "model.safetensors").is_file()

    proc = run_cli("chat", str(out), "--compare", "--max-new-tokens", "8", stdin="How do I reverse a list?\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert "base> " in proc.stdout and "fine-tuned> " in proc.stdout
