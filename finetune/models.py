"""Load the base model and tokenizer: full precision or 4-bit NF4 (QLoRA), with the demo fallback.

`resolve_base_model` decides WHERE the weights come from (local folder, Hub id, or the offline
demo model); `load_base_model` decides HOW they are loaded (dtype, quantisation).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import DEMO_MODEL_ID, FLASH_ATTENTION, RunConfig
from .errors import ConfigError, DiskFull, FinetuneError, ModelError, OutOfMemory

# `name` or `org/name`: anything else that doesn't exist on disk is a mistyped local path (one definition).
from .hub import MODEL_ID as HUB_ID

log = logging.getLogger(__name__)

# Shown by the CLI and the app whenever `trust_remote_code` is on (it is off unless the user turns it on).
TRUST_REMOTE_CODE_WARNING = ("`trust_remote_code` is on: Python files shipped inside the model repo will run on this "
                             "machine with your permissions. Only use it for repos you trust, pinned with "
                             "`model_revision` to a commit you have read.")



@dataclass
class BaseModelSource:
    path: str            # what to pass to from_pretrained: a local folder or a Hub id
    is_demo: bool        # the tiny offline demo model
    notice: str | None   # shown to the user when we fell back or changed something


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the Hub endpoint: avoids the client's ~25 s of retries when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _in_local_cache(model_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(model_id, "config.json", revision=revision)
    return isinstance(hit, str)


def resolve_base_model(config: RunConfig, progress=None) -> BaseModelSource:
    """Where the base weights come from: a local folder, a Hub id downloaded (with progress) into the Hub
    cache, or, offline and uncached, the demo model if `offline_fallback` allows."""
    from .demo import DEMO_LABEL, demo_model_path
    from .hub import resolve_model_source

    name = config.base_model.strip()
    if name == DEMO_MODEL_ID:
        return BaseModelSource(str(demo_model_path()), True, f"Using the {DEMO_LABEL}.")
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"`base_model` folder {path} has no config.json; point it at a folder saved with "
                             "`save_pretrained` (or use a Hub id, or `demo`)")
        return BaseModelSource(str(path), False, None)
    if not HUB_ID.fullmatch(name):
        raise ModelError(f"`base_model` folder not found: {name}; check the path, or give a Hub id such as "
                         "`HuggingFaceTB/SmolLM2-135M-Instruct`, or `demo`")
    if _in_local_cache(name, config.model_revision) or hub_reachable():
        # clear errors for a missing repo, a gated one or a bad revision come from here, before any weights load
        folder = resolve_model_source(name, revision=config.model_revision, progress=progress)
        return BaseModelSource(str(folder), False, None)
    if config.offline_fallback:
        notice = (f"The Hugging Face Hub can't be reached and `{name}` is not in the local cache; "
                  f"using the {DEMO_LABEL} instead. Set `offline_fallback: false` to fail instead.")
        log.warning(notice)
        return BaseModelSource(str(demo_model_path()), True, notice)
    raise ModelError(f"can't reach the Hugging Face Hub to download `{name}`, and it is not in the local cache; "
                     "check your connection, or use `base_model: demo` to try the offline demo model")


def resolve_precision(precision: str) -> str:
    """`auto` → bf16 where the hardware has it (CUDA or a bf16 CPU), fp16 on older CUDA, else fp32.

    Emulated bf16 doesn't count: torch reports bf16 on a pre-Ampere GPU (a T4) by default because a bf16 tensor can
    be created there, but it has no native bf16 arithmetic (compute capability below 8.0)."""
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("`precision: fp16` needs a CUDA GPU; on CPU use `bf16` or `fp32` (or `auto`)")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if _cpu_has_bf16():
        return "bf16"
    return "fp32"


def _cpu_has_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None) or getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check and check())
    except Exception:  # older builds lack the probe: be conservative
        return False


def resolve_attention(choice: str, precision: str) -> str | None:
    """The `attn_implementation` to load the model with (`choice` from the config, `precision` resolved); None
    leaves transformers' default (sdpa where the model has it, else eager).

    `auto` picks FlashAttention-2 on CUDA when transformers can use the flash-attn package and the precision is one
    its kernels take: padding-free batches then run its varlen kernel (from `position_ids`) instead of a packed
    mask. A flash kernel asked for without a CUDA GPU fails here, before any data or weights load.
    """
    from transformers.utils import is_flash_attn_2_available

    if choice in FLASH_ATTENTION and not torch.cuda.is_available():
        raise ConfigError(f"`attn_implementation: {choice}` needs a CUDA GPU and none is visible; on CPU use "
                          "`attn_implementation: auto` (or `sdpa`, `eager`)")
    if choice != "auto":
        return choice
    if torch.cuda.is_available() and precision in ("bf16", "fp16") and is_flash_attn_2_available():
        log.warning("`attn_implementation: auto` → flash_attention_2 (CUDA GPU, flash-attn installed, %s); set "
                    "`attn_implementation: sdpa` for transformers' default", precision)
        return "flash_attention_2"
    return None


def compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_tokenizer(path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as e:  # reworded for people below
        raise ModelError(_load_failure("tokenizer", path, e)) from None
    if tok.pad_token is None:  # batching needs a pad token; its positions never carry loss
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(path: str, *, load_in_4bit: bool = False, precision: str = "fp32",
                    revision: str | None = None, trust_remote_code: bool = False,
                    attn_implementation: str | None = None):
    """Weights stay fp32 for LoRA/full on CPU (autocast does bf16 math); 4-bit NF4 + double quant for QLoRA.
    `attn_implementation`: from `resolve_attention` (None: transformers' default)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(precision), bnb_4bit_quant_storage=torch.uint8)
        kwargs["dtype"] = compute_dtype(precision)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    else:
        # On CUDA, keep weights in the half type to halve memory; on CPU fp32 masters + autocast are faster & exact.
        kwargs["dtype"] = compute_dtype(precision) if torch.cuda.is_available() else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        raise ModelError(_load_failure("model", path, e)) from None
    if torch.cuda.is_available() and not load_in_4bit:
        model.to("cuda")
    return model


def keep_4bit_layers_trainable(model) -> None:
    """Stop bitsandbytes repacking the 4-bit weights of a model that will be trained; call it before any forward.

    On a CPU with AVX512-bf16, a `Linear4bit` in eval mode with an input that needs no gradient (any evaluation, the
    padding-free check) repacks its weight for good into an inference layout whose matmul has no autograd: training
    after it passes no gradient back through the frozen 4-bit layers (or fails on a layer with a bias). Undoing the
    repack is lossy (its block scales are stored in bf16), so the repack must not happen at all.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the one switch bitsandbytes reads before it repacks


# ----------------------------------------------------------------------------- running out of memory or disk
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, quota exceeded, file size limit
_OOM_TEXT = ("out of memory", "can't allocate memory", "cannot allocate memory")


def resource_error(exc: BaseException, config: RunConfig, folder: Path) -> FinetuneError | None:
    """`OutOfMemory` or `DiskFull` for an exception that means one of them (None for anything else), with
    concrete next steps for this run's `config`; `folder` is the run folder being written."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
            isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)):
        return OutOfMemory(out_of_memory_message(config, on_gpu=torch.cuda.is_available()))
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return DiskFull(disk_full_message(exc, folder))
    return None


def out_of_memory_message(config: RunConfig, *, on_gpu: bool) -> str:
    where = "GPU" if on_gpu else "CPU RAM"
    tips = []
    if config.batch_size > 1:
        tips.append(f"a smaller `batch_size` ({config.batch_size} → {max(1, config.batch_size // 2)}; double "
                    "`gradient_accumulation_steps` to keep the effective batch)")
    if config.max_seq_length > 256:
        tips.append(f"a shorter `max_seq_length` ({config.max_seq_length} → {config.max_seq_length // 2})")
    if config.method != "qlora":
        tips.append("`method: qlora` (a 4-bit base needs about a quarter of the weight memory)")
    if not config.gradient_checkpointing:
        tips.append("`gradient_checkpointing: true` (recomputes activations: less memory, ~30% slower)")
    advice = "; ".join(tips) if tips else "a smaller base model"
    return f"training ran out of memory ({where}). Try: {advice}"


def disk_full_message(exc: OSError, folder: Path) -> str:
    try:
        free = f"; {shutil.disk_usage(folder).free / 1e9:.2f} GB free there now"
    except OSError:
        free = ""
    what = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return (f"the disk is full: writing to {folder} failed ({what}{free}). Free space there (delete old runs or "
            "checkpoints), lower `save_total_limit`, or set `output_dir` on a bigger disk")


def _load_failure(what: str, path: str, exc: Exception) -> str:
    try:
        from .hub import hub_error_message  # distinct messages for not found / gated / offline / revision
        msg = hub_error_message(exc, what, path)
        if msg:
            return msg
    except ImportError:
        pass
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"could not load the {what} from `{path}`: {first}"
