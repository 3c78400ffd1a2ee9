"""The Compare tab's judge-and-train loop without the app: a judgement → its preferences.jsonl row, counting the
rows, the row shape `finetune.data` reads as pairs, mixing in a preference file, and the DPO stage's config, which
trains from the judged run's adapter on those rows."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import RunConfig
from finetune.data import load_examples
from finetune.errors import DataError
from finetune.preference_loop import (
    already_judged,
    count_judgements,
    judgement_row,
    loop_config,
    preference_pairs,
    read_preference_pairs,
)
from finetune.run_folder import RunFolder
from finetune.train import train

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime.datetime(2025, 1, 31, 12, 0, 0, tzinfo=datetime.timezone.utc)
PROMPT = [{"role": "user", "content": "Is it raining?"}]
SHOWN = {"base": "Rain rain rain.", "finetuned": "No, it is sunny."}


def turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ----------------------------------------------------------------------------- a judgement → a row
@pytest.mark.parametrize("choice, better, chosen, rejected", [
    ("base", "", "Rain rain rain.", "No, it is sunny."),
    ("finetuned", None, "No, it is sunny.", "Rain rain rain."),
    ("finetuned", "  Yes, take an umbrella. ", "Yes, take an umbrella.", "Rain rain rain."),  # edited: chosen
    ("both_bad", "Yes, take an umbrella.", "Yes, take an umbrella.", "No, it is sunny."),  # over the fine-tuned
])
def test_a_judgement_becomes_a_preference_row(choice, better, chosen, rejected):
    row = judgement_row(PROMPT, SHOWN, choice, better, now=NOW)
    assert row == {"prompt": PROMPT, "chosen": turn(chosen), "rejected": turn(rejected), "choice": choice,
                   "edited": bool(better), "answers": SHOWN, "time": "2025-01-31T12:00:00+00:00"}


def test_both_bad_without_a_better_answer_is_recorded_but_no_pair():
    row = judgement_row(PROMPT, SHOWN, "both_bad", "  ", now=NOW)
    assert (row["chosen"], row["rejected"], row["answers"], row["edited"]) == (None, None, SHOWN, False)


def test_picking_one_of_two_samples_rejects_the_other():
    samples = {"sample_1": "Maybe.", "sample_2": "Yes, it is raining."}
    row = judgement_row(PROMPT, samples, "sample_2", now=NOW)
    assert (row["chosen"], row["rejected"], row["choice"]) == (turn("Yes, it is raining."), turn("Maybe."),
                                                                "sample_2")


@pytest.mark.parametrize("prompt, answers, choice, better, message", [
    (PROMPT, SHOWN, "tie", "", "unknown choice 'tie'; use one of base, finetuned, both_bad, sample_1, sample_2"),
    (PROMPT, SHOWN, "sample_1", "", "choice `sample_1` judges sample_1 and sample_2, but the answers given are "
     "base, finetuned"),
    ([], SHOWN, "base", "", "nothing to judge yet: ask both models something first"),
    (PROMPT, {"base": "", "finetuned": "x"}, "base", "", "the base answer is empty; write a better answer in the "
     "box, or pick the other one"),
    (PROMPT, {"base": "Same.", "finetuned": "Same."}, "finetuned", "", "the chosen answer and the base answer are "
     "the same text, so there is nothing to prefer; write a better answer in the box"),
])
def test_judgements_that_make_no_sensible_row_say_why(prompt, answers, choice, better, message):
    with pytest.raises(DataError) as error:
        judgement_row(prompt, answers, choice, better)
    assert str(error.value) == message


def test_counting_pairs_and_finding_an_earlier_judgement():
    rows = [judgement_row(PROMPT, SHOWN, "base"), judgement_row(PROMPT, SHOWN, "both_bad"),
            judgement_row([{"role": "user", "content": "Hi"}], SHOWN, "finetuned")]
    assert count_judgements(rows) == (2, 1)
    assert preference_pairs(rows) == [
        {"prompt": PROMPT, "chosen": turn(SHOWN["base"]), "rejected": turn(SHOWN["finetuned"])},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": turn(SHOWN["finetuned"]),
         "rejected": turn(SHOWN["base"])}]
    assert already_judged(rows, PROMPT, SHOWN) == 1
    assert already_judged(rows, PROMPT, {**SHOWN, "base": "Other."}) is None


# ----------------------------------------------------------------------------- the run folder's file
def test_preferences_file_round_trip_and_a_broken_line_is_named(tmp_path):
    run = RunFolder(tmp_path)
    assert run.read_preferences() == [] and run.preferences_file == tmp_path / "preferences.jsonl"
    rows = [judgement_row(PROMPT, SHOWN, "base", now=NOW), judgement_row(PROMPT, SHOWN, "both_bad", now=NOW)]
    for row in rows:
        run.append_preference(row)
    assert run.read_preferences() == rows
    with run.preferences_file.open("a") as f:
        f.write('{"prompt": [\n')
    with pytest.raises(DataError, match=r"preferences.jsonl: line 3 is not a JSON object; fix or delete that line"):
        run.read_preferences()


def test_the_rows_are_pairs_to_the_data_pipeline_and_both_bad_rows_are_skipped_with_a_reason():
    rows = [judgement_row(PROMPT, SHOWN, "base"), judgement_row(PROMPT, SHOWN, "both_bad"),
            judgement_row([{"role": "system", "content": "Be brief."}, *PROMPT], SHOWN, "finetuned")]
    config = RunConfig(base_model="demo", stage="dpo", eval_fraction=0.0, test_fraction=0.0)
    with pytest.raises(DataError, match=r"row 2: `prompt` has no assistant turn"):
        load_examples(config, rows)
    data = load_examples(config.replace(skip_invalid=True), rows)
    assert data.preference == "pairs" and data.preference_rows == preference_pairs(rows)
    assert [(s.row, s.reason) for s in data.skipped] == [(2, "`prompt` has no assistant turn")]


def test_a_preference_file_mixes_in_as_the_same_shape(tmp_path):
    pairs = read_preference_pairs(ROOT / "examples" / "data" / "dpo_en_demo_slice.json")
    assert len(pairs) == 14 and all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    assert pairs[0]["prompt"][-1]["role"] == "user" and pairs[0]["chosen"][0]["role"] == "assistant"
    with pytest.raises(DataError, match=r"python_qa.jsonl holds plain examples, not chosen/rejected pairs; mix in"):
        read_preference_pairs(ROOT / "examples" / "data" / "python_qa.jsonl")
    kto = tmp_path / "kto.jsonl"
    kto.write_text(json.dumps({"prompt": "a", "completion": "b", "label": True}) + "\n")
    with pytest.raises(DataError, match=r"kto.jsonl holds answers labelled true/false \(KTO rows\), not"):
        read_preference_pairs(kto)


# ----------------------------------------------------------------------------- the DPO stage
def test_loop_config_is_a_small_dpo_stage_from_the_judged_run(lora_run_dir):
    judged = RunConfig.from_yaml(lora_run_dir / "run.yaml")
    config = loop_config(judged, lora_run_dir, "prefs.jsonl", pairs=3)
    assert (config.stage, config.init_from, config.dataset) == ("dpo", str(lora_run_dir.resolve()), "prefs.jsonl")
    assert config.output_dir == f"{lora_run_dir.resolve()}-dpo"
    assert (config.base_model, config.method, config.chat_template, config.max_seq_length) == \
        (judged.base_model, judged.method, judged.chat_template, judged.max_seq_length)
    assert (config.learning_rate, config.beta, config.loss_type) == (5e-5, 0.1, None)
    assert (config.batch_size, config.gradient_accumulation_steps, config.num_train_epochs, config.max_steps) == \
        (3, 1, 3.0, -1)
    assert (config.eval_fraction, config.test_fraction, config.logging_steps) == (0.0, 0.0, 1)
    assert loop_config(judged, lora_run_dir, "p.jsonl", pairs=20).test_fraction == 0.1
    assert loop_config(judged, lora_run_dir, "p.jsonl", pairs=20).batch_size == 4
    with pytest.raises(DataError, match="no preference pairs yet"):
        loop_config(judged, lora_run_dir, "p.jsonl", pairs=0)


def test_the_loop_trains_dpo_from_the_judged_adapter_on_its_rows(lora_run_dir, tmp_path):
    rows = [judgement_row([{"role": "user", "content": f"Question number {i}?"}],
                          {"base": f"Yes, gladly {i}.", "finetuned": f"No, go away {i}."}, "base") for i in range(4)]
    file = tmp_path / "preferences.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = loop_config(RunConfig.from_yaml(lora_run_dir / "run.yaml"), lora_run_dir, str(file), pairs=4)
    result = train(config.replace(output_dir=str(tmp_path / "dpo")))
    assert result.status == "finished" and result.results["global_step"] == 3  # one batch of 4, 3 epochs
    assert [s["stage"] for s in result.results["stages"]] == ["sft", "dpo"]
    trained = [json.loads(line) for line in (tmp_path / "dpo" / "data" / "preference_train.jsonl").open()]
    assert sorted(map(json.dumps, trained)) == sorted(map(json.dumps, preference_pairs(rows)))
    records = RunFolder(tmp_path / "dpo").read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["rewards/margins"] is not None and r["rewards/accuracies"] is not None for r in records)
    start = load_file(str(lora_run_dir / "adapter" / "adapter_model.safetensors"))
    end = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert set(start) == set(end) and any(not torch.equal(start[k], end[k]) for k in start)  # from that adapter on
