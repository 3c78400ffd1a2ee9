"""`train(config, observer) -> RunResult`: TRL SFTTrainer + PEFT, writing a self-describing run folder.

setup (folder, model, data) → train (with metrics, stop and early stopping) → finish (save, test, results).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .distributed import (
    ShardRecorder,
    allow_training_wrap,
    any_process,
    debug_shards_enabled,
    is_main_process,
    prepare_process,
    validate_launch,
)
from .errors import ConfigError, DataError
from .run_folder import RunFolder

log = logging.getLogger(__name__)

# Fields of a metrics record, in order. Missing values are null, never absent.
METRIC_FIELDS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "num_tokens", "elapsed_s")


class TrainObserver:
    """Receives each metrics record; may ask for a graceful stop. Subclass and override what you need."""

    def on_log(self, record: dict[str, Any]) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class RunResult:
    status: str                    # finished | stopped
    output_dir: Path
    final_dir: Path                # adapter/ (LoRA, QLoRA) or model/ (full)
    results: dict[str, Any] = field(default_factory=dict)
    model: Any = None              # the trained model, still in memory (for library users and tests)


# ----------------------------------------------------------------------------- run folder
def write_status(output_dir: Path, state: str, **extra: Any) -> None:
    """The run's status: what the app polls. Written by the main process only under a multi-process launcher
    (one writer per run folder)."""
    if not is_main_process():
        return
    RunFolder(output_dir).write_status({"state": state, "pid": os.getpid(), "time": time.time(), **extra})


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")  # exp(50) ≈ 5e21: report ∞ rather than overflow


def library_versions() -> dict[str, str]:
    import accelerate
    import datasets
    import peft
    import transformers
    import trl
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
                "trl": trl.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
                "datasets": datasets.__version__}
    try:
        import bitsandbytes
        versions["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # optional at run time for LoRA/full
        pass
    return versions


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


# ----------------------------------------------------------------------------- callbacks
def _make_callbacks(config: RunConfig, run: RunFolder, observer: TrainObserver, stop_flag: dict):
    from transformers import TrainerCallback

    TerminalProgress = _terminal_progress_class()

    class MetricsCallback(TrainerCallback):
        """Turns Trainer logs into the run's metrics records and feeds the observer; honours stop requests."""

        def __init__(self):
            self.t0 = time.time()
            self.num_tokens = None
            self.training = False  # evaluations before/after the loop go to the results, not the curve

        def on_train_begin(self, args, state, control, **kw):
            self.training = True

        def on_train_end(self, args, state, control, **kw):
            self.training = False

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if not self.training or not any(k in logs for k in ("loss", "eval_loss")):
                return  # the final train summary and test evaluations are reported in the results
            if "num_tokens" in logs:
                self.num_tokens = logs["num_tokens"]
            record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                      "loss": logs.get("loss"), "eval_loss": logs.get("eval_loss"),
                      "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                      "num_tokens": self.num_tokens, "elapsed_s": round(time.time() - self.t0, 3)}
            if config.stage != "sft":  # a preference stage's rewards (finetune/preference.py)
                from .preference import METRIC_FIELDS as REWARD_FIELDS

                record.update({name: logs.get(name) for name in REWARD_FIELDS})
            if state.is_world_process_zero:
                run.append_metrics(record)
                observer.on_log(record)
            self.on_step_end(args, state, control)  # a stop decided on this record takes effect at this step

        def on_step_end(self, args, state, control, **kw):
            # every process decides together: a rank that left the loop alone would leave the others waiting
            if self.training and any_process(stop_flag["stop"] or observer.should_stop()):
                stop_flag["stop"] = True
                control.should_training_stop = True
                control.should_save = True  # keep a checkpoint of where we stopped

    return [MetricsCallback(), TerminalProgress()]


def _fmt_record(r: dict[str, Any]) -> str:
    parts = [f"step {r['step']}", f"epoch {r['epoch']:.2f}"]
    for key, label, spec in (("loss", "loss", ".4f"), ("eval_loss", "eval_loss", ".4f"),
                             ("learning_rate", "lr", ".2e"), ("grad_norm", "grad_norm", ".3f")):
        if r.get(key) is not None:
            parts.append(f"{label} {r[key]:{spec}}")
    return " | ".join(parts)


def _terminal_progress_class():
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class TerminalProgress(TrainerCallback):
        """One progress bar for optimizer steps and one compact line per log (instead of raw dicts)."""

        bar = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                                dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if self.bar is not None and any(k in logs for k in ("loss", "eval_loss")):
                rec = {"step": state.global_step, "epoch": state.epoch or 0.0, **logs}
                self.bar.write(_fmt_record(rec))

        def on_train_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TerminalProgress


# ----------------------------------------------------------------------------- model
def _peft_config(config: RunConfig):
    if config.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, use_rslora=config.use_rslora,
                      use_dora=config.use_dora, bias="none", task_type="CAUSAL_LM")


def _load_model(config: RunConfig, path: str, precision: str, attention: str | None = None):
    from .models import keep_4bit_layers_trainable, load_base_model

    model = load_base_model(path, load_in_4bit=config.load_in_4bit, precision=precision,
                            revision=config.model_revision, trust_remote_code=config.trust_remote_code,
                            attn_implementation=attention)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # evaluations and the padding-free check run no-grad forwards before and between training steps
        keep_4bit_layers_trainable(model)
        # fp32 norms/embeddings and input grads so the frozen 4-bit base passes gradients to the adapters
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    return model


def _schedule(config: RunConfig, n_train: int) -> tuple[int, int, int]:
    """(total optimizer steps, eval every, save every). Default: ~5 evaluations per run, a save at each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    steps_per_epoch = max(1, math.ceil(n_train / (config.batch_size * world * config.gradient_accumulation_steps)))
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    eval_every = config.eval_steps or max(1, total // 5)
    save_every = config.save_steps or eval_every
    return total, eval_every, save_every


def sft_trainer(config: RunConfig, **kwargs):
    """Stock TRL `SFTTrainer` (`speed: off`: its collator and loss on our encoded rows), or ours: the same loss
    computed faster (finetune/speed), with the levers `config` leaves on. `kwargs` go to either unchanged."""
    if not config.speed:
        from trl import SFTTrainer

        return SFTTrainer(**kwargs)
    from .speed.fast_trainer import FastSFTTrainer

    return FastSFTTrainer(**kwargs, padding_free=config.padding_free, levers_off=config.speed_levers_off)


def _sft_args(config: RunConfig, precision: str, total_steps: int, eval_every: int, save_every: int,
              has_eval: bool):
    from trl import SFTConfig

    return SFTConfig(**_training_args(config, precision, total_steps, eval_every, save_every, has_eval),
                     max_length=config.max_seq_length, dataset_kwargs={"skip_prepare_dataset": True})


def _training_args(config: RunConfig, precision: str, total_steps: int, eval_every: int, save_every: int,
                   has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every stage shares (schedule, precision, logging, evaluation, saving)."""
    early = bool(config.early_stopping_patience) and has_eval
    return dict(
        output_dir=str(RunFolder(config.output_dir).checkpoints_dir),
        num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        activation_checkpointing=config.gradient_checkpointing,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        seed=config.seed, data_seed=config.seed,
        logging_steps=config.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval else "no", eval_steps=eval_every if has_eval else None,
        save_strategy="steps", save_steps=save_every, save_total_limit=config.save_total_limit,
        load_best_model_at_end=early, metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to=config.report_to, remove_unused_columns=False,
        # DDP: every adapter weight takes part in every forward, so skip the per-step search for unused ones
        ddp_find_unused_parameters=False if config.method != "full" else None,
        disable_tqdm=True,  # TerminalProgress draws one clean bar instead
    )


# ----------------------------------------------------------------------------- the recipe
def train(config: RunConfig, observer: TrainObserver | None = None, *, rows: list[dict] | None = None) -> RunResult:
    """Fine-tune `config.base_model` on `config.dataset` (or `rows`), writing everything to `config.output_dir`."""
    observer = observer or TrainObserver()
    prepare_process()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_status(out, "running")
    # SIGTERM (the app's Stop) = graceful stop, from now until the run is written: a stop during the final
    # save or evaluation lets them finish instead of killing the process halfway through writing the adapter
    stop_flag = {"stop": False}
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals can only be set there
    previous = signal.signal(signal.SIGTERM, lambda *_: stop_flag.update(stop=True)) if in_main_thread else None
    try:
        return _train(config, observer, out, rows, stop_flag)
    except BaseException as e:
        # out of memory / disk full become errors for people, with what to change (and no traceback in the CLI)
        from .models import resource_error

        friendly = resource_error(e, config, out)
        state = "stopped" if isinstance(e, KeyboardInterrupt) else "failed"
        try:
            write_status(out, state, error=str(friendly or e) or type(e).__name__)
        except OSError:  # the disk is full: the run manager reports the death with the log's last lines
            pass
        if friendly is not None:
            raise friendly from e
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _train(config: RunConfig, observer: TrainObserver, out: Path, rows: list[dict] | None,
           stop_flag: dict) -> RunResult:
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed

    from .data import write_split_files
    from .models import resolve_attention, resolve_precision
    from .prepare import prepare_data

    validate_launch(config)  # launcher (FSDP, DeepSpeed) + method combinations that can't work
    run = RunFolder(out)
    t_start = time.time()
    set_seed(config.seed)
    precision = resolve_precision(config.precision)
    attention = resolve_attention(config.attn_implementation, precision)

    # --- setup: data, base model source, tokenizer + template, encoded examples (as `preview` shows them)
    prepared = prepare_data(config, rows)
    source, tokenizer, data = prepared.model.source, prepared.model.tokenizer, prepared.examples
    if source.notice and is_main_process():
        log.info(source.notice)
    template_used = prepared.model.template
    pref = None  # a preference stage's rows (finetune/preference.py): they, not the answers alone, are trained on
    if config.stage != "sft":
        from . import preference

        preference.start_run(config)  # a wrong `init_from` fails now, not after the data is encoded
        pref = preference.prepare_preference_data(config, data, tokenizer)
    if is_main_process():  # every process splits the same way (seeded); one writes
        write_split_files(pref.answers if pref else data.splits, run)
        if pref:
            preference.write_preference_splits(pref, run)
    train_ds, eval_ds, test_ds = ((pref or prepared).dataset(split) for split in ("train", "validation", "test"))
    if train_ds is None:
        raise DataError(f"no training example has any answer tokens left within `max_seq_length` "
                        f"({config.max_seq_length}); raise `max_seq_length` or shorten the prompts")
    dropped_train, stats, encoding = (pref or prepared).dropped("train"), prepared.stats, prepared.report
    train_ids = [enc["input_ids"] for enc in prepared.encoded["train"]] if debug_shards_enabled() and not pref \
        else None
    del prepared  # the datasets hold the tokens now: free the Python lists before the model loads
    if is_main_process():
        run.write_config(config)  # resolved config, written before the slow part

    # --- model and trainer
    total_steps, eval_every, save_every = _schedule(config, len(train_ds))
    write_status(out, "running", total_steps=total_steps)  # lets the app draw progress and an ETA
    callbacks = _make_callbacks(config, run, observer, stop_flag)
    if pref is None:
        model = _load_model(config, source.path, precision, attention)
        args = _sft_args(config, precision, total_steps, eval_every, save_every, eval_ds is not None)
        trainer = sft_trainer(config, model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              processing_class=tokenizer, peft_config=_peft_config(config), callbacks=callbacks)
    else:  # from `init_from`'s weights when given; TRL's DPO/KTO/ORPO trainer on the encoded preference rows
        model = preference.start_model(config, _load_model(config, preference.weights_path(config, source.path),
                                                           precision, attention))
        trainer = preference.preference_trainer(
            config, model=model, data=pref, tokenizer=tokenizer, callbacks=callbacks,
            training_args=_training_args(config, precision, total_steps, eval_every, save_every, eval_ds is not None),
            peft_config=_peft_config(config) if not config.init_from else None)
    trainer.remove_callback(PrinterCallback)  # raw log dicts; TerminalProgress prints compact lines instead
    shards = None
    if debug_shards_enabled():  # diagnostic: which training rows this process batches (see finetune/distributed.py)
        shards = trainer.data_collator = ShardRecorder(trainer.data_collator, train_ids)

    # --- train: test loss before, the loop (SIGTERM = graceful stop), test loss after
    t_loop = time.time()  # what `finetune.estimate` estimates: evaluations and training, not loading
    test_before = trainer.evaluate(test_ds, metric_key_prefix="test")["test_loss"] if test_ds is not None else None
    if pref:  # preference accuracy and margin on the held-out rows, before → after
        held_out_split, held_out = preference.held_out_rows(pref)
        scores_before = preference.preference_scores(trainer.model, held_out, batch_size=config.batch_size)
    allow_training_wrap(trainer)  # else an evaluation before train() leaves DDP processes training unsynced
    resume = _resume_path(config)
    if resume is None and not config.resume_from_checkpoint and is_main_process():
        run.clear_metrics()  # a fresh run starts a fresh curve
    early = None
    if config.early_stopping_patience and eval_ds is not None:  # only around the loop: it reads eval_loss only
        early = EarlyStoppingCallback(early_stopping_patience=config.early_stopping_patience)
        trainer.add_callback(early)
    try:
        train_out = trainer.train(resume_from_checkpoint=resume)
    finally:
        if early is not None:
            trainer.remove_callback(early)
    status = "stopped" if stop_flag["stop"] else "finished"
    if shards is not None:
        shards.write(run.data_dir)

    # --- finish: save the final (best, with early stopping) weights with the tokenizer, measure, report
    final = run.final_dir_for(config.method)
    trainer.save_model(str(final))  # every process: FSDP/DeepSpeed gather the weights; the main one writes
    if is_main_process():
        tokenizer.save_pretrained(str(final))
        if pref:
            preference.remove_reference_adapter(final)
        for leftover in ("training_args.bin", "README.md"):  # a pickle nobody needs; the Hub card is ours to write
            (final / leftover).unlink(missing_ok=True)
    eval_loss = trainer.evaluate(eval_ds)["eval_loss"] if eval_ds is not None else None
    test_after = trainer.evaluate(test_ds, metric_key_prefix="test")["test_loss"] if test_ds is not None else None
    actual_duration = time.time() - t_loop
    trainable, total_params = _param_counts(trainer.model)
    m = train_out.metrics
    results = {
        "status": status, "method": config.method, "base_model": config.base_model,
        "base_model_path": source.path, "is_demo_model": source.is_demo, "notice": source.notice,
        "chat_template": template_used, "precision": precision,
        "global_step": trainer.state.global_step, "epoch": trainer.state.epoch,
        "train_runtime": m.get("train_runtime"), "train_samples_per_second": m.get("train_samples_per_second"),
        "train_steps_per_second": m.get("train_steps_per_second"), "train_loss": m.get("train_loss"),
        "train_perplexity": perplexity(m.get("train_loss")),
        "eval_loss": eval_loss, "eval_perplexity": perplexity(eval_loss),
        "test_loss_before": test_before, "test_perplexity_before": perplexity(test_before),
        "test_loss_after": test_after, "test_perplexity_after": perplexity(test_after),
        "num_tokens": _last_num_tokens(run),
        "trainable_params": trainable, "total_params": total_params,
        "trainable_percent": 100.0 * trainable / total_params if total_params else 0.0,
        "peak_memory_mb": peak_memory_mb(), "wall_seconds": time.time() - t_start,
        "estimated_duration_s": (run.read_estimate() or {}).get("duration_s"), "actual_duration_s": actual_duration,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "data": {"format": data.format, "source": str(data.source), "dataset_source": _dataset_source(config, rows),
                 "rows": {k: len(getattr(data.splits, k)) for k in ("train", "validation", "test")},
                 "duplicates_removed": data.splits.duplicates_removed,
                 "skipped": [{"row": s.row, "reason": s.reason} for s in data.skipped],
                 "dropped_without_answer_tokens": dropped_train, "token_stats": stats,
                 "encoding": encoding},
        "versions": library_versions(),
    }
    if pref:
        scores_after = preference.preference_scores(trainer.model, held_out, batch_size=config.batch_size)
        results.update(preference.stage_results(config, pref, scores_before, scores_after, held_out_split,
                                                _dataset_source(config, rows)))
    if is_main_process():
        run.write_results(results)
    write_status(out, status)
    return RunResult(status=status, output_dir=out, final_dir=final, results=results, model=trainer.model)


def _resume_path(config: RunConfig) -> str | None:
    """The checkpoint to resume from: `latest` is the newest complete one (a process killed while saving
    leaves a half-written checkpoint-N, which is skipped with a notice naming it)."""
    want = config.resume_from_checkpoint
    if not want:
        return None
    if want == "latest":
        run = RunFolder(config.output_dir)
        last = run.latest_complete_checkpoint()
        if last is None:
            raise ConfigError(f"`resume_from_checkpoint: latest` but {run.checkpoints_dir} holds no complete "
                              "checkpoint; start a fresh run or give a checkpoint folder")
        skipped = _newer_checkpoints(last)
        if skipped:
            log.warning("resuming from %s: skipping %s, written only in part (no complete trainer_state.json; "
                        "the run was likely stopped while saving it)", last.name, ", ".join(skipped))
        return str(last)
    if not (Path(want) / "trainer_state.json").is_file():
        raise ConfigError(f"`resume_from_checkpoint`: {want} is not a checkpoint folder (no trainer_state.json); "
                          "use `latest` or a folder under <output_dir>/checkpoints/")
    return want


def _newer_checkpoints(chosen: Path) -> list[str]:
    """Names of the checkpoint-N folders beside `chosen` with a higher step (the incomplete ones), oldest first."""
    step = int(chosen.name.rpartition("-")[2])
    newer = [(int(s), p.name) for p in chosen.parent.glob("checkpoint-*")
             if (s := p.name.rpartition("-")[2]).isdigit() and int(s) > step]
    return [name for _, name in sorted(newer)]


def _dataset_source(config: RunConfig, rows: list[dict] | None) -> str:
    """rows | file | hub: the model card lists a dataset only when it came from the Hub."""
    if rows is not None:
        return "rows"
    return "file" if Path(config.dataset).expanduser().exists() else "hub"


def _param_counts(model) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _last_num_tokens(run: RunFolder) -> float | None:
    return next((r["num_tokens"] for r in reversed(run.read_metrics()) if r.get("num_tokens") is not None), None)
