"""RunConfig fields ⇄ widgets: one widget per field, built from the field's type, default and help text.

Events pass these widgets to handlers as keyword arguments named after the fields (`inputs_kwargs=`), so
handlers get `{field name: value}` and the API's parameters carry the same names; `config_from_values`
turns such a dict into a validated RunConfig.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import gradio as gr

from finetune.config import RunConfig, parse_value
from finetune.errors import ConfigError

HELP = RunConfig.field_help()
_HINTS = typing.get_type_hints(RunConfig)
_DEFAULTS = RunConfig().to_dict()

# Short labels for people; the field name stays visible in the YAML view.
LABELS = {
    "base_model": "Base model", "method": "Method", "num_train_epochs": "Epochs", "max_steps": "Max steps",
    "learning_rate": "Learning rate", "lora_r": "LoRA rank (r)", "lora_alpha": "LoRA alpha",
    "batch_size": "Batch size", "max_seq_length": "Max sequence length (tokens)",
    "gradient_accumulation_steps": "Gradient accumulation steps", "lora_dropout": "LoRA dropout",
    "lora_target_modules": "LoRA target modules", "use_rslora": "rsLoRA", "use_dora": "DoRA",
    "lr_scheduler_type": "LR schedule", "warmup_ratio": "Warmup ratio", "weight_decay": "Weight decay",
    "max_grad_norm": "Max grad norm", "seed": "Seed", "gradient_checkpointing": "Gradient checkpointing",
    "precision": "Precision", "early_stopping_patience": "Early stopping patience",
    "logging_steps": "Log every N steps", "eval_steps": "Evaluate every N steps", "save_steps": "Save every N steps",
    "save_total_limit": "Checkpoints to keep", "model_revision": "Model revision",
    "trust_remote_code": "Trust remote code", "offline_fallback": "Fall back to the demo model when offline",
    "chat_template": "Chat template", "system_prompt": "System prompt", "eval_fraction": "Validation fraction",
    "test_fraction": "Test fraction", "train_on_prompt": "Train on prompt tokens too", "max_rows": "Max rows",
    "skip_invalid": "Skip invalid rows", "data_format": "Format", "column_mapping": "Column mapping",
    "dataset_config": "Subset (config)", "dataset_split": "Split", "padding_free": "Padding-free batches",
    "speed": "Speed layer", "speed_levers_off": "Speed levers switched off",
    "report_to": "Report to (experiment tracker)", "train_on_reasoning": "Train on reasoning",
    "stage": "Stage (SFT or preference)", "beta": "Beta (preference strength)", "loss_type": "Preference loss",
    "init_from": "Start from run (folder)", "attn_implementation": "Attention kernel",
}
UNSET = "unset"  # placeholder of an optional number box left empty

# Fields the Model & settings tab shows up front; the rest (minus those owned by the Data tab or the
# run manager) go in its Advanced accordion.
BASIC_FIELDS = ("num_train_epochs", "learning_rate", "batch_size", "max_seq_length", "lora_r", "lora_alpha")
DATA_FIELDS = ("dataset", "dataset_config", "dataset_split", "data_format", "column_mapping", "skip_invalid",
               "max_rows")
MANAGED_FIELDS = ("output_dir", "resume_from_checkpoint", "load_in_4bit")  # set by the run manager / method
SETTINGS_SPECIAL = ("base_model", "method")


def advanced_fields() -> list[str]:
    skip = set(BASIC_FIELDS) | set(DATA_FIELDS) | set(MANAGED_FIELDS) | set(SETTINGS_SPECIAL)
    return [f.name for f in dataclasses.fields(RunConfig) if f.name not in skip]


def field_widget(name: str, value: Any = dataclasses.MISSING, **kw) -> gr.components.Component:
    """The widget for RunConfig field `name`: its label, a tooltip from the field's help, and its default."""
    tp = _HINTS[name]
    value = _DEFAULTS[name] if value is dataclasses.MISSING else value
    common = dict(label=LABELS.get(name, name), info=HELP[name], elem_id=f"field-{name}", **kw)
    options = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = options[0] if len(options) == 1 else None
    if typing.get_origin(tp) is Literal or (base is not None and typing.get_origin(base) is Literal):
        return gr.Dropdown(choices=list(typing.get_args(base if base is not None else tp)), value=value, **common)
    if base is bool:
        return gr.Checkbox(value=value, **common)
    if base is int and type(None) in options_of(tp):
        # a Number box shows an empty value as "0"; a text box can stay empty, which means unset
        return gr.Textbox(value="" if value is None else str(value), placeholder=UNSET, max_lines=1, **common)
    if base is int:
        return gr.Number(value=value, precision=0, **common)
    if base is float:
        return gr.Number(value=value, **common)
    if isinstance(value, list):
        value = ", ".join(value)
    if isinstance(value, dict):
        value = ", ".join(f"{k}: {v}" for k, v in value.items())
    return gr.Textbox(value="" if value is None else str(value), **common)


def options_of(tp: Any) -> tuple:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def config_from_values(values: dict[str, Any], **overrides: Any) -> RunConfig:
    """A validated RunConfig from widget values (strings, floats, None); ConfigError names the bad field."""
    data: dict[str, Any] = {}
    for name, raw in {**values, **overrides}.items():
        if name not in _HINTS:
            continue
        if isinstance(raw, str) and name not in ("system_prompt",):
            raw = raw.strip()
        if name == "column_mapping":  # typed as `prompt: question, completion: answer`
            raw = "{" + raw + "}" if isinstance(raw, str) and raw and not raw.startswith("{") else (raw or {})
        if name == "learning_rate" and raw in (None, ""):
            raw = None  # re-derived from the method
        if _optional(name) and int in typing.get_args(_HINTS[name]) and raw == 0:
            raw = None  # a number box that was left empty comes back as 0 once the browser has shown it
        if (raw is None or raw == "") and not _optional(name) and _HINTS[name] is not str:
            raise ConfigError(f"`{name}` ({LABELS.get(name, name)}) is empty; enter a value (default: "
                              f"{_DEFAULTS[name]})")
        data[name] = parse_value(name, raw)
    return RunConfig.from_dict(data, source="settings")


def _optional(name: str) -> bool:
    return type(None) in typing.get_args(_HINTS[name])


# Presets: good starting points per method, applied when the method changes.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "lora": {"learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "batch_size": 4,
             "gradient_accumulation_steps": 4, "gradient_checkpointing": False, "num_train_epochs": 3},
    "qlora": {"learning_rate": 2e-4, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "batch_size": 2,
              "gradient_accumulation_steps": 8, "gradient_checkpointing": True, "num_train_epochs": 3},
    "full": {"learning_rate": 2e-5, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "batch_size": 2,
             "gradient_accumulation_steps": 8, "gradient_checkpointing": True, "num_train_epochs": 2},
}
# The demo model learns its answers word for word in seconds at these settings (examples/quickstart.yaml). Its
# rates keep the methods' ratio: QLoRA trains the same adapters as LoRA (same rate), full fine-tuning every weight
# (a tenth of it).
DEMO_PRESET = {"lora_r": 32, "lora_alpha": 64, "lora_dropout": 0.0, "num_train_epochs": 24, "batch_size": 8,
               "gradient_accumulation_steps": 1, "max_seq_length": 512, "logging_steps": 4}
DEMO_LEARNING_RATE = {"lora": 1e-2, "qlora": 1e-2, "full": 1e-3}
METHOD_LABELS = [("LoRA: adapters on a full-precision base", "lora"),
                 ("QLoRA: adapters on a 4-bit base (least memory)", "qlora"),
                 ("Full: update every weight (most memory)", "full")]
