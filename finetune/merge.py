"""Merge a LoRA/QLoRA adapter into its base model → a standalone model folder, with a logit check.

The base is always loaded unquantised (fp32 on CPU, the requested 16/32-bit type on CUDA), even for
a QLoRA run: merging into 4-bit weights would round the update away and give a model that can't be
saved in a standard format. Loading the base unquantised means the merged model is (base + adapter)
exactly; it differs from what QLoRA trained (4-bit base + adapter) only by the base's quantisation
error, which is the point: the merged model is the better of the two.

The check compares, on a few fixed token sequences, the logits of the merged model (in the saved
dtype) with those of the unmerged base + adapter; `MergeReport.max_abs_logit_diff` is the largest
absolute difference (≈1e-6 in fp32; bf16/fp16 add their rounding).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelError
from .inference import attach_adapter, locate_run, stop_token_ids

MERGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BNB_FORMATS = ("4bit", "8bit")  # bitsandbytes: NF4 with double quantisation, or LLM.int8()

# Fixed text for the logit check: prose, code and digits exercise a spread of tokens.
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # 1 + 2 = 3",
    "Fine-tuning adapts a pretrained language model to a task with a small dataset.",
)


@dataclass
class MergeReport:
    out_dir: Path
    max_abs_logit_diff: float | None  # merged vs base + adapter on CHECK_TEXTS; None when check=False
    dtype: str                        # fp32 | bf16 | fp16: the saved weights
    base_model_path: str
    adapter_dir: Path
    method: str                       # lora | qlora: how the adapter was trained
    quantized: str | None = None      # 4bit | 8bit: saved in bitsandbytes form (see save_bnb_quantized)


def merge_adapter(run_or_adapter_dir: str | Path, out_dir: str | Path, *, dtype: str = "fp32",
                  check: bool = True, quantize: str | None = None) -> MergeReport:
    """Merge the adapter of a run (or an adapter folder) into its unquantised base; save to `out_dir`.

    `quantize` (4bit | 8bit): the merge still happens in `dtype`; the result is then saved in
    bitsandbytes form (`save_bnb_quantized`).
    """
    from .models import load_base_model, load_tokenizer

    if dtype not in MERGE_DTYPES:
        raise ConfigError(f"`dtype` must be one of {', '.join(MERGE_DTYPES)} (got {dtype!r})")
    if quantize is not None and quantize not in BNB_FORMATS:
        raise ConfigError(f"`quantize` must be one of {', '.join(BNB_FORMATS)} (got {quantize!r})")
    run = locate_run(run_or_adapter_dir)
    if run.adapter_dir is None:
        raise ModelError("nothing to merge: this run trained the full model; its model/ folder is already standalone")
    out = Path(out_dir).expanduser()
    if out.resolve() in (run.adapter_dir.resolve(), *(p.resolve() for p in [run.run_dir] if p is not None)):
        raise ModelError(f"the merged model can't be written into {out}: it would mix with the run's files; "
                         "choose a new folder such as <run>/merged")
    config = run.config
    revision = config.model_revision if config else None
    trust = bool(config and config.trust_remote_code)

    # Never the 4-bit path, whatever the run's config says: load_in_4bit=False, then verify.
    base = load_base_model(run.base_path, load_in_4bit=False, precision=dtype, revision=revision,
                           trust_remote_code=trust)
    refuse_quantized(base, run.base_path)
    model = attach_adapter(base, run.adapter_dir).eval()
    refuse_quantized(model, run.base_path)
    tokenizer = load_tokenizer(str(run.tokenizer_dir), trust_remote_code=trust)
    if run.chat_template_choice is not None:  # the run didn't save its tokenizer: rebuild its template
        from .templates import apply_template_choice

        apply_template_choice(tokenizer, run.chat_template_choice)
    samples = check_sequences(tokenizer) if check else []
    reference = [_logits(model, ids) for ids in samples]   # base + adapter, unmerged

    merged = model.merge_and_unload()
    merged.to(MERGE_DTYPES[dtype])
    diff = max((float((_logits(merged, ids) - ref).abs().max()) for ids, ref in zip(samples, reference)),
               default=None) if check else None

    merged.generation_config.eos_token_id = stop_token_ids(tokenizer, merged.generation_config)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    if quantize is None:
        merged.save_pretrained(str(out))  # safetensors, config.json (with dtype) and generation_config.json
        tokenizer.save_pretrained(str(out))  # carries the chat template used in training
    else:
        with tempfile.TemporaryDirectory(prefix=".merged-", dir=out) as unquantized:
            merged.save_pretrained(unquantized)
            tokenizer.save_pretrained(unquantized)
            del merged, model, base
            save_bnb_quantized(unquantized, out, quantize)
    return MergeReport(out_dir=out, max_abs_logit_diff=diff, dtype=dtype, base_model_path=run.base_path,
                       adapter_dir=run.adapter_dir, method=run.method, quantized=quantize)


def save_bnb_quantized(model_dir: str | Path, out_dir: str | Path, bits: str = "4bit") -> Path:
    """A standalone model folder saved again with bitsandbytes 4-bit (NF4, double quantisation) or 8-bit weights.

    The result loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)` (its config.json carries
    the `quantization_config`), in about a quarter (4-bit) or half (8-bit) of the 16-bit memory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if bits not in BNB_FORMATS:
        raise ConfigError(f"`quantize` must be one of {', '.join(BNB_FORMATS)} (got {bits!r})")
    if bits == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quantization)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))  # with the chat template
    return out


def refuse_quantized(model: torch.nn.Module, base_path: str) -> None:
    """Raise if any weight is bitsandbytes-quantised: the merge must happen in 16/32-bit weights."""
    quantized = [name for name, module in model.named_modules()
                 if type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Params4bit")
                 or type(module).__module__.startswith("bitsandbytes")]
    if quantized or getattr(model, "is_quantized", False):
        where = f" (e.g. `{quantized[0]}`)" if quantized else ""
        raise ModelError(f"the base model `{base_path}` loaded with quantised weights{where}; merging into 4-bit or "
                         "8-bit weights would lose the adapter's update. Use the unquantised original base model "
                         "(a checkpoint without `quantization_config` in its config.json)")


def check_sequences(tokenizer) -> list[torch.Tensor]:
    """CHECK_TEXTS as (1, T) token-id tensors, plus one chat prompt rendered with the training template."""
    texts = list(CHECK_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template(
            [{"role": "user", "content": "What does a LoRA adapter change?"},
             {"role": "assistant", "content": "A low-rank update of the weight matrices."}], tokenize=False))
    return [torch.tensor([tokenizer(t, add_special_tokens=True)["input_ids"]], dtype=torch.long) for t in texts]


@torch.inference_mode()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(1, T) ids → (T, V) fp32 logits."""
    return model(input_ids=input_ids.to(model.device)).logits[0].float().cpu()
