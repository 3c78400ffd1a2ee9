"""How long a run will take (and, on a Space, what it costs), before it starts.

    duration = train tokens / throughput + micro-batches x step cost
               + evaluation tokens / (EVAL_SPEEDUP x throughput)

The speed is measured, not guessed: `measure_throughput` trains the chosen model with the chosen settings for
MEASURE_STEPS real optimizer steps on full-length filler rows, then as many on rows an eighth as long (the first
step of each, which allocates and picks kernels, is not timed). The line through the two step times gives the
throughput (the cost of one more token) and a fixed cost per micro-batch, which dominates short examples on a small
model (RESULTS.md: the estimate against the actual duration). The app runs it in a child
process (`measure_in_child`: `python -m finetune.estimate run.yaml`) when the user presses "Estimate time", and the
result is cached per (model, method, precision, max_seq_length, batch size, gradient checkpointing, hardware) in
`<cache>/throughput.json` (`finetune.demo.default_cache_dir`): a later estimate with the same settings is instant.

Train tokens are the training split's tokens (each example capped at max_seq_length) times the epochs (or max_steps'
worth of examples); evaluation covers the periodic validation passes, the final one, and the test split before and
after training. It is one process's estimate: it leaves out loading the model and saving it, and early stopping
can end a run sooner. `results.json` records it beside the measured duration (`estimated_duration_s`,
`actual_duration_s`), so each run shows how good the estimate was.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .config import RunConfig
from .errors import FinetuneError
from .run_folder import read_json_object, write_json_atomic

MEASURE_STEPS = 4          # optimizer steps of the measurement; the first one is warm-up and not timed
EVAL_SPEEDUP = 3.0         # an evaluation (forward only) costs about a third of a training step's forward + backward
THROUGHPUT_FILE = "throughput.json"
MEASURE_TIMEOUT_S = 900    # the child process is ended after this long

# Hourly prices (US dollars) of Hugging Face Space hardware, keyed by the Space's $SPACE_HARDWARE, as listed on
# SPACE_PRICES_URL when last read (SPACE_PRICES_READ). They may change: the page is the reference.
# Free hardware is 0.0; hardware missing here gets no cost line.
SPACE_PRICES_URL = "https://huggingface.co/docs/hub/spaces-gpus"
SPACE_PRICES_READ = "2026-11-29"
SPACE_PRICES_USD_PER_HOUR = {
    "cpu-basic": 0.0, "cpu-upgrade": 0.03,
    "t4-small": 0.40, "t4-medium": 0.60,
    "l4x1": 0.80, "l4x4": 3.80,
    "l40sx1": 1.80, "l40sx4": 8.30, "l40sx8": 23.50,
    "a10g-small": 1.00, "a10g-large": 1.50, "a10g-largex2": 3.00, "a10g-largex4": 5.00,
    "a100-large": 4.00,
}


__all__ = ["DurationEstimate", "SPACE_PRICES_READ", "SPACE_PRICES_URL", "SPACE_PRICES_USD_PER_HOUR", "Speed",
           "cached_step_s", "cached_throughput", "duration_text", "estimate_duration", "hardware_name", "mean_tokens",
           "measure_in_child", "measure_throughput", "save_throughput", "space_cost", "throughput_key"]


# ============================================================================ the estimate

@dataclass(frozen=True)
class DurationEstimate:
    train_tokens: int
    eval_tokens: int
    tokens_per_s: float     # measured training throughput on this hardware (the cost of one more token)
    micro_batches: int = 0  # the training's micro-batches
    step_s: float = 0.0     # measured fixed cost of a micro-batch (optimizer step, kernel launches, Python)

    @property
    def train_s(self) -> float:
        return self.train_tokens / self.tokens_per_s + self.micro_batches * self.step_s

    @property
    def eval_s(self) -> float:
        return self.eval_tokens / (EVAL_SPEEDUP * self.tokens_per_s)

    @property
    def total_s(self) -> float:
        return self.train_s + self.eval_s


def duration_text(seconds: float) -> str:
    """A duration for people, rounded as an estimate deserves: "40 s", "12 min", "2 h 05 min"."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"


def mean_tokens(lengths: list[int], max_seq_length: int) -> float:
    """Mean tokens per example once each is cut at `max_seq_length` (0 for no examples)."""
    return statistics.fmean(min(n, max_seq_length) for n in lengths) if lengths else 0.0


def estimate_duration(config: RunConfig, rows: dict[str, int], tokens_per_example: float,
                      tokens_per_s: float, step_s: float = 0.0) -> DurationEstimate:
    """The duration of training `config` on splits of `rows` (split → examples) whose examples average
    `tokens_per_example` tokens, at `tokens_per_s` per token plus `step_s` per micro-batch (measured)."""
    from .train import _schedule  # the trainer's own step and evaluation schedule

    n_train, n_val, n_test = (int(rows.get(split) or 0) for split in ("train", "validation", "test"))
    total_steps, eval_every, _ = _schedule(config, max(n_train, 1))
    if config.max_steps > 0:
        train_examples = total_steps * config.batch_size * config.gradient_accumulation_steps
    else:
        train_examples = n_train * config.num_train_epochs
    evaluations = (total_steps // eval_every + 1) if n_val else 0  # periodic ones and the final one
    eval_examples = evaluations * n_val + 2 * n_test                 # + the test split before and after
    return DurationEstimate(train_tokens=math.ceil(train_examples * tokens_per_example),
                            eval_tokens=math.ceil(eval_examples * tokens_per_example), tokens_per_s=tokens_per_s,
                            micro_batches=math.ceil(train_examples / config.batch_size), step_s=step_s)


def space_cost(duration_s: float, environ=None) -> tuple[str, float, float] | None:
    """(hardware, US dollars per hour, US dollars for `duration_s`) on a Hugging Face Space ($SPACE_ID set) whose
    $SPACE_HARDWARE has a listed price; None elsewhere."""
    environ = os.environ if environ is None else environ
    hardware = (environ.get("SPACE_HARDWARE") or "").strip()
    if not environ.get("SPACE_ID") or hardware not in SPACE_PRICES_USD_PER_HOUR:
        return None
    price = SPACE_PRICES_USD_PER_HOUR[hardware]
    return hardware, price, price * duration_s / 3600


# ============================================================================ the throughput cache

def hardware_name() -> str:
    """What the throughput was measured on: the GPU(s), else the CPU model and the threads torch uses."""
    import torch

    if torch.cuda.is_available():
        count, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        return f"{count} x {name}" if count > 1 else name
    return f"CPU {_cpu_model()} ({torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def throughput_key(config: RunConfig, hardware: str | None = None) -> str:
    """The cache key: what the speed of a training step depends on."""
    return json.dumps([config.base_model.strip(), config.method, config.precision, config.max_seq_length,
                       config.batch_size, config.gradient_checkpointing, hardware or hardware_name()])


def _cache_file(cache_dir: str | Path | None) -> Path:
    from .demo import default_cache_dir

    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / THROUGHPUT_FILE


def cached_throughput(config: RunConfig, *, cache_dir: str | Path | None = None,
                      hardware: str | None = None) -> float | None:
    """Tokens per second measured earlier for `config`'s settings on this hardware; None if never measured."""
    value = _cached(config, "tokens_per_s", cache_dir, hardware)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def cached_step_s(config: RunConfig, *, cache_dir: str | Path | None = None, hardware: str | None = None) -> float:
    """The fixed cost of a micro-batch measured with the throughput (0.0 when none was: older measurements)."""
    value = _cached(config, "step_s", cache_dir, hardware)
    return float(value) if isinstance(value, (int, float)) and value > 0 else 0.0


def _cached(config: RunConfig, name: str, cache_dir, hardware):
    entry = (read_json_object(_cache_file(cache_dir)) or {}).get(throughput_key(config, hardware))
    return entry.get(name) if isinstance(entry, dict) else None


def save_throughput(config: RunConfig, tokens_per_s: float, *, step_s: float = 0.0,
                    cache_dir: str | Path | None = None, hardware: str | None = None) -> None:
    path = _cache_file(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = read_json_object(path) or {}
    cache[throughput_key(config, hardware)] = {"tokens_per_s": tokens_per_s, "step_s": step_s,
                                               "measured": time.time()}
    write_json_atomic(path, cache, indent=1)


# ============================================================================ measuring

@dataclass(frozen=True)
class Speed:
    """A measured training speed: seconds per micro-batch = step_s + tokens / tokens_per_s."""

    tokens_per_s: float
    step_s: float


def measure_throughput(config: RunConfig, *, steps: int = MEASURE_STEPS) -> Speed:
    """The training speed of `config`'s model and settings here: `steps` real optimizer steps (one micro-batch each)
    on full-length filler rows, then `steps` on rows an eighth as long, in that order, the first step of each
    untimed. The two step times give a cost per token and a fixed cost per micro-batch (which dominates short
    examples on a small model). Loads the model: seconds to minutes."""
    from datasets import concatenate_datasets
    from transformers import PrinterCallback, TrainerCallback

    from .models import resolve_precision
    from .prepare import prepare_data
    from .train import _load_model, _peft_config, _sft_args, sft_trainer

    if steps < 2:
        raise FinetuneError(f"measuring the speed needs at least 2 steps (got {steps}); the first is warm-up")

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()  # CUDA runs asynchronously: wait for the step to really end
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="finetune-measure-") as tmp:
        probe = _probe_config(config, tmp, 2 * steps)
        short = max(16, probe.max_seq_length // 8)
        parts = [prepare_data(probe.replace(max_seq_length=length), _filler_rows(probe.batch_size * steps, length))
                 for length in (probe.max_seq_length, short)]
        train_ds = concatenate_datasets([_first_rows(part.dataset("train"), probe.batch_size * steps)
                                         for part in parts])
        precision = resolve_precision(probe.precision)
        model = _load_model(probe, parts[0].model.source.path, precision)
        args = _sft_args(probe, precision, 2 * steps, 2 * steps, 10**9, has_eval=False)  # never saves a checkpoint
        args.train_sampling_strategy = "sequential"  # the long rows' steps first, then the short rows'
        timer = StepTimes()
        trainer = sft_trainer(probe, model=model, args=args, train_dataset=train_ds,
                              processing_class=parts[0].model.tokenizer, peft_config=_peft_config(probe),
                              callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    if len(timer.times) != 2 * steps:
        raise FinetuneError(f"measuring the speed failed: training ran {len(timer.times)} of {2 * steps} steps")
    lengths = [len(ids) for ids in train_ds["input_ids"]]
    tokens = [sum(lengths[i * probe.batch_size:(i + 1) * probe.batch_size]) for i in range(2 * steps)]
    seconds = [later - earlier for earlier, later in zip(timer.times, timer.times[1:])]  # steps 1.. (0 untimed)
    long_steps, short_steps = range(1, steps), range(steps + 1, 2 * steps)  # each part's first step untimed
    return _speed(*(statistics.fmean(tokens[i] for i in part) for part in (long_steps, short_steps)),
                  *(statistics.fmean(seconds[i - 1] for i in part) for part in (long_steps, short_steps)))


def _first_rows(dataset, n: int):
    """The first `n` rows (a filler row longer than max_seq_length gives several blocks)."""
    return dataset.select(range(min(n, len(dataset))))


def _speed(long_tokens: float, short_tokens: float, long_s: float, short_s: float) -> Speed:
    """The line through (tokens, seconds) of a long and a short step; all of it per token when the times say
    nothing more (a noisy measurement: no positive slope, or a negative fixed cost)."""
    if long_tokens > short_tokens and long_s > short_s:
        per_token = (long_s - short_s) / (long_tokens - short_tokens)
        fixed = short_s - per_token * short_tokens
        if fixed >= 0:
            return Speed(tokens_per_s=1 / per_token, step_s=fixed)
    return Speed(tokens_per_s=long_tokens / long_s, step_s=0.0)


def _probe_config(config: RunConfig, folder: str, steps: int) -> RunConfig:
    """`config` as a measurement: text rows, no splits to evaluate, `steps` steps of one micro-batch, in `folder`."""
    return config.replace(dataset="", data_format="text", column_mapping={}, skip_invalid=False, max_rows=None,
                          eval_fraction=0.0, test_fraction=0.0, max_steps=steps, gradient_accumulation_steps=1,
                          warmup_ratio=0.0, logging_steps=steps, eval_steps=None, save_steps=None,
                          early_stopping_patience=None, resume_from_checkpoint=None, output_dir=folder)


def _filler_rows(n: int, max_seq_length: int) -> list[dict]:
    """`n` distinct rows of real text, each long enough to fill `max_seq_length` tokens with any tokenizer
    (at least 8 characters per token; a token is rarely longer)."""
    from .demo import CORPUS_PATH

    corpus = " ".join(CORPUS_PATH.read_text(encoding="utf-8").split())
    need = 8 * max_seq_length
    text = (corpus * (need // len(corpus) + 2))
    return [{"text": f"{i}: " + text[i * 97:i * 97 + need]} for i in range(n)]


def measure_in_child(config: RunConfig, *, cache_dir: str | Path | None = None, python: str = sys.executable,
                     timeout_s: float = MEASURE_TIMEOUT_S) -> float:
    """`measure_throughput` in a child process (a crash or out-of-memory can't take the caller down); caches and
    returns the tokens per second, or raises a FinetuneError with the child's last words."""
    with tempfile.TemporaryDirectory(prefix="finetune-measure-") as tmp:
        path = Path(tmp) / "run.yaml"
        config.replace(output_dir=tmp).to_yaml(path)
        try:
            done = subprocess.run([python, "-m", "finetune.estimate", str(path)], capture_output=True, text=True,
                                  timeout=timeout_s, cwd=Path(__file__).resolve().parents[1],
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        except subprocess.TimeoutExpired:
            raise FinetuneError(f"measuring the speed took over {timeout_s / 60:.0f} minutes and was stopped; a "
                                "smaller batch or max_seq_length measures sooner") from None
    answer = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not answer:
        said = [line for line in done.stderr.splitlines() if line.startswith("error: ")]  # main's last words
        last = said or [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["no output"]
        raise FinetuneError(f"measuring the speed failed: {last[-1]}")
    measured = json.loads(answer[-1])
    tokens_per_s = float(measured["tokens_per_s"])
    save_throughput(config, tokens_per_s, step_s=float(measured.get("step_s", 0.0)), cache_dir=cache_dir)
    return tokens_per_s


def main(argv: list[str]) -> int:
    """`python -m finetune.estimate run.yaml`: print {"tokens_per_s": ..., "step_s": ...} for the config's model and
    settings."""
    if len(argv) != 1:
        print("usage: python -m finetune.estimate run.yaml", file=sys.stderr)
        return 2
    try:
        speed = measure_throughput(RunConfig.from_yaml(argv[0]))
    except FinetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # what training itself would hit with these settings: the traceback, then one line
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"error: training with these settings failed ({type(e).__name__}: {first})", file=sys.stderr)
        return 1
    print(json.dumps({"tokens_per_s": speed.tokens_per_s, "step_s": speed.step_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

