"""The model card (`README.md`) pushed with a run, and the loss-curve image it shows.

Everything comes from the run folder (`finetune.run_folder`): the resolved config (hyper-parameters), the
results (metrics), the metrics records (loss curve) and the saved tokenizer (prompt format). The YAML front
matter is what the Hub indexes, and the Hub rejects values that are not Hub ids, so local paths never go there:
`base_model` is set only for a Hub base model, `datasets` only for a dataset that came from the Hub.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import RunConfig
from .errors import ModelError
from .run_folder import CONFIG_FILE as RUN_CONFIG_FILE
from .run_folder import RESULTS_FILE, RunFolder

log = logging.getLogger(__name__)

CardKind = Literal["adapter", "merged"]
LOSS_CURVE_FILE = "loss_curve.png"
CONFIG_FILE = "training_config.yaml"  # the run's config, as pushed (RESULTS_FILE keeps the run folder's name)

# `org/name` (or a bare `name` for the few root-level models like `gpt2`): what the Hub accepts in metadata.
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A dataset "id" ending like this is a file someone typed, never a Hub dataset.
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt", ".arrow", ".zip", ".gz")
# A neutral conversation for the prompt-format example: never a row from the user's (maybe private) data.
EXAMPLE_MESSAGES = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is Paris."}]


# ----------------------------------------------------------------------------- reading the run folder
def read_run(run_dir: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """(resolved config, results) of a run folder; results is {} for a run that never finished."""
    run = RunFolder(run_dir)
    if not run.has_config:
        raise ModelError(f"{run_dir} is not a run folder (no {RUN_CONFIG_FILE}); give the `output_dir` of a "
                         "training run")
    return run.read_config(), run.read_results() or {}


def is_demo_run(config: RunConfig, results: dict[str, Any]) -> bool:
    """True when the weights came from the tiny offline demo model (asked for by name or by its folder,
    or an offline fallback)."""
    from .demo import is_demo_model

    return bool(results.get("is_demo_model")) or is_demo_model(os.path.expanduser(config.base_model.strip()))


def hub_base_model(config: RunConfig, results: dict[str, Any]) -> str | None:
    """The base model's Hub id, or None for the demo model or a local folder."""
    name = config.base_model.strip()
    if is_demo_run(config, results) or _looks_local(name) or not HUB_REPO_ID.fullmatch(name):
        return None
    return name


def hub_dataset(config: RunConfig, results: dict[str, Any]) -> str | None:
    """The dataset's Hub id when it came from the Hub, else None (a local file must never reach the card).

    The run's results record where the data came from (`data.dataset_source`: hub | file | rows); a run
    without that record gets a conservative guess: an `org/name` that is not a path on this machine
    and doesn't end like a data file.
    """
    name = config.dataset.strip()
    source = (results.get("data") or {}).get("dataset_source", results.get("dataset_source"))
    if source is not None:
        return name if source == "hub" and HUB_REPO_ID.fullmatch(name) else None
    looks_hub = (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None
                 and not name.lower().endswith(DATA_FILE_SUFFIXES) and not _looks_local(name))
    return name if looks_hub else None


def _looks_local(value: str) -> bool:
    expanded = os.path.expanduser(value)
    return (os.path.isabs(expanded) or value.startswith((".", "~")) or "\\" in value
            or Path(expanded).exists())


def redact_local_paths(value: Any) -> Any:
    """A copy of a config/results structure with every local path cut down to its last component.

    What gets pushed must not reveal the trainer's folders (`/home/alice/clients/acme/train.jsonl`).
    """
    if isinstance(value, dict):
        return {k: redact_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_local_paths(v) for v in value]
    if isinstance(value, str) and value and "\n" not in value and _looks_local(value):
        return Path(os.path.expanduser(value)).name or value
    return value


# ----------------------------------------------------------------------------- loss curve
def plot_loss_curve(records: list[dict[str, Any]], out_png: str | Path) -> Path | None:
    """Train and validation loss of a run's metrics records against optimizer step, as a PNG. None when there
    is no loss to plot."""
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None and "step" in r]
    val = [(r["step"], r["eval_loss"]) for r in records if r.get("eval_loss") is not None and "step" in r]
    if not train and not val:
        return None
    # A bare Figure renders with the Agg canvas: no pyplot global state, no display, safe off the main thread.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)  # 640x360 px
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if val:
        ax.plot(*zip(*val), label="validation loss", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


# ----------------------------------------------------------------------------- the card
def build_model_card(run_dir: str | Path, repo_id: str, *, kind: CardKind = "adapter", license: str | None = None,
                     loss_curve: str | None = LOSS_CURVE_FILE, tokenizer_dir: str | Path | None = None,
                     with_gguf: bool = False) -> str:
    """The README.md text for `repo_id`: YAML front matter, then what/how/results/usage.

    `kind` is what the repo holds: a PEFT `adapter`, or a standalone `merged` (or fully fine-tuned)
    model. `loss_curve` is the image's path inside the repo (None: no image). `tokenizer_dir` is the
    folder whose chat template renders the prompt-format example (default: the run's adapter/ or model/).
    `with_gguf`: the repo also holds the run's GGUF export, which then gets its section.
    """
    run_dir = Path(run_dir)
    config, results = read_run(run_dir)
    if tokenizer_dir is None:
        tokenizer_dir = RunFolder(run_dir).final_dir_for(config.method)
    parts = [
        _front_matter(config, results, kind, license),
        f"# {repo_id.split('/')[-1]}\n",
        _summary(config, results, kind),
        _results_section(results, loss_curve),
        _hyperparameter_section(config, results),
        _usage_section(config, results, repo_id, kind),
        _prompt_format_section(config, tokenizer_dir),
        _export_section(run_dir) if with_gguf else "",
        _files_section(kind, loss_curve, with_gguf),
        _versions_section(results),
    ]
    return "\n".join(p for p in parts if p)


def front_matter(card: str) -> dict[str, Any]:
    """Parse the YAML metadata block at the top of a card ({} when there is none)."""
    if not card.startswith("---\n"):
        return {}
    return yaml.safe_load(card[4:card.index("\n---\n", 4)]) or {}


def _front_matter(config: RunConfig, results: dict, kind: CardKind, license: str | None) -> str:
    meta: dict[str, Any] = {}
    base = hub_base_model(config, results)
    if base:
        meta["base_model"] = base
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    if license:
        meta["license"] = license
    stage_tags = list(dict.fromkeys(stage["stage"] for stage in _stages(config, results)))
    tags = [config.method] + (["lora"] if config.method == "qlora" else []) + stage_tags + ["trl"]
    if is_demo_run(config, results):
        tags.append("demo-model")
    meta["tags"] = tags
    dataset = hub_dataset(config, results)
    if dataset:
        meta["datasets"] = [dataset]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _base_link(config: RunConfig, results: dict) -> str:
    base = hub_base_model(config, results)
    if base:
        return f"[{base}](https://huggingface.co/{base})"
    if is_demo_run(config, results):
        return "the tiny offline demo model"
    return f"a local model (`{Path(config.base_model).name}`)"


def _dataset_text(config: RunConfig, results: dict) -> str:
    dataset = hub_dataset(config, results)
    if dataset:
        split = f", split `{config.dataset_split}`" if config.dataset_split else ""
        subset = f", subset `{config.dataset_config}`" if config.dataset_config else ""
        return f"the Hub dataset [{dataset}](https://huggingface.co/datasets/{dataset}){subset}{split}"
    source = (results.get("data") or {}).get("dataset_source")
    if source == "rows" or not config.dataset:
        return "rows passed in directly (not a file)"
    return f"a local dataset file (`{Path(config.dataset).name}`)"


def _summary(config: RunConfig, results: dict, kind: CardKind) -> str:
    what = {"lora": "LoRA", "qlora": "QLoRA (4-bit NF4 base)", "full": "full"}[config.method]
    if kind == "adapter":
        head = f"A {what} adapter for {_base_link(config, results)}"
    elif config.method == "full":
        head = f"A fully fine-tuned version of {_base_link(config, results)}"
    else:
        base = _base_link(config, results)
        head = f"{base[:1].upper()}{base[1:]} with a {what} adapter merged into its weights (a standalone model: " \
               "no PEFT needed)"
    lines = [f"{head}, trained {_stages_text(config, results)}."]
    rows = (results.get("data") or {}).get("rows") or {}
    if rows:
        lines.append("Examples per split: " + ", ".join(f"{k} {v}" for k, v in rows.items()) + ".")
    loss_on = "every token" if config.train_on_prompt else "the assistant's answers only"
    lines.append(f"Loss was computed on {loss_on}.")
    if results.get("status") == "stopped":
        lines.append("Training was stopped early by the user; these are the weights at that point.")
    text = "\n".join(lines) + "\n"
    if is_demo_run(config, results):
        text += ("\n> **Demo model.** The base is a tiny model built offline for testing (pre-trained for seconds on a "
                 "small corpus; it knows no language); its answers are noise. Don't use this repo for anything but "
                 "trying the pipeline.\n")
    return text


STAGE_NAMES = {"sft": "supervised fine-tuning", "dpo": "DPO", "kto": "KTO", "orpo": "ORPO"}


def _stages(config: RunConfig, results: dict) -> list[dict[str, Any]]:
    """The stages that produced the weights (results' `stages`, written by preference stages), oldest first."""
    return results.get("stages") or [{"stage": config.stage, "trainer": "SFTTrainer"}]


def _stages_text(config: RunConfig, results: dict) -> str:
    """'with supervised fine-tuning (TRL `SFTTrainer`) on X', or each stage in turn: '... on X, then with DPO ...'."""
    stages = _stages(config, results)
    parts = []
    for i, stage in enumerate(stages):
        if i == len(stages) - 1:  # this run: its dataset as the config and results say
            data = _dataset_text(config, results)
        elif stage.get("dataset_source") == "hub":
            data = f"the Hub dataset [{stage['dataset']}](https://huggingface.co/datasets/{stage['dataset']})"
        else:  # recorded as a file name (finetune/preference.py), never a path
            data = "rows passed in directly" if stage.get("dataset_source") == "rows" else \
                f"a local dataset file (`{stage.get('dataset')}`)"
        parts.append(f"with {STAGE_NAMES.get(stage['stage'], stage['stage'])} (TRL `{stage['trainer']}`) on {data}")
    return ", then ".join(parts)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _fmt_runtime(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h {m:02d}m {s:02d}s" if hours else f"{m}m {s:02d}s" if m else f"{seconds:.1f} s"


def _results_section(results: dict, loss_curve: str | None) -> str:
    rows = []
    for label, key in (("Train loss", "train_loss"), ("Train perplexity", "train_perplexity"),
                       ("Validation loss", "eval_loss"), ("Validation perplexity", "eval_perplexity")):
        if results.get(key) is not None:
            rows.append(f"| {label} | {_fmt(results[key])} |")
    for label, stem in (("Test loss", "test_loss"), ("Test perplexity", "test_perplexity")):
        before, after = results.get(f"{stem}_before"), results.get(f"{stem}_after")
        if before is not None or after is not None:
            rows.append(f"| {label} (before → after) | {_fmt(before)} → {_fmt(after)} |")
    pref = results.get("preference") or {}
    if pref.get("rows"):
        what = f"on {pref['rows']} held-out {'pairs' if pref.get('kind') == 'pairs' else 'answers'}"
        rows.append(f"| Preference accuracy {what} (before → after) | {_fmt(pref.get('accuracy_before'))} → "
                    f"{_fmt(pref.get('accuracy_after'))} |")
        rows.append(f"| Preference margin, nats (before → after) | {_fmt(pref.get('margin_before'))} → "
                    f"{_fmt(pref.get('margin_after'))} |")
    if results.get("train_runtime") is not None:
        rows.append(f"| Training time | {_fmt_runtime(results['train_runtime'])} |")
    if results.get("trainable_params") is not None:
        pct = results.get("trainable_percent")
        rows.append(f"| Trainable parameters | {results['trainable_params']:,}"
                    + (f" ({pct:.3g}%)" if pct is not None else "") + " |")
    if results.get("peak_memory_mb"):
        rows.append(f"| Peak memory | {results['peak_memory_mb']:,.0f} MB |")
    out = ["## Results\n"]
    if rows:
        out.append("| Metric | Value |\n|---|---|\n" + "\n".join(rows) + "\n")
        out.append("Perplexity is exp(mean loss per token) on the assistant tokens; lower is better.\n")
    else:
        out.append(f"No metrics were recorded ({RESULTS_FILE} is missing).\n")
    if loss_curve:
        out.append(f"![Training and validation loss]({loss_curve})\n")
    return "\n".join(out)


def _hyperparameter_section(config: RunConfig, results: dict) -> str:
    c = config
    rows: list[tuple[str, Any]] = [("Method", c.method)]
    if c.stage != "sft":
        rows += [("Stage", c.stage), ("Beta", c.beta), ("Loss", (results.get("preference") or {}).get("loss_type"))]
    if c.method != "full":
        target = c.lora_target_modules if isinstance(c.lora_target_modules, str) else ", ".join(c.lora_target_modules)
        rows += [("LoRA rank (r)", c.lora_r), ("LoRA alpha", c.lora_alpha), ("LoRA dropout", c.lora_dropout),
                 ("Target modules", target)]
        if c.use_rslora:
            rows.append(("rsLoRA", True))
        if c.use_dora:
            rows.append(("DoRA", True))
    if c.load_in_4bit:
        rows.append(("Base quantisation", "4-bit NF4, double quantisation"))
    length = f"{c.max_steps} steps" if c.max_steps > 0 else f"{c.num_train_epochs:g} epochs"
    rows += [("Learning rate", c.learning_rate), ("Schedule", f"{c.lr_scheduler_type}, warmup {c.warmup_ratio:g}"),
             ("Training length", length), ("Batch size per device", c.batch_size),
             ("Gradient accumulation", c.gradient_accumulation_steps),
             ("Effective batch", c.batch_size * c.gradient_accumulation_steps),
             ("Max sequence length", f"{c.max_seq_length} tokens"), ("Weight decay", c.weight_decay),
             ("Max grad norm", c.max_grad_norm), ("Precision", results.get("precision") or c.precision),
             ("Chat template", results.get("chat_template") or c.chat_template), ("Seed", c.seed)]
    table = "| Setting | Value |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)
    return (f"## Training hyper-parameters\n\n{table}\n\nThe complete resolved configuration is in "
            f"[`{CONFIG_FILE}`]({CONFIG_FILE}) (local paths shortened to their file names).\n")


def _usage_section(config: RunConfig, results: dict, repo_id: str, kind: CardKind) -> str:
    chat = ('messages = [{"role": "user", "content": "What is the capital of France?"}]\n'
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
            'return_tensors="pt", return_dict=True)\n'
            "output = model.generate(**inputs, max_new_tokens=128)\n"
            'print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))\n')
    base = hub_base_model(config, results)
    if kind == "adapter":
        if base:
            peft_load = (f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")  '
                         f"# downloads {base} too\n")
            imports = "from peft import AutoPeftModelForCausalLM\n"
        else:
            where = ("the demo base: `python -m finetune demo` prints its folder" if is_demo_run(config, results)
                     else "the base this adapter was trained on (not on the Hub)")
            peft_load = (f'base = AutoModelForCausalLM.from_pretrained("path/to/base-model")  # {where}\n'
                         f'model = PeftModel.from_pretrained(base, "{repo_id}")\n')
            imports = "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        if base:
            imports += "from transformers import AutoTokenizer\n"
        peft_code = (f"{imports}\n{peft_load}"
                     f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n\n{chat}')
        out = ["## Usage\n", "With PEFT (`pip install peft transformers`):\n", f"```python\n{peft_code}```\n"]
        if base:
            out += ["With transformers alone (its PEFT integration loads the base and the adapter):\n",
                    f'```python\nfrom transformers import pipeline\n\ngenerator = pipeline("text-generation", '
                    f'model="{repo_id}")\nprint(generator([{{"role": "user", "content": "Hello!"}}], '
                    'max_new_tokens=128)[0]["generated_text"])\n```\n']
        out.append("To ship a standalone model, merge the adapter: `model = model.merge_and_unload()`, then "
                   "`model.save_pretrained(...)`.\n")
        return "\n".join(out)
    code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n\n{chat}')
    pipe = (f'from transformers import pipeline\n\ngenerator = pipeline("text-generation", model="{repo_id}")\n'
            'print(generator([{"role": "user", "content": "Hello!"}], max_new_tokens=128)[0]["generated_text"])\n')
    return ("## Usage\n\nWith transformers (`pip install transformers`):\n\n"
            f"```python\n{code}```\n\nOr as a pipeline:\n\n```python\n{pipe}```\n")


def render_prompt_example(tokenizer_dir: str | Path, system_prompt: str | None = None) -> str | None:
    """`EXAMPLE_MESSAGES` rendered with the folder's chat template; None if it has no tokenizer or template."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as e:
        log.warning("No tokenizer in %s for the prompt-format example: %s", tokenizer_dir, e)
        return None
    if not tokenizer.chat_template:
        return None
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + EXAMPLE_MESSAGES
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _prompt_format_section(config: RunConfig, tokenizer_dir: str | Path) -> str:
    example = render_prompt_example(tokenizer_dir, config.system_prompt) if Path(tokenizer_dir).is_dir() else None
    if example is None:
        return ("## Prompt format\n\nThe tokenizer has no chat template: the model was trained on plain text.\n")
    system = (f" Every training example without a system turn was given the system prompt "
              f"`{config.system_prompt}`; use it at inference too.") if config.system_prompt else ""
    return ("## Prompt format\n\nThe tokenizer carries the chat template used in training, "
            f"so `apply_chat_template` produces the right format.{system} A conversation renders as:\n\n"
            f"```text\n{example.rstrip()}\n```\n")


def _export_section(run_dir: Path) -> str:
    from .export import card_section  # the GGUF export owns its report; "" when the run has none

    return card_section(run_dir)


def _files_section(kind: CardKind, loss_curve: str | None, with_gguf: bool) -> str:
    weights = ("`adapter_model.safetensors` + `adapter_config.json`: the PEFT adapter"
               if kind == "adapter" else "`*.safetensors` + `config.json` + `generation_config.json`: the model")
    return ("## Files\n\n"
            f"- {weights}\n"
            "- tokenizer files, with the chat template\n"
            f"- `{CONFIG_FILE}`: the resolved training configuration\n"
            f"- `{RESULTS_FILE}`: final metrics, library versions\n"
            + (f"- `{loss_curve}`: the loss curve above\n" if loss_curve else "")
            + ("- the `.gguf` file and its Ollama `Modelfile`: the GGUF export above\n" if with_gguf else ""))


def _versions_section(results: dict) -> str:
    versions = results.get("versions") or {}
    if not versions:
        return ""
    return "## Framework versions\n\n" + "\n".join(f"- {k}: {v}" for k, v in versions.items()) + "\n"
