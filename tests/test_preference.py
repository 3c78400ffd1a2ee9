"""Preference stages on the demo model, CPU: DPO/KTO learn the preferences, only the adapter changes, the reference
is the same weights (adapter off, or a copy of the starting adapter), `init_from` starts from the SFT adapter,
ORPO runs; bad preference rows and configs get messages that name the row, field and fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.config import RunConfig
from finetune.data import load_examples
from finetune.errors import ConfigError, DataError
from finetune.preference import (
    encode_pair,
    preference_scores,
    preference_trainer,
    prepare_preference_data,
    start_model,
)
from finetune.train import train

# Eight prompts, a polite chosen and a rude rejected answer; the chosen ones are two tokens longer, so the
# random-weight demo model starts out preferring every rejected one (accuracy 0, margin about -8 nats).
PAIRS = [{"prompt": f"Question number {i}?", "chosen": f"Yes, gladly {i}.", "rejected": f"No, go away {i}."}
         for i in range(8)]
# The same preferences as KTO rows: a conversation, its reply and a true/false label.
KTO_ROWS = [row for p in PAIRS for row in (
    {"messages": [{"role": "user", "content": p["prompt"]}],
     "completion": [{"role": "assistant", "content": p["chosen"]}], "label": True},
    {"messages": [{"role": "user", "content": p["prompt"]}],
     "completion": [{"role": "assistant", "content": p["rejected"]}], "label": False})]


def stage_config(demo_model_dir, out: Path, stage: str, **changes) -> RunConfig:
    base = dict(base_model=str(demo_model_dir), stage=stage, learning_rate=5e-3, max_steps=6, batch_size=4,
                gradient_accumulation_steps=1, eval_fraction=0.0, test_fraction=0.0, output_dir=str(out),
                logging_steps=1, max_seq_length=64, lr_scheduler_type="constant", warmup_ratio=0.0, lora_dropout=0.0)
    base.update(changes)
    return RunConfig(**base)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def encoded_rows(config: RunConfig, rows: list[dict], tokenizer) -> list[dict]:
    """The stage's encoded training rows, as train() builds them."""
    return prepare_preference_data(config, load_examples(config, rows), tokenizer).encoded["train"]


def base_model(demo_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)


@pytest.fixture(scope="module")
def dpo_run(demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    return train(stage_config(demo_model_dir, out, "dpo"), rows=PAIRS)


@pytest.fixture(scope="module")
def kto_run(demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kto")
    return train(stage_config(demo_model_dir, out, "kto"), rows=KTO_ROWS)


@pytest.fixture(scope="module")
def sft_run(demo_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    return train(stage_config(demo_model_dir, out, "sft", max_steps=4), rows=PAIRS)


def tokenizer_of(run) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run.final_dir))


# ----------------------------------------------------------------------------- DPO and KTO learn
@pytest.mark.parametrize("which", ["dpo", "kto"])
def test_margin_and_accuracy_rise_on_training_rows(which, request, demo_model_dir):
    run = request.getfixturevalue(f"{which}_run")
    config = RunConfig.from_yaml(run.output_dir / "run.yaml")
    rows = encoded_rows(config, PAIRS if which == "dpo" else KTO_ROWS, tokenizer_of(run))
    with run.model.disable_adapter():  # the base: where the stage started
        before = preference_scores(run.model, rows)
    after = preference_scores(run.model, rows)
    assert (before["accuracy"], after["accuracy"]) == (0.0, 1.0)
    assert after["margin"] > before["margin"] + 1.0  # nats
    # TRL's rewards, per step in metrics.jsonl: zero at step 1 (the policy is the reference), then apart
    records = read_metrics(run.output_dir)
    assert records[0]["rewards/margins"] == 0.0
    # (a KTO batch holding only good or only bad answers has no margin: null)
    last = [r for r in records if r["rewards/margins"] is not None][-1]
    assert last["step"] >= 5 and last["rewards/margins"] > 1.0 and last["rewards/chosen"] > last["rewards/rejected"]
    if which == "dpo":
        assert records[-1]["rewards/accuracies"] == 1.0
    else:  # KTO's answers are unpaired: no accuracy per step
        assert records[-1]["rewards/accuracies"] is None


@pytest.mark.parametrize("which", ["dpo", "kto"])
def test_adapter_changes_and_base_does_not(which, request, demo_model_dir):
    run = request.getfixturevalue(f"{which}_run")
    adapter = load_file(str(run.final_dir / "adapter_model.safetensors"))
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # PEFT starts B at zero
    assert not (run.final_dir / "ref").exists()  # no reference copy saved with the result
    fresh = base_model(demo_model_dir).state_dict()
    trained = {name.replace("base_model.model.", "").replace(".base_layer", ""): t
               for name, t in run.model.state_dict().items() if "lora_" not in name}
    assert set(trained) == set(fresh)
    for name, tensor in fresh.items():
        assert torch.equal(trained[name], tensor), name


def test_results_report_the_held_out_pairs_before_and_after(demo_model_dir, tmp_path):
    config = stage_config(demo_model_dir, tmp_path / "run", "dpo", max_steps=2, test_fraction=0.25)
    result = train(config, rows=PAIRS)
    tokenizer = tokenizer_of(result)
    held_out = prepare_preference_data(config, load_examples(config, PAIRS), tokenizer).encoded["test"]
    with result.model.disable_adapter():
        before = preference_scores(result.model, held_out)
    after = preference_scores(result.model, held_out)
    pref = json.loads((tmp_path / "run" / "results.json").read_text())["preference"]
    assert (pref["split"], pref["rows"], pref["kind"], pref["loss_type"]) == ("test", 2, "pairs", "sigmoid")
    assert pref["accuracy_before"] == before["accuracy"] and pref["accuracy_after"] == after["accuracy"]
    assert pref["margin_before"] == pytest.approx(before["margin"], abs=1e-4)
    assert pref["margin_after"] == pytest.approx(after["margin"], abs=1e-4)
    # the split files: the preference rows, and the chosen answers (what Compare and evaluate read)
    data = tmp_path / "run" / "data"
    assert len((data / "preference_test.jsonl").read_text().splitlines()) == 2
    first = json.loads((data / "test.jsonl").read_text().splitlines()[0])
    assert first["messages"][-1]["content"].startswith("Yes, gladly")


# ----------------------------------------------------------------------------- one copy of the weights
def _trainer(config: RunConfig, demo_model_dir):
    from finetune.prepare import prepare_data
    from finetune.train import _peft_config, _training_args

    prepared = prepare_data(config, PAIRS)
    data = prepare_preference_data(config, prepared.examples, prepared.model.tokenizer)
    model = start_model(config, base_model(demo_model_dir))
    return preference_trainer(config, model=model, data=data, tokenizer=prepared.model.tokenizer, callbacks=[],
                              training_args=_training_args(config, "fp32", 6, 6, 6, False),
                              peft_config=None if config.init_from else _peft_config(config))


def _base_weights(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)


def test_the_reference_is_the_adapter_off_pass_not_a_second_model(demo_model_dir, tmp_path):
    trainer = _trainer(stage_config(demo_model_dir, tmp_path / "run", "dpo"), demo_model_dir)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    assert _base_weights(trainer.model) == _base_weights(base_model(demo_model_dir))


def test_init_from_starts_from_the_sft_adapter(sft_run, demo_model_dir, tmp_path):
    from peft import PeftModel

    config = stage_config(demo_model_dir, tmp_path / "dpo", "dpo", init_from=str(sft_run.output_dir))
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    sft = PeftModel.from_pretrained(base_model(demo_model_dir), str(sft_run.final_dir)).eval()
    start = start_model(config, base_model(demo_model_dir)).eval()
    with torch.no_grad():
        assert torch.equal(start(input_ids=ids).logits, sft(input_ids=ids).logits)
        with start.disable_adapter():
            assert not torch.equal(start(input_ids=ids).logits, sft(input_ids=ids).logits)
    # the reference: a frozen copy of the SFT adapter on the same base weights
    trainer = _trainer(config, demo_model_dir)
    assert trainer.ref_model is None and sorted(trainer.model.peft_config) == ["default", "ref"]
    assert _base_weights(trainer.model) == _base_weights(base_model(demo_model_dir))


def test_a_dpo_run_on_init_from_measures_from_the_sft_model(sft_run, demo_model_dir, tmp_path):
    from peft import PeftModel

    config = stage_config(demo_model_dir, tmp_path / "dpo", "dpo", init_from=str(sft_run.output_dir), max_steps=2,
                          test_fraction=0.25, precision="fp32")  # the SFT model below is fp32 too
    result = train(config, rows=PAIRS)
    sft = PeftModel.from_pretrained(base_model(demo_model_dir), str(sft_run.final_dir))
    held_out = prepare_preference_data(config, load_examples(config, PAIRS), tokenizer_of(result)).encoded["test"]
    before = preference_scores(sft, held_out)
    assert result.results["preference"]["margin_before"] == pytest.approx(before["margin"], abs=1e-4)
    assert read_metrics(tmp_path / "dpo")[0]["rewards/margins"] == 0.0  # step 1: the policy is the SFT reference
    assert [s["stage"] for s in result.results["stages"]] == ["sft", "dpo"]
    # the model card says which stages produced the adapter
    from finetune.model_card import build_model_card, front_matter

    card = build_model_card(tmp_path / "dpo", "me/demo-dpo", loss_curve=None)
    assert ("trained with supervised fine-tuning (TRL `SFTTrainer`) on rows passed in directly, then with DPO (TRL "
            "`DPOTrainer`) on rows passed in directly (not a file).") in card
    assert front_matter(card)["tags"] == ["lora", "sft", "dpo", "trl", "demo-model"]


# ----------------------------------------------------------------------------- ORPO, QLoRA
def test_orpo_runs_and_logs_its_rewards(demo_model_dir, tmp_path):
    result = train(stage_config(demo_model_dir, tmp_path / "orpo", "orpo", max_steps=3), rows=PAIRS)
    assert result.status == "finished"
    records = read_metrics(tmp_path / "orpo")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] is not None and r["rewards/margins"] is not None for r in records)
    assert result.results["stages"] == [{"stage": "orpo", "trainer": "ORPOTrainer", "dataset": "rows",
                                         "dataset_source": "rows"}]


def test_qlora_dpo_trains_the_adapter(demo_model_dir, tmp_path):
    result = train(stage_config(demo_model_dir, tmp_path / "q", "dpo", method="qlora", max_steps=2), rows=PAIRS)
    adapter = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)
    assert read_metrics(tmp_path / "q")[-1]["rewards/margins"] > 0


# ----------------------------------------------------------------------------- tokens: our template's answer span
def test_answers_end_at_the_end_of_turn_token_as_sft_masks_them():
    """TRL's tokenisation would add the newline after <|im_end|> to the answer (Qwen2.5's template); ours doesn't."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from finetune.templates import apply_template_choice
    from real_models import real_tokenizer

    tokenizer = real_tokenizer("qwen2")
    apply_template_choice(tokenizer, "auto")
    row = {"prompt": [{"role": "user", "content": "Hi there"}],
           "chosen": [{"role": "assistant", "content": "Hello friend."}],
           "rejected": [{"role": "assistant", "content": "Hello there."}]}
    enc = encode_pair(row, tokenizer, 512)
    assert tokenizer.decode(enc["chosen_ids"]) == "Hello friend.<|im_end|>"
    assert tokenizer.decode(enc["rejected_ids"]) == "Hello there.<|im_end|>"
    assert tokenizer.decode(enc["prompt_ids"]).endswith("<|im_start|>assistant\n")
    # the prompt alone filling max_length leaves nothing to compare
    assert encode_pair(row, tokenizer, len(enc["prompt_ids"])) is None


# ----------------------------------------------------------------------------- bad rows and configs
def _load(stage: str, rows: list[dict], **kw):
    return load_examples(RunConfig(stage=stage, dataset="prefs.json", **kw), rows)


def test_bad_preference_rows_name_the_row_and_field():
    good = {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}
    with pytest.raises(DataError) as e:
        _load("dpo", [good, {"prompt": "Hi", "chosen": "Hello."}])
    assert str(e.value) == ("rows, row 2: field `rejected` is missing; a preference stage needs the rejected answer "
                            "of every pair (or set skip_invalid: true to drop bad rows)")
    with pytest.raises(DataError) as e:
        _load("dpo", [good, {"prompt": "Hi", "chosen": "  ", "rejected": "Go away."}])
    assert str(e.value) == ("rows, row 2: field `chosen` is empty; every row needs a non-empty answer (or set "
                            "skip_invalid: true to drop bad rows)")
    with pytest.raises(DataError) as e:
        _load("kto", [{"prompt": "Hi", "completion": "Hello.", "label": True},
                      {"prompt": "Hi", "completion": "Go away.", "label": "bad"}])
    assert str(e.value) == ("rows, row 2: field `label` must be true or false, got a string; mark each row's answer "
                            "true (good) or false (bad) (or set skip_invalid: true to drop bad rows)")
    # SFT on the same file keeps an unpaired row as an example; skip_invalid drops it from a preference stage
    assert len(_load("sft", [good, {"prompt": "Hi", "chosen": "Hello."}]).splits.train) == 1  # duplicate answer
    skipped = _load("dpo", [good, {"prompt": "Hi", "chosen": "Hello."}], skip_invalid=True)
    assert [(s.row, s.reason) for s in skipped.skipped] == [(2, "field `rejected` is missing")]


def test_preference_shapes_people_have():
    """Strings, message lists with a shared prompt, ShareGPT conversations (LLaMA-Factory's DPO demo), KTO."""
    lists = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}
    sharegpt = json.loads((Path(__file__).parent / "fixtures/datasets/dpo_en_demo.json").read_text())[:3]
    for rows in ([{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."}], [lists], sharegpt):
        data = _load("dpo", rows)
        assert data.preference == "pairs" and len(data.preference_rows) == len(rows)
        assert set(data.preference_rows[0]) == {"prompt", "chosen", "rejected"}
    assert _load("dpo", [lists]).preference_rows[0] == {"prompt": lists["prompt"], **{k: lists[k] for k in
                                                         ("chosen", "rejected")}}
    kto = _load("kto", KTO_ROWS[:2])
    assert kto.preference == "kto" and [r["label"] for r in kto.preference_rows] == [True, False]


def test_a_stage_on_the_wrong_data_says_which_stage_fits():
    plain = [{"prompt": "Hi", "completion": "Hello."}]
    with pytest.raises(DataError, match=r"`stage: dpo` learns from preferences, but rows holds plain examples"):
        prepare_preference_data(RunConfig(stage="dpo"), load_examples(RunConfig(stage="dpo"), plain), None)
    kto = load_examples(RunConfig(stage="dpo"), KTO_ROWS[:2])
    with pytest.raises(DataError, match=r"holds answers labelled true/false; use `stage: kto`"):
        prepare_preference_data(RunConfig(stage="dpo"), kto, None)


def test_config_checks_the_stage_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"^`init_from` starts a preference stage from an earlier run"):
        RunConfig(init_from=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^`loss_type` must be one of kto, apo_zero_unpaired for `stage: kto`"):
        RunConfig(stage="kto", loss_type="ipo")
    with pytest.raises(ConfigError, match=r"^`batch_size` must be at least 2 for `stage: kto`"):
        RunConfig(stage="kto", batch_size=1)
    assert RunConfig(stage="dpo").learning_rate == 5e-5 and RunConfig().learning_rate == 2e-4
    from finetune.preference import start_run

    with pytest.raises(ConfigError, match=r"^`init_from`: .* is not a run folder \(no run.yaml\)"):
        start_run(RunConfig(stage="dpo", init_from=str(tmp_path)))
    RunConfig(output_dir=str(tmp_path)).to_yaml(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=r"has no adapter/ folder; `method: lora` starts from a LoRA/QLoRA run"):
        start_run(RunConfig(stage="dpo", init_from=str(tmp_path)))
