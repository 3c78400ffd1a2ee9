"""Model & settings tab: base model, method with presets, basic settings, an Advanced accordion of every other
field (each with its help text as tooltip), a memory estimate against this machine, the expected duration (and cost
on a Space), and the exact YAML and CLI command the Train button will run. All of them follow every change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from finetune.config import DEFAULT_BASE_MODEL, DEMO_MODEL_ID, RunConfig
from finetune.errors import FinetuneError
from finetune.estimate import (
    SPACE_PRICES_READ,
    SPACE_PRICES_URL,
    DurationEstimate,
    cached_step_s,
    cached_throughput,
    duration_text,
    estimate_duration,
    mean_tokens,
    measure_in_child,
    space_cost,
)
from finetune.memory import available_memory, estimate_memory, format_size, model_shape, shortfall
from finetune.run_folder import CONFIG_FILE
from finetune.runs import train_command

from .context import AppContext
from .forms import (
    BASIC_FIELDS,
    DEMO_LEARNING_RATE,
    DEMO_PRESET,
    METHOD_LABELS,
    METHOD_PRESETS,
    advanced_fields,
    config_from_values,
    field_widget,
)
from .messages import error_md, notice_md, ok_md, warning_md

# Sensible small-to-8B instruct models (any other Hub id or local folder can be typed in).
MODEL_CHOICES = [
    "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct",
    "meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
    "mistralai/Mistral-7B-Instruct-v0.3",
]
DEMO_CHOICE = ("demo: tiny offline demo model (for trying the app)", DEMO_MODEL_ID)
GIB = 2**30
_PROJECT_ROOT = Path(__file__).resolve().parents[1]


def model_choices(hub_ok: bool) -> list[tuple[str, str]]:
    """Dropdown choices: the demo model first when the Hub can't be reached, last otherwise."""
    real = [(name, name) for name in MODEL_CHOICES]
    return [DEMO_CHOICE, *real] if not hub_ok else [*real, DEMO_CHOICE]


def default_model(hub_ok: bool) -> str:
    return DEFAULT_BASE_MODEL if hub_ok else DEMO_MODEL_ID


def hub_notice(hub_ok: bool) -> str:
    if hub_ok:
        return ""
    return notice_md("The Hugging Face Hub can't be reached from here, so the **offline demo model** is selected. "
                     "Models that are not in the local cache fall back to it (labelled in the results). "
                     "Its answers are noise until trained: use it to try the whole flow.")


def apply_preset(method: str, base_model: str) -> list:
    """New values for the preset fields (PRESET_FIELDS order) when the method or model changes."""
    method = method if method in METHOD_PRESETS else "lora"
    preset = dict(METHOD_PRESETS[method])
    if (base_model or "").strip() == DEMO_MODEL_ID:
        preset.update(DEMO_PRESET, learning_rate=DEMO_LEARNING_RATE[method])
    return [preset.get(name, gr.skip()) for name in PRESET_FIELDS]


PRESET_FIELDS = ("learning_rate", "lora_r", "lora_alpha", "lora_dropout", "batch_size", "gradient_accumulation_steps",
                 "gradient_checkpointing", "num_train_epochs", "max_seq_length", "logging_steps")


def memory_report(config: RunConfig, available: tuple[str, int, bool] | None = None) -> tuple[str, bool]:
    """(markdown, fits) for the memory estimate of `config` on this machine (or on `available`)."""
    text, short = memory_check(config, available)
    return text, short is None


def memory_check(config: RunConfig, available: tuple[str, int, bool] | None = None) -> tuple[str, str | None]:
    """(markdown, why it won't fit or None) for the memory estimate of `config` on this machine (or on `available`)."""
    shape = model_shape(config.base_model)
    device, free, on_gpu = available or available_memory()
    if shape is None:
        return notice_md(f"Memory estimate: unknown for `{config.base_model}` (its config.json isn't cached here). "
                         f"{device}: {free / GIB:.1f} GiB free."), None
    est = estimate_memory(config, shape, on_gpu=on_gpu)
    parts = (f"weights {_size(est.weights)} + gradients & optimizer {_size(est.training)} + "
             f"activations {_size(est.activations)} + overhead {_size(est.overhead)}")
    trainable = f"{_count(est.trainable_params)} trainable parameters of {_count(shape.n_params)}"
    text = f"Estimated memory: **{_size(est.total)}** ({parts}); {device}: {_size(free)} free. {trainable}."
    short = shortfall(est, device, free)
    if short is not None:
        tips = "try QLoRA, a smaller batch, a shorter max sequence length or gradient checkpointing"
        return warning_md(text + f" This run probably won't fit ({short}): {tips}."), short
    return ok_md(text), None


_size = format_size


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def duration_estimate(config: RunConfig, data: dict | None, *, cache_dir=None) -> DurationEstimate | None:
    """The expected duration of `config` on the loaded data (the Data tab's state), if its speed was measured here."""
    data = data or {}
    tokens_per_s = cached_throughput(config, cache_dir=cache_dir)
    if not data.get("rows") or not data.get("train_lengths") or tokens_per_s is None:
        return None
    return estimate_duration(config, data["rows"], mean_tokens(data["train_lengths"], config.max_seq_length),
                             tokens_per_s, cached_step_s(config, cache_dir=cache_dir))


def time_report(config: RunConfig, data: dict | None, *, cache_dir=None, environ=None) -> str:
    """Markdown: the expected duration (and, on a Space, the cost) of `config`, or what it still needs."""
    if not (data or {}).get("rows"):
        return notice_md("Expected duration: load a dataset on the **Data** tab first.")
    est = duration_estimate(config, data, cache_dir=cache_dir)
    if est is None:
        return notice_md("Expected duration: this model's speed with these settings hasn't been measured here yet. "
                         "Press **Estimate time**: it trains a few real steps in the background (after loading the "
                         "model) and remembers the speed for these settings.")
    text = (f"Expected duration: **about {duration_text(est.total_s)}** (training {duration_text(est.train_s)} + "
            f"evaluation {duration_text(est.eval_s)}; {est.train_tokens:,} training tokens at "
            f"{est.tokens_per_s:,.0f} tokens/s, measured here).")
    if data.get("tokenizer_model") not in (None, config.base_model):
        text += (f" Token counts are from `{data['tokenizer_model']}`'s tokenizer: load the data again for "
                 f"`{config.base_model}`'s.")
    cost = space_cost(est.total_s, environ)
    if cost is not None:
        hardware, price, usd = cost
        text += (f" On this Space's `{hardware}` hardware ({price:.2f} USD an hour) that is about **{usd:.2f} USD** "
                 f"(Hugging Face's price list, {SPACE_PRICES_URL}, as read on {SPACE_PRICES_READ}; prices may "
                 "change).")
    return notice_md(text)


def yaml_and_command(config: RunConfig, num_processes: int = 1) -> tuple[str, str]:
    """What the Train button writes and runs: the run's config YAML and the command. In the app the
    run manager points `output_dir` at the run's own folder and copies the dataset file into it."""
    dataset = Path(config.dataset)
    if dataset.is_absolute() and dataset.is_relative_to(_PROJECT_ROOT):  # bundled examples: a portable path
        config = config.replace(dataset=str(dataset.relative_to(_PROJECT_ROOT)))
    command = " ".join(train_command("python", CONFIG_FILE, num_processes)).replace(
        "python -m accelerate.commands.launch", "accelerate launch")
    return f"# {command}\n{config.to_yaml()}", command


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_widget() -> gr.Number:
    """Data-parallel processes: shown only where there is more than one GPU to spread a run over."""
    gpus = gpu_count()
    return gr.Number(value=1, precision=0, minimum=1, maximum=max(gpus, 1), label="Processes / GPUs",
                     visible=gpus > 1, elem_id="field-num_processes",
                     info=f"Train data-parallel on up to {gpus} GPUs through `accelerate launch` (effective batch = "
                          "batch size x gradient accumulation x processes).")


# ============================================================================ layout

def create_settings_tab(hub_ok: bool) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["hub_notice"] = gr.Markdown(hub_notice(hub_ok), visible=not hub_ok)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=360):
            c["base_model"] = gr.Dropdown(model_choices(hub_ok), value=default_model(hub_ok), allow_custom_value=True,
                                          label="Base model", elem_id="field-base_model", filterable=True,
                                          info="Pick one, or type any Hub id (`org/name`) or a local folder. "
                                               "`demo` is the tiny offline demo model.")
            c["method"] = gr.Radio(METHOD_LABELS, value="lora", label="Method", elem_id="field-method",
                                   info=RunConfig.field_help()["method"])
            with gr.Row():
                for name in BASIC_FIELDS[:3]:
                    c[name] = field_widget(name)
            with gr.Row():
                for name in BASIC_FIELDS[3:]:
                    c[name] = field_widget(name)
            with gr.Accordion("Advanced", open=False, elem_id="settings-advanced"):
                groups = RunConfig.field_groups()
                for group in ("model", "data", "method", "training"):
                    names = [n for n in advanced_fields() if n in groups[group]]
                    if not names:
                        continue
                    gr.Markdown(f"**{group.capitalize()}**", elem_classes="ft-subhead")
                    for start in range(0, len(names), 3):
                        with gr.Row():
                            for name in names[start:start + 3]:
                                c[name] = field_widget(name)
                c["num_processes"] = processes_widget()
        with gr.Column(scale=2, min_width=300):
            c["memory"] = gr.Markdown(elem_id="settings-memory")
            c["time"] = gr.Markdown(time_report(RunConfig(), None), elem_id="settings-time")
            c["estimate_time"] = gr.Button("Estimate time (a few real training steps)", size="sm",
                                           elem_id="settings-estimate-time")
            c["trust_warning"] = gr.Markdown(visible=False, elem_id="settings-trust-warning")
            c["show_yaml"] = gr.Button("Show as YAML / CLI command", elem_id="settings-show-yaml")
            c["config_error"] = gr.Markdown(visible=False)
            c["yaml"] = gr.Code(language="yaml", label=CONFIG_FILE, visible=False, elem_id="settings-yaml")
            c["command"] = gr.Code(language="shell", label="Command", visible=False, interactive=False,
                                   elem_id="settings-command")
    c["yaml_shown"] = gr.State(False)
    _apply_demo_defaults(c, default_model(hub_ok))
    return c


def _apply_demo_defaults(c: dict, base_model: str) -> None:
    """Start the widgets at the preset for the initially selected model."""
    for name, value in zip(PRESET_FIELDS, apply_preset("lora", base_model)):
        if name in c and not isinstance(value, dict):
            c[name].value = value


def settings_form(c: dict) -> dict[str, Any]:
    """The widgets whose values make up a RunConfig (the data fields come from the Data tab)."""
    names = ["base_model", "method", *BASIC_FIELDS, *advanced_fields(), "num_processes"]
    return {name: c[name] for name in names}


def wire_settings_tab(ctx: AppContext, c: dict, data_state: gr.State) -> None:
    form = settings_form(c)
    presets = [c[name] for name in PRESET_FIELDS]
    for trigger in (c["method"], c["base_model"]):  # `input`: the user's choice, not a restored form
        trigger.input(apply_preset, [c["method"], c["base_model"]], presets, show_progress="hidden",
                       api_visibility="private")

    def on_change(**values):
        return update_memory(values)

    c["base_model"].change(on_change, None, c["memory"], inputs_kwargs=form, show_progress="hidden",
                           api_name="memory_estimate")

    # Every shown view follows every change: memory, duration, and the YAML / command once shown.
    views = [c["memory"], c["time"], c["config_error"], c["yaml"], c["command"]]

    def on_any_change(state: dict, shown: bool, **values):
        return refresh_views(values, state, shown)

    gr.on([*(w.change for w in form.values()), data_state.change], on_any_change, [data_state, c["yaml_shown"]],
          views, inputs_kwargs=form, show_progress="hidden", api_visibility="private")

    c["trust_remote_code"].change(trust_remote_code_warning, c["trust_remote_code"], c["trust_warning"],
                                  show_progress="hidden", api_visibility="private")

    def on_show(state: dict, **values):
        return *show_yaml(values, (state or {}).get("dataset")), True

    c["show_yaml"].click(on_show, data_state, [c["config_error"], c["yaml"], c["command"], c["yaml_shown"]],
                         inputs_kwargs=form, api_name="show_yaml")

    def on_estimate(state: dict, progress=gr.Progress(), **values):
        return estimate_time(ctx, values, state, progress)

    c["estimate_time"].click(on_estimate, data_state, c["time"], inputs_kwargs=form, concurrency_limit=1,
                             concurrency_id="measure", api_name="estimate_time")


def refresh_views(values: dict[str, Any], data: dict | None, yaml_shown: bool) -> tuple:
    """(memory, duration, config error, YAML, command) for the current widget values; the YAML and command only
    once the user asked for them (else left as they are)."""
    try:
        config = config_from_values(values, **({"dataset": data["dataset"]} if (data or {}).get("dataset") else {}))
    except FinetuneError as e:
        error = error_md(str(e))
        hidden = (gr.update(visible=False), gr.update(visible=False)) if yaml_shown else (gr.skip(), gr.skip())
        return error, "", gr.update(value=error, visible=yaml_shown), *hidden
    shown = show_yaml(values, (data or {}).get("dataset")) if yaml_shown else (gr.skip(),) * 3
    return memory_report(config)[0], time_report(config, data), *shown


def estimate_time(ctx: AppContext, values: dict[str, Any], data: dict | None, progress=None) -> str:
    """Measure this model's training speed here (a child process running a few real steps), then the duration."""
    try:
        config = config_from_values(values)
    except FinetuneError as e:
        return error_md(str(e))
    if ctx.runs.active_run():
        return warning_md("A training is running on this machine: measure the speed after it ends (both would "
                          "share the hardware, and the number would be wrong).")
    if progress:
        progress(0.1, desc="Loading the model and training a few steps")
    try:
        measure_in_child(config)
    except FinetuneError as e:
        return error_md(str(e))
    return time_report(config, data)


def trust_remote_code_warning(on: bool) -> dict:
    """The warning shown (only) while the Trust remote code box is ticked."""
    from finetune.models import TRUST_REMOTE_CODE_WARNING

    return gr.update(value=warning_md(TRUST_REMOTE_CODE_WARNING) if on else "", visible=bool(on))


def update_memory(values: dict[str, Any]) -> str:
    try:
        config = config_from_values(values)
    except FinetuneError as e:
        return error_md(str(e))
    return memory_report(config)[0]


def show_yaml(values: dict[str, Any], dataset: str | None = None) -> tuple:
    try:
        config = config_from_values(values, **({"dataset": dataset} if dataset else {}))
    except FinetuneError as e:
        return gr.update(value=error_md(str(e)), visible=True), gr.update(visible=False), gr.update(visible=False)
    text, command = yaml_and_command(config, int(values.get("num_processes") or 1))
    return gr.update(visible=False), gr.update(value=text, visible=True), gr.update(value=command, visible=True)


__all__ = ["MODEL_CHOICES", "create_settings_tab", "default_model", "duration_estimate", "estimate_time", "gpu_count",
           "memory_check", "memory_report", "model_choices", "processes_widget", "refresh_views", "settings_form",
           "show_yaml", "time_report", "trust_remote_code_warning", "update_memory", "wire_settings_tab",
           "yaml_and_command"]
