"""RunConfig: validation names the field and the fix; YAML round-trips; unknown keys are rejected."""

import dataclasses
import re
from pathlib import Path

import pytest

from finetune.config import DEFAULT_BASE_MODEL, RunConfig, parse_value
from finetune.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("changes, message", [
    ({"method": "full", "load_in_4bit": True},
     "`method: full` cannot train 4-bit weights; use `method: qlora`, or set `load_in_4bit: false`."),
    ({"lora_r": 0}, "`lora_r` must be > 0 (got 0); 8, 16 or 32 are typical"),
    ({"learning_rate": 0}, "`learning_rate` must be > 0 (got 0.0); try 2e-4 for LoRA or 2e-5 for full fine-tuning"),
    ({"learning_rate": -1e-4}, "`learning_rate` must be > 0 (got -0.0001); try 2e-4 for LoRA or 2e-5 for full "
                               "fine-tuning"),
    ({"eval_fraction": 0.6}, "`eval_fraction` must be between 0 and 0.5 (got 0.6); 0.1 is typical"),
    ({"test_fraction": -0.1}, "`test_fraction` must be between 0 and 0.5 (got -0.1); 0.1 is typical"),
    ({"eval_fraction": 0.3, "test_fraction": 0.3},
     "`eval_fraction` + `test_fraction` must be at most 0.5 (got 0.6) so that most rows are left to train on"),
    ({"max_seq_length": 8}, "`max_seq_length` must be at least 16 (got 8); 512-2048 is typical"),
    ({"batch_size": 0}, "`batch_size` must be at least 1 (got 0)"),
    ({"max_steps": 0}, "`max_steps` must be -1 (use epochs) or > 0 (got 0)"),
    ({"lora_dropout": 1.0}, "`lora_dropout` must be in [0, 1) (got 1.0)"),
    ({"method": "adapter"}, "`method` must be one of lora, qlora, full (got 'adapter')"),
    ({"precision": "int8"}, "`precision` must be one of auto, bf16, fp16, fp32 (got 'int8')"),
    ({"batch_size": "four"}, "`batch_size` must be an integer (got 'four')"),
    ({"batch_size": 2.5}, "`batch_size` must be an integer (got 2.5)"),
    ({"gradient_checkpointing": "maybe"}, "`gradient_checkpointing` must be true or false (got 'maybe')"),
    ({"early_stopping_patience": 2, "eval_fraction": 0.0},
     "`early_stopping_patience` needs a validation split; set `eval_fraction` > 0 (0.1 is typical)"),
    ({"early_stopping_patience": 2, "eval_steps": 4, "save_steps": 6},
     "`save_steps` must be a multiple of `eval_steps` (4) when early stopping is on, so the best evaluation has a "
     "checkpoint"),
    ({"base_model": "  "}, "`base_model` is empty; give a Hub id, a local folder or `demo`"),
    ({"attn_implementation": "flash"}, "`attn_implementation` must be one of auto, sdpa, eager, flash_attention_2, "
                                       "flash_attention_3 (got 'flash')"),
    ({"attn_implementation": "flash_attention_2", "precision": "fp32"},
     "`attn_implementation: flash_attention_2` runs in bf16/fp16 only, and `precision` is fp32; set "
     "`precision: auto` (or bf16/fp16), or use `attn_implementation: sdpa`"),
])
def test_validation_names_field_and_fix(changes, message):
    with pytest.raises(ConfigError) as e:
        RunConfig(**changes)
    assert str(e.value) == message


def test_unknown_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError, match=re.escape("cfg.yaml: unknown field `lerning_rate`; did you mean "
                                                    "`learning_rate`?")):
        RunConfig.from_dict({"lerning_rate": 1e-4}, source="cfg.yaml")


def test_defaults_are_correct_by_default():
    c = RunConfig()
    assert c.base_model == DEFAULT_BASE_MODEL
    assert (c.eval_fraction, c.test_fraction) == (0.1, 0.1)  # the 80/10/10 split the guides recommend
    assert c.trust_remote_code is False
    assert c.lora_target_modules == "all-linear"
    assert c.learning_rate == 2e-4
    assert c.attn_implementation == "auto"  # transformers' default, or FlashAttention-2 where it can run
    assert RunConfig(method="full").learning_rate == 2e-5


def test_methods_and_4bit():
    assert RunConfig(method="qlora").load_in_4bit is True
    c = RunConfig(method="lora", load_in_4bit=True)  # LoRA on a 4-bit base is QLoRA: one name for one thing
    assert c.method == "qlora"
    assert RunConfig(method="lora").load_in_4bit is False


def test_target_modules_list_or_all_linear():
    assert RunConfig(lora_target_modules="q_proj, v_proj").lora_target_modules == ["q_proj", "v_proj"]
    assert RunConfig(lora_target_modules=["k_proj"]).lora_target_modules == ["k_proj"]
    assert RunConfig().lora_target_modules == "all-linear"


def test_yaml_round_trip(tmp_path):
    c = RunConfig(base_model="demo", dataset="x.jsonl", method="qlora", lora_r=8, use_dora=True,
                  column_mapping={"prompt": "q", "completion": "a"}, lora_target_modules=["q_proj", "v_proj"],
                  early_stopping_patience=3, system_prompt="Be brief.", max_steps=10)
    path = tmp_path / "run.yaml"
    c.to_yaml(path)
    back = RunConfig.from_yaml(path)
    assert back == c
    assert dataclasses.asdict(back) == dataclasses.asdict(c)


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {tmp_path / 'nope.yaml'}")):
        RunConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_r: [1,\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: invalid YAML")):
        RunConfig.from_yaml(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{notmap}: expected a mapping of `field: value`, got list")):
        RunConfig.from_yaml(notmap)


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("base_model: !!python/object/apply:os.system ['echo pwned']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="invalid YAML"):
        RunConfig.from_yaml(evil)


def test_every_field_has_help_and_group():
    for f in dataclasses.fields(RunConfig):
        assert f.metadata.get("help"), f.name
        assert f.metadata.get("group") in {"model", "data", "method", "training"}, f.name


def test_parse_value_converts_cli_strings():
    assert parse_value("max_steps", "10") == 10
    assert parse_value("learning_rate", "1e-4") == 1e-4
    assert parse_value("use_dora", "yes") is True
    assert parse_value("early_stopping_patience", "none") is None
    assert parse_value("column_mapping", "{prompt: q, completion: a}") == {"prompt": "q", "completion": "a"}
    assert parse_value("lora_target_modules", "[q_proj, v_proj]") == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=re.escape("unknown field `lora_rank`; did you mean `lora_r`?")):
        parse_value("lora_rank", "8")


def test_every_shipped_config_loads():
    configs = sorted((EXAMPLES).glob("*.yaml"))
    assert configs, "examples/ ships YAML configs"
    for path in configs:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# python -m finetune") or first.startswith("# accelerate") or \
            first.startswith("# torchrun"), f"{path.name} must start with the command that runs it"
        RunConfig.from_yaml(path)


# ----------------------------------------------------------------------------- report_to (issue 17, item 11)

def test_report_to_is_off_by_default_and_checked_before_anything_loads():
    assert RunConfig().report_to == "none"
    with pytest.raises(ConfigError, match=re.escape("`report_to` must be one of none, tensorboard, trackio, wandb "
                                                    "(got 'mlflow')")):
        RunConfig(report_to="mlflow")
    import importlib.util

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match=re.escape("`report_to: wandb` needs the `wandb` package, which is not "
                                                    "installed here; install it (`pip install wandb`) or set "
                                                    "`report_to: none`")):
        RunConfig(report_to="wandb")


def test_report_to_reaches_the_trainer_arguments(tmp_path, monkeypatch):
    """An importable `trackio` (a stand-in folder: the tracker isn't installed here, and only its presence is
    checked before training) is accepted, and the trainer is told to report to it."""
    from finetune.train import _sft_args

    (tmp_path / "trackio").mkdir()
    (tmp_path / "trackio" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = RunConfig(base_model="demo", report_to="trackio", output_dir=str(tmp_path / "run"))
    args = _sft_args(config, "fp32", total_steps=4, eval_every=2, save_every=2, has_eval=True)
    assert args.report_to == ["trackio"]
    assert _sft_args(config.replace(report_to="none"), "fp32", 4, 2, 2, True).report_to == []
