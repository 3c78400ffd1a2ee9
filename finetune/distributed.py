"""Data-parallel runs under `torchrun` or `accelerate launch`: which process is the main one, what the
launcher asked for, and the launcher + method combinations we refuse up front.

The launcher starts one `python -m finetune train CONFIG.yaml` per device and describes the job in
environment variables (RANK, WORLD_SIZE, LOCAL_RANK from torchrun; ACCELERATE_USE_FSDP, FSDP_*,
ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_* from `accelerate launch --config_file ...`). Every
process runs the same recipe; only the main process (global rank 0) writes the run folder and prints.

Diagnostics: with `FINETUNE_DEBUG_SHARDS=1` every process writes `data/rank{R}_seen.json`, the lines
of `data/train.jsonl` (0-based) that its data loader batched, in order. The loader fetches one batch
ahead, so the last batch listed may not have been trained on. Off by default.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch

from .errors import ConfigError

DEBUG_SHARDS_ENV = "FINETUNE_DEBUG_SHARDS"
Engine = Literal["ddp", "fsdp", "deepspeed"]


# ----------------------------------------------------------------------------- ranks
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank: 0..world_size-1 across all nodes."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """Rank on this node: the index of the GPU this process drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def prepare_process() -> None:
    """Call first thing in every process. Pins this process to its own GPU (so that models loaded before the
    Trainer exists land on cuda:LOCAL_RANK, not all on cuda:0) and silences library logs and progress bars
    on the other ranks, so that one person reads one log."""
    if world_size() > 1 and torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if not is_main_process():
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.utils.logging.disable_progress_bar()


def finish_process() -> None:
    """Tear the process group down before exit: gloo's worker threads still running when Python exits
    abort the process ("terminate called without an active exception"), failing a finished run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any of them (a MAX all-reduce; every process must call it
    at the same point). Used for stop requests: a SIGTERM or an observer may reach one rank a step earlier
    than another, and ranks that leave the loop at different steps wait for each other forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    on_gpu = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    t = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- what the launcher asked for
@dataclass(frozen=True)
class LaunchSettings:
    world_size: int
    engine: Engine                       # ddp also for a single process: nothing is sharded
    fsdp_version: int | None = None      # 1 or 2 (FSDP only)
    fsdp_state_dict_type: str | None = None  # FULL_STATE_DICT | SHARDED_STATE_DICT | LOCAL_STATE_DICT
    zero_stage: int | None = None        # DeepSpeed ZeRO stage 0-3
    zero3_save_16bit_model: bool | None = None  # ZeRO-3 gathers full weights on save


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def launch_settings(env: Mapping[str, str] | None = None) -> LaunchSettings:
    """Read the launcher's choices from the environment (`accelerate launch` exports its config file as env)."""
    env = os.environ if env is None else env
    size = int(env.get("WORLD_SIZE", "1"))
    if _true(env.get("ACCELERATE_USE_FSDP")):
        version = int(env.get("FSDP_VERSION", "1"))
        # Accelerate's default when the config names none: full for FSDP1, sharded for FSDP2
        state_dict = env.get("FSDP_STATE_DICT_TYPE") or ("FULL_STATE_DICT" if version == 1 else "SHARDED_STATE_DICT")
        return LaunchSettings(size, "fsdp", fsdp_version=version, fsdp_state_dict_type=state_dict.upper())
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage, save16 = _deepspeed_stage(env)
        return LaunchSettings(size, "deepspeed", zero_stage=stage, zero3_save_16bit_model=save16)
    return LaunchSettings(size, "ddp")


def _deepspeed_stage(env: Mapping[str, str]) -> tuple[int, bool]:
    """(ZeRO stage, gather 16-bit weights on save) from a DeepSpeed JSON config if one is given, else the env."""
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and ds_file != "none":
        try:
            zero = json.loads(Path(ds_file).read_text(encoding="utf-8")).get("zero_optimization", {})
        except (OSError, ValueError) as e:
            raise ConfigError(f"DeepSpeed config {ds_file}: can't read it as JSON ({e}); fix the file or drop "
                              "`deepspeed_config_file` from the accelerate config") from None
        return int(zero.get("stage", 0)), _true(zero.get("stage3_gather_16bit_weights_on_model_save"))
    # Accelerate's own defaults when the variables are absent: stage 2, no 16-bit gather
    return (int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")),
            _true(env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")))


# ----------------------------------------------------------------------------- combinations that can't work
def validate_launch(config, settings: LaunchSettings | None = None, *, cuda_available: bool | None = None) -> None:
    """Raise ConfigError, before anything is loaded, for launcher + config combinations that would fail late or
    silently save nothing. `config` is a RunConfig."""
    settings = settings or launch_settings()
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if settings.engine == "ddp":
        return
    name = "FSDP" if settings.engine == "fsdp" else "DeepSpeed"
    if not cuda:
        raise ConfigError(f"{name} needs CUDA GPUs and none is visible; on CPU run plain data parallel instead: "
                          "`torchrun --nproc_per_node N -m finetune train CONFIG.yaml`, or launch with "
                          "examples/accelerate/ddp.yaml")
    if settings.engine == "fsdp":
        _validate_fsdp(config, settings)
    else:
        _validate_deepspeed(config, settings)


def _validate_fsdp(config, settings: LaunchSettings) -> None:
    if config.method == "qlora":
        # FSDP1 flattens parameters of one dtype only; FSDP2 leaves uint8 4-bit weights unsharded (a full copy
        # per GPU). Both need bnb_4bit_quant_storage = the compute dtype, and we store 4-bit weights as uint8.
        raise ConfigError("`method: qlora` can't be sharded with FSDP here: FSDP needs the 4-bit weights stored "
                          "in the compute dtype (bnb_4bit_quant_storage=bfloat16) and this tool stores them as "
                          "uint8. Use `method: lora` with FSDP, or QLoRA with plain data parallel "
                          "(examples/accelerate/ddp.yaml) or DeepSpeed ZeRO-2 "
                          "(examples/accelerate/deepspeed_zero2.yaml)")
    if settings.fsdp_state_dict_type != "FULL_STATE_DICT":
        raise ConfigError(f"FSDP `fsdp_state_dict_type: {settings.fsdp_state_dict_type}` would leave the final "
                          f"{'model' if config.method == 'full' else 'adapter'}/ folder empty (the Trainer saves "
                          "only full state dicts as safetensors); set `fsdp_state_dict_type: FULL_STATE_DICT` in "
                          "the accelerate config, as in examples/accelerate/fsdp.yaml")


def _validate_deepspeed(config, settings: LaunchSettings) -> None:
    if settings.zero_stage == 3 and config.method == "qlora":
        raise ConfigError("`method: qlora` with DeepSpeed ZeRO-3: ZeRO-3 partitions every weight and needs the "
                          "4-bit weights stored in the compute dtype (bnb_4bit_quant_storage=bfloat16) and "
                          "`zero3_init_flag: true`; this tool stores them as uint8. Use ZeRO-2 "
                          "(examples/accelerate/deepspeed_zero2.yaml) for QLoRA, or `method: lora` with ZeRO-3")
    if settings.zero_stage == 3 and not settings.zero3_save_16bit_model:
        raise ConfigError("DeepSpeed ZeRO-3 without `zero3_save_16bit_model: true` saves a sharded DeepSpeed "
                          "checkpoint instead of the final adapter/ or model/ weights; set it in the accelerate "
                          "config (or `stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed JSON), "
                          "as in examples/accelerate/deepspeed_zero3.yaml")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("the accelerate config asks for DeepSpeed but it is not installed; `pip install "
                          "deepspeed` (needs the CUDA toolkit), or launch with examples/accelerate/ddp.yaml or "
                          "examples/accelerate/fsdp.yaml")


# ----------------------------------------------------------------------------- shard diagnostics
def debug_shards_enabled() -> bool:
    return _true(os.environ.get(DEBUG_SHARDS_ENV))


class ShardRecorder:
    """Wraps the data collator and notes which training examples this process batches (`FINETUNE_DEBUG_SHARDS`).

    Examples are recognised by their token ids, so a collated row is named by its line in data/train.jsonl.
    Validation and test rows (disjoint from training after de-duplication) are not in the map and are ignored.
    """

    def __init__(self, collator: Callable, train_input_ids: list[list[int]]):
        self.collator = collator
        self.line_of = {tuple(ids): line for line, ids in enumerate(train_input_ids)}
        self.seen: list[int] = []

    def __call__(self, features: list[dict[str, Any]]):
        for f in features:
            line = self.line_of.get(tuple(f["input_ids"]))
            if line is not None:
                self.seen.append(line)
        return self.collator(features)

    def write(self, data_dir: Path) -> Path:
        """data/rank{R}_seen.json: {rank, world_size, seen: [train.jsonl line, ...] in batch order}."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / f"rank{rank()}_seen.json"
        path.write_text(json.dumps({"rank": rank(), "world_size": world_size(), "seen": self.seen}), encoding="utf-8")
        return path


def allow_training_wrap(trainer) -> None:
    """Call after a `trainer.evaluate()` that runs before `trainer.train()`.

    Evaluating first makes Accelerate prepare the bare model in evaluation mode and mark it
    `_is_accelerate_prepared`; `train()` then skips the DistributedDataParallel wrap ("can't double wrap") and
    every process trains alone, without syncing gradients (accelerate 1.15, transformers 5.23: measured here
    under torchrun as a different grad_norm from step 1). Clearing the mark lets `train()` wrap it. Models that
    evaluation did wrap (FSDP, DeepSpeed) are left alone.
    """
    model = trainer.model
    if trainer.model_wrapped is model and getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
