"""One config, one truth: `RunConfig` is what the CLI, the app and the tests all build.

YAML is its only serialised form. Every field carries help text; validation happens in
`__post_init__` and names the field in backticks together with the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError
from .speed import LEVERS

# The real default base model for connected users. Named here and nowhere else.
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# `base_model: demo` means the tiny offline demo model built by `finetune.demo`.
DEMO_MODEL_ID = "demo"

Method = Literal["lora", "qlora", "full"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Attention = Literal["auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"]
FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")  # CUDA kernels for bf16/fp16 only
DataFormat = Literal["auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text"]
TemplateChoice = Literal["auto", "tokenizer", "chatml", "alpaca"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"]
Stage = Literal["sft", "dpo", "kto", "orpo"]
ReportTo = Literal["none", "tensorboard", "trackio", "wandb"]
# The packages transformers' reporting callbacks need (any one of a tuple will do).
REPORTER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",)}

# Default learning rates by method: adapters tolerate ~10x more than full fine-tuning.
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}
# Preference stages move the model less than SFT does (TRL's own default for full DPO is 1e-6).
DEFAULT_PREFERENCE_LR = {"lora": 5e-5, "qlora": 5e-5, "full": 1e-6}
# The loss variants TRL 1.16 offers per preference stage, the default first (ORPO has one loss).
LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"),
              "kto": ("kto", "apo_zero_unpaired"), "orpo": ("orpo",)}


def _f(default: Any, help: str, group: str, **kw) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "group": group}, **kw)
    return field(default=default, metadata={"help": help, "group": group}, **kw)


@dataclass
class RunConfig:
    # --- model ---
    base_model: str = _f(DEFAULT_BASE_MODEL, "Hub id (`org/name`) or local folder of the base model; "
                         "`demo` for the tiny offline demo model.", "model")
    model_revision: str | None = _f(None, "Hub branch, tag or commit of the base model (default: main).", "model")
    trust_remote_code: bool = _f(False, "Run Python code shipped inside the model repo. Only for repos you trust.",
                                 "model")
    offline_fallback: bool = _f(True, "If the base model can't be reached, fall back to the tiny offline demo "
                                "model (clearly labelled) instead of failing.", "model")
    chat_template: TemplateChoice = _f("auto", "Prompt format: `auto` uses the tokenizer's chat template if it "
                                       "has one, else `chatml`; `tokenizer` requires it; `chatml` or `alpaca` "
                                       "force a built-in one.", "model")
    system_prompt: str | None = _f(None, "System prompt added to every example that has none.", "model")

    # --- data ---
    dataset: str = _f("", "Local file (.json, .jsonl, .csv, .parquet, .txt) or Hub dataset id.", "data")
    dataset_config: str | None = _f(None, "Hub dataset configuration (subset) name.", "data")
    dataset_split: str = _f("train", "Hub dataset split to load.", "data")
    data_format: DataFormat = _f("auto", "Row format; `auto` detects alpaca, messages, sharegpt, "
                                 "prompt_completion or text.", "data")
    column_mapping: dict[str, str] = _f({}, "Map our field names to your columns, e.g. "
                                        "{prompt: question, completion: answer}. Overrides detection.", "data")
    skip_invalid: bool = _f(False, "Drop malformed rows (and report how many and why) instead of stopping.", "data")
    max_rows: int | None = _f(None, "Use only the first N rows of the dataset (quick experiments).", "data")
    eval_fraction: float = _f(0.1, "Fraction of rows held out for validation loss during training.", "data")
    test_fraction: float = _f(0.1, "Fraction of rows held out for the final test (before/after comparison).",
                              "data")
    train_on_prompt: bool = _f(False, "Put loss on prompt tokens too (default: only on assistant answers).", "data")
    train_on_reasoning: bool = _f(True, "Train on the assistant's reasoning (`reasoning_content`, `<think>`); false "
                                  "leaves it out of the examples.", "data")

    # --- method ---
    method: Method = _f("lora", "`lora` (adapters on a full-precision base), `qlora` (adapters on a 4-bit NF4 "
                        "base) or `full` (update every weight).", "method")
    load_in_4bit: bool = _f(False, "Load the base in 4-bit NF4 with double quantisation (set by `method: qlora`).",
                            "method")
    lora_r: int = _f(16, "LoRA rank: adapter capacity. 8-64 is typical.", "method")
    lora_alpha: int = _f(32, "LoRA scaling numerator; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).",
                         "method")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input, 0..1.", "method")
    lora_target_modules: str | list[str] = _f("all-linear", "Layers that get adapters: `all-linear` or a list "
                                              "such as [q_proj, v_proj].", "method")
    use_rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha/sqrt(r).", "method")
    use_dora: bool = _f(False, "Weight-decomposed LoRA (DoRA). Slower, sometimes better.", "method")
    stage: Stage = _f("sft", "`sft` learns the answers (supervised fine-tuning); `dpo`, `kto` and `orpo` learn "
                      "preferences: `dpo` and `orpo` from chosen/rejected pairs, `kto` from answers labelled "
                      "true/false (pairs work too). Usually run after an SFT run, with `init_from`.", "method")
    beta: float = _f(0.1, "Preference stages: DPO/KTO's beta, how far the model may move from the reference "
                     "(the starting model); lower moves further. 0.1 is typical. For ORPO, the weight of the "
                     "odds-ratio term next to the SFT loss.", "method")
    loss_type: str | None = _f(None, "Preference loss variant; unset: the stage's usual one. dpo: "
                               f"{', '.join(LOSS_TYPES['dpo'])}; kto: {', '.join(LOSS_TYPES['kto'])}.", "method")
    init_from: str | None = _f(None, "Preference stages: a finished run folder (e.g. your SFT run) whose adapter/ "
                               "(model/ for `method: full`) this stage starts from and measures against; "
                               "unset: start from the base model.", "method")

    # --- training ---
    num_train_epochs: float = _f(3.0, "Passes over the training split (ignored when `max_steps` > 0).", "training")
    max_steps: int = _f(-1, "Stop after this many optimizer steps; -1 means use `num_train_epochs`.", "training")
    learning_rate: float | None = _f(None, "Peak learning rate; default 2e-4 for LoRA/QLoRA, 2e-5 for full "
                                     "(preference stages: 5e-5 and 1e-6).",
                                     "training")
    lr_scheduler_type: Scheduler = _f("cosine", "Learning-rate schedule after warmup.", "training")
    warmup_ratio: float = _f(0.03, "Fraction of steps spent warming the learning rate up from 0.", "training")
    weight_decay: float = _f(0.0, "AdamW weight decay.", "training")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.", "training")
    batch_size: int = _f(4, "Examples per device per forward pass.", "training")
    gradient_accumulation_steps: int = _f(4, "Forward passes per optimizer step; effective batch = batch_size x "
                                          "this x processes.", "training")
    max_seq_length: int = _f(1024, "Tokens per example; longer examples are truncated (and counted in stats).",
                             "training")
    seed: int = _f(42, "Seed for data split, shuffling, adapter init and sampling.", "training")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% slower.",
                                      "training")
    padding_free: bool = _f(True, "Train on padding-free batches: a micro-batch's examples end to end in one "
                            "row, each attending only to itself (same loss and gradients as padded batches, "
                            "no compute spent on padding). Models where that can't be verified use padded "
                            "batches.", "training")
    speed: bool = _f(True, "Our speed layer (finetune/speed: padding-free batches, LM head on answer tokens only, "
                     "and more; same loss and gradients). `speed: off` trains with stock TRL `SFTTrainer` (its "
                     "collator and loss) instead.", "training")
    speed_levers_off: list[str] | None = _f(None, "Levers of the speed layer to switch off, e.g. [segments, "
                                            f"cpu_dropout]; any of {', '.join(LEVERS)}. Unset: all on.", "training")
    precision: Precision = _f("auto", "`auto` picks bf16 where supported (CUDA or a bf16 CPU), else fp16 on "
                              "CUDA, else fp32.", "training")
    attn_implementation: Attention = _f("auto", "Attention kernel: `auto` uses FlashAttention-2 on a CUDA GPU where "
                                        "the flash-attn package is installed and precision is bf16/fp16, else "
                                        "transformers' default (`sdpa`); `sdpa`, `eager`, `flash_attention_2` "
                                        "(flash-attn package) or `flash_attention_3` (flash-attn-3, Hopper GPUs) "
                                        "force one; the flash kernels need a CUDA GPU and bf16/fp16.", "training")
    early_stopping_patience: int | None = _f(None, "Stop after this many evaluations without a better "
                                             "validation loss, and keep the best checkpoint. Off when unset.",
                                             "training")
    logging_steps: int = _f(5, "Log train loss every N optimizer steps.", "training")
    eval_steps: int | None = _f(None, "Evaluate validation loss every N steps (default: about 5 times per run).",
                                "training")
    save_steps: int | None = _f(None, "Save a checkpoint every N steps (default: with each evaluation).",
                                "training")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints (the best one is always kept).", "training")
    report_to: ReportTo = _f("none", "Also send the training metrics to an experiment tracker: `tensorboard`, "
                             "`trackio` or `wandb` (its package must be installed; wandb and trackio read their "
                             "usual environment variables). The run folder's own metrics are written either way.",
                             "training")
    output_dir: str = _f("outputs/run", "Run folder: adapter/ or model/, checkpoints/, the metrics, results and "
                         "resolved config (layout: finetune/run_folder.py).", "training")
    resume_from_checkpoint: str | None = _f(None, "Checkpoint folder to resume from, or `latest` for the newest "
                                            "one in output_dir/checkpoints.", "training")

    def __post_init__(self) -> None:
        _coerce_types(self)
        if isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear":
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        if self.method == "qlora":
            self.load_in_4bit = True
        elif self.load_in_4bit and self.method == "full":
            raise ConfigError("`method: full` cannot train 4-bit weights; use `method: qlora`, or set "
                              "`load_in_4bit: false`.")
        elif self.load_in_4bit:  # lora on a 4-bit base is QLoRA; say it the one way
            self.method = "qlora"
        if self.learning_rate is None:
            self.learning_rate = (DEFAULT_LR if self.stage == "sft" else DEFAULT_PREFERENCE_LR)[self.method]
        _check_stage(self)
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0 (got {self.learning_rate}); try 2e-4 for "
               "LoRA or 2e-5 for full fine-tuning")
        _check(self.lora_r > 0, "lora_r", f"must be > 0 (got {self.lora_r}); 8, 16 or 32 are typical")
        _check(self.lora_alpha > 0, "lora_alpha", f"must be > 0 (got {self.lora_alpha}); 2 x lora_r is typical")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        for name in ("eval_fraction", "test_fraction"):
            v = getattr(self, name)
            _check(0 <= v <= 0.5, name, f"must be between 0 and 0.5 (got {v}); 0.1 is typical")
        _check(self.eval_fraction + self.test_fraction <= 0.5, "eval_fraction",
               f"`eval_fraction` + `test_fraction` must be at most 0.5 (got "
               f"{self.eval_fraction + self.test_fraction:g}) so that most rows are left to train on")
        _check(self.max_seq_length >= 16, "max_seq_length", f"must be at least 16 (got {self.max_seq_length}); "
               "512-2048 is typical")
        _check(self.batch_size >= 1, "batch_size", f"must be at least 1 (got {self.batch_size})")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps",
               f"must be at least 1 (got {self.gradient_accumulation_steps})")
        _check(self.max_steps == -1 or self.max_steps > 0, "max_steps",
               f"must be -1 (use epochs) or > 0 (got {self.max_steps})")
        _check(self.max_steps > 0 or self.num_train_epochs > 0, "num_train_epochs",
               f"must be > 0 when `max_steps` is -1 (got {self.num_train_epochs})")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1) (got {self.warmup_ratio})")
        _check(self.logging_steps >= 1, "logging_steps", f"must be at least 1 (got {self.logging_steps})")
        for name in ("eval_steps", "save_steps", "early_stopping_patience", "max_rows"):
            v = getattr(self, name)
            _check(v is None or v >= 1, name, f"must be at least 1, or unset (got {v})")
        _check(self.save_total_limit >= 1, "save_total_limit", f"must be at least 1 (got {self.save_total_limit})")
        if self.early_stopping_patience:
            _check(self.eval_fraction > 0, "early_stopping_patience",
                   "needs a validation split; set `eval_fraction` > 0 (0.1 is typical)")
            if self.eval_steps and self.save_steps:
                _check(self.save_steps % self.eval_steps == 0, "save_steps",
                       f"must be a multiple of `eval_steps` ({self.eval_steps}) when early stopping is on, so "
                       "the best evaluation has a checkpoint")
        if isinstance(self.lora_target_modules, list):
            _check(len(self.lora_target_modules) > 0 and all(isinstance(m, str) and m
                                                               for m in self.lora_target_modules),
                   "lora_target_modules", "must be `all-linear` or a non-empty list of module names")
        unknown = [lever for lever in self.speed_levers_off or [] if lever not in LEVERS]
        _check(not unknown, "speed_levers_off", f"has unknown lever(s) {', '.join(map(repr, unknown))}; choose from "
               f"{', '.join(LEVERS)} (padding-free batches are switched by `padding_free`)")
        _check(not (self.attn_implementation in FLASH_ATTENTION and self.precision == "fp32"), "attn_implementation",
               f"`attn_implementation: {self.attn_implementation}` runs in bf16/fp16 only, and `precision` is fp32; "
               "set `precision: auto` (or bf16/fp16), or use `attn_implementation: sdpa`")
        _check_reporter(self.report_to)
        _check(bool(self.base_model.strip()), "base_model", "is empty; give a Hub id, a local folder or `demo`")
        _check(bool(self.output_dir.strip()), "output_dir", "is empty; give a folder for the run")

    # --- serialisation ---
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of `field: value`, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = (f"; did you mean `{close[0]}`?" if close
                        else "; run `python -m finetune train --help` for the list")
                raise ConfigError(f"{source}: unknown field `{key}`{hint}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        return cls.from_dict(data, source=str(path))

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with `changes` applied and validated again."""
        data = self.to_dict()
        data.update(changes)
        return RunConfig.from_dict(data)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}

    @classmethod
    def field_groups(cls) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for f in dataclasses.fields(cls):
            groups.setdefault(f.metadata["group"], []).append(f.name)
        return groups


def _check_stage(cfg: RunConfig) -> None:
    """The preference fields: valid for the stage, and only where they apply. (That `init_from` is a finished run
    folder is checked when training starts: a saved config stays readable after that folder is gone.)"""
    if cfg.stage == "sft":
        _check(cfg.loss_type is None, "loss_type", "applies to preference stages only; set `stage: dpo`, `kto` or "
               "`orpo`, or remove `loss_type`")
        _check(cfg.init_from is None, "init_from", "starts a preference stage from an earlier run; set `stage: dpo`, "
               "`kto` or `orpo`, or remove `init_from`")
        return
    _check(cfg.beta > 0, "beta", f"must be > 0 (got {cfg.beta}); 0.1 is typical")
    choices = LOSS_TYPES[cfg.stage]
    _check(cfg.loss_type is None or cfg.loss_type in choices, "loss_type",
           f"must be one of {', '.join(choices)} for `stage: {cfg.stage}` (got {cfg.loss_type!r})")
    _check(cfg.init_from is None or bool(cfg.init_from.strip()), "init_from", "is empty; give a run folder or "
           "remove it")
    if cfg.stage == "kto" and (cfg.loss_type or "kto") == "kto":  # KTO estimates its KL term within a batch
        _check(cfg.batch_size >= 2, "batch_size", f"must be at least 2 for `stage: kto` (got {cfg.batch_size}): "
               "KTO estimates its KL term from the other answers in a batch")


def _check_reporter(report_to: str) -> None:
    """Fail before any loading when the chosen tracker's package is missing (transformers would fail only when
    the trainer is built, after the model has loaded)."""
    import importlib.util

    packages = REPORTER_PACKAGES.get(report_to, ())
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise ConfigError(f"`report_to: {report_to}` needs the `{packages[0]}` package, which is not installed "
                          f"here; install it (`pip install {packages[0]}`) or set `report_to: none`")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(message if message.startswith("`") else f"`{name}` {message}")


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def parse_value(name: str, raw: Any) -> Any:
    """Convert `raw` (often a CLI string) to the declared type of field `name`; raise ConfigError if it can't."""
    hints = typing.get_type_hints(RunConfig)
    if name not in hints:
        close = difflib.get_close_matches(name, list(hints), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise ConfigError(f"unknown field `{name}`{hint}")
    return _convert(name, hints[name], raw)


def _convert(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and value.strip()[:1] in ("[", "{"):  # YAML flow syntax: try list/dict first
            options.sort(key=lambda a: a is str)
        for arg in options:
            try:
                return _convert(name, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"`{name}` has an invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{name}` must be one of {', '.join(map(str, args))} (got {value!r})")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"`{name}` must be true or false (got {value!r})")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"`{name}` must be a number (got {value!r})")
        try:
            out = tp(value) if not isinstance(value, str) else tp(float(value)) if tp is int else tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"`{name}` must be {'an integer' if tp is int else 'a number'} (got {value!r})") from None
        if tp is int and float(value) != out:
            raise ConfigError(f"`{name}` must be an integer (got {value!r})")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"`{name}` must be text (got {type(value).__name__})")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            if value.strip().startswith("["):
                value = yaml.safe_load(value)
            else:
                value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"`{name}` must be a list (got {value!r})")
        return [_convert(name, args[0], v) for v in value]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                value = None
        if not isinstance(value, dict):
            raise ConfigError(f"`{name}` must be a mapping such as {{prompt: question}} (got {value!r})")
        return {str(k): str(v) for k, v in value.items()}
    return value


def _coerce_types(cfg: RunConfig) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _convert(f.name, hints[f.name], getattr(cfg, f.name)))
