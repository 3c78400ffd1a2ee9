"""How much memory a run needs, against what the device has: a rough estimate shown before Start.

The estimate adds four parts (all in bytes):

    weights       n_params x bytes per weight: 4 (fp32), 2 (bf16/fp16), ~0.55 (4-bit NF4 + double-quant
                  scales + the layers bitsandbytes leaves unquantised); LoRA on a bf16 CPU: 2 for the frozen
                  linear weights (stored in bf16 while training), 4 for the embeddings
    training      per trainable parameter: fp32 gradient (4) + AdamW's two moments (8), plus an fp32
                  master copy (4) when weights are kept in half precision for full fine-tuning
    activations   per layer ~34 x batch x seq x hidden bytes in half precision (Korthikanti et al.,
                  2022, with fused attention), ~2 x ... with gradient checkpointing (only each layer's
                  input is kept, and one layer is recomputed at a time); plus fp32 logits and their
                  gradient: 2 x 4 x batch x seq x vocab
    overhead      CUDA context and allocator slack (~1 GiB on GPU, ~0.5 GiB on CPU)

It is meant to catch runs that clearly can't fit (an 8B full fine-tune on a 24 GB card), not to
predict the peak to the megabyte: real use depends on kernels, fragmentation and sequence packing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import DEMO_MODEL_ID, RunConfig

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int


# Shapes of the models the app offers, so the estimate works offline (from each model's config.json).
KNOWN_MODELS: dict[str, ModelShape] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(134_515_008, 576, 30, 1536, 49152),
    "HuggingFaceTB/SmolLM2-360M-Instruct": ModelShape(361_821_120, 960, 32, 2560, 49152),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": ModelShape(1_711_376_384, 2048, 24, 8192, 49152),
    "Qwen/Qwen2.5-0.5B-Instruct": ModelShape(494_032_768, 896, 24, 4864, 151936),
    "Qwen/Qwen2.5-1.5B-Instruct": ModelShape(1_543_714_304, 1536, 28, 8960, 151936),
    "meta-llama/Llama-3.2-1B-Instruct": ModelShape(1_235_814_400, 2048, 16, 8192, 128256),
    "meta-llama/Llama-3.2-3B-Instruct": ModelShape(3_212_749_824, 3072, 28, 8192, 128256),
    "meta-llama/Llama-3.1-8B-Instruct": ModelShape(8_030_261_248, 4096, 32, 14336, 128256),
    "mistralai/Mistral-7B-Instruct-v0.3": ModelShape(7_248_023_552, 4096, 32, 14336, 32768),
}


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int          # bytes
    training: int         # bytes: gradients + optimizer state (+ fp32 master weights)
    activations: int      # bytes
    overhead: int         # bytes
    trainable_params: int

    @property
    def total(self) -> int:
        return self.weights + self.training + self.activations + self.overhead


def lora_params(shape: ModelShape, r: int) -> int:
    """LoRA parameters on every linear layer of a Llama-style block: r x (in + out) per projection.

    q, k, v, o take hidden → hidden (k, v are smaller with grouped-query attention; counted as full
    size, a slight overestimate); gate and up take hidden → intermediate, down the reverse.
    """
    h, i = shape.hidden_size, shape.intermediate_size
    per_layer = r * (4 * 2 * h + 3 * (h + i))
    return per_layer * shape.num_layers


def estimate_memory(config: RunConfig, shape: ModelShape, *, on_gpu: bool = True) -> MemoryEstimate:
    """Bytes a training run of `config` on a model of `shape` needs, split into parts (see the module doc)."""
    half = on_gpu and config.precision != "fp32"  # on CPU the trainer keeps fp32 weights (autocast for math)
    n = shape.n_params
    if config.method == "qlora":
        weights = int(n * 0.55)
    elif config.method == "lora" and not half and _cpu_autocasts(config.precision):
        # LoRA under bf16 autocast on CPU: the frozen linear weights are stored in bf16 while training
        # (finetune.speed.fast_trainer.frozen_linears_stored_in); the embeddings and norms stay fp32
        embeddings = shape.vocab_size * shape.hidden_size
        weights = embeddings * 4 + (n - embeddings) * 2
    else:
        weights = n * (2 if half else 4)
    if config.method == "full":
        trainable = n
        training = n * (4 + 8 + (4 if half else 0))
    else:
        trainable = lora_params(shape, config.lora_r)
        training = trainable * (4 + 4 + 8)  # fp32 adapter weights + gradient + AdamW moments
    tokens = config.batch_size * config.max_seq_length
    act_bytes = 2 if half or config.method == "qlora" else 4
    per_layer = (2 if config.gradient_checkpointing else 34 / 2) * act_bytes * tokens * shape.hidden_size
    activations = int(per_layer * shape.num_layers + 2 * 4 * tokens * shape.vocab_size)
    if config.gradient_checkpointing:  # one layer's full activations exist while it is recomputed
        activations += int(34 / 2 * act_bytes * tokens * shape.hidden_size)
    overhead = GIB if on_gpu else GIB // 2
    return MemoryEstimate(weights=weights, training=training, activations=activations, overhead=overhead,
                          trainable_params=trainable)


def _cpu_autocasts(precision: str) -> bool:
    """Whether training on this CPU runs under bf16 autocast (`precision` bf16, or auto on a bf16 CPU)."""
    if precision == "bf16":
        return True
    if precision != "auto":
        return False
    from .models import _cpu_has_bf16

    return _cpu_has_bf16()


def model_shape(base_model: str) -> ModelShape | None:
    """The shape of a known model, the demo model, or a local / cached model folder's config.json; None if unknown."""
    name = base_model.strip()
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    config_file = None
    if name == DEMO_MODEL_ID:
        from .demo import demo_model_path

        config_file = demo_model_path() / "config.json"
    elif (Path(name).expanduser() / "config.json").is_file():
        config_file = Path(name).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "config.json")
            config_file = Path(hit) if isinstance(hit, str) else None
        except Exception:  # a malformed id: unknown shape
            config_file = None
    return _shape_from_config(config_file) if config_file else None


def _shape_from_config(path: Path) -> ModelShape | None:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        h, layers = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        inter, vocab = int(cfg.get("intermediate_size", 4 * h)), int(cfg["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # Llama-style count: embeddings (tied or not) + per layer 4 h^2 attention + 3 h x i MLP + norms.
    tied = cfg.get("tie_word_embeddings", True)
    n = vocab * h * (1 if tied else 2) + layers * (4 * h * h + 3 * h * inter + 2 * h) + h
    return ModelShape(n, h, layers, inter, vocab)


def available_memory() -> tuple[str, int, bool]:
    """(device description, bytes free for training, is a GPU): the first CUDA GPU, else system RAM."""
    try:
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return f"GPU {torch.cuda.get_device_name(0)}", int(free), True
    except Exception:  # no usable CUDA: fall back to RAM
        pass
    import psutil

    return "CPU RAM", int(psutil.virtual_memory().available), False


def fits(estimate: MemoryEstimate, available: int) -> bool:
    return estimate.total <= available


def shortfall(estimate: MemoryEstimate, device: str, available: int) -> str | None:
    """Why the run won't fit, for people: which memory, how much the estimate needs and how much is free.

    None when it fits. This is the only reason to refuse a run before it starts: every method runs on
    every device here (QLoRA's 4-bit layers included: bitsandbytes has CPU kernels).
    """
    if fits(estimate, available):
        return None
    return (f"this run needs about {format_size(estimate.total)} and {device} has {format_size(available)} free "
            f"({format_size(estimate.total - available)} short)")


def format_size(n_bytes: float) -> str:
    """`1.5 GiB` from 1 GiB up, `548 MiB` from 10 MiB, `2.4 MiB` from 1 MiB, else `300 KiB` (a tiny model's 4-bit
    weights are not "0 MiB")."""
    if n_bytes >= GIB:
        return f"{n_bytes / GIB:.1f} GiB"
    if n_bytes >= 10 * 2**20:
        return f"{n_bytes / 2**20:.0f} MiB"
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MiB"
    return f"{n_bytes / 2**10:.0f} KiB"


__all__ = ["KNOWN_MODELS", "MemoryEstimate", "ModelShape", "available_memory", "estimate_memory", "fits",
           "format_size", "lora_params", "model_shape", "shortfall"]
