"""Loading the base model: the precision `auto` picks, and the out-of-memory advice."""

import inspect

import pytest
import torch

from finetune.config import RunConfig
from finetune.models import out_of_memory_message, resolve_precision


# ----------------------------------------------------------------------------- precision
def _emulated_bf16_only(including_emulation: bool = True):
    """`torch.cuda.is_bf16_supported` on a T4 (compute capability 7.5): a bf16 tensor can be made, none is native."""
    return including_emulation


def _native_bf16(including_emulation: bool = True):
    """`torch.cuda.is_bf16_supported` on an A100 or newer (compute capability >= 8.0)."""
    return True


@pytest.mark.parametrize("is_bf16_supported, expected", [(_emulated_bf16_only, "fp16"), (_native_bf16, "bf16")])
def test_auto_precision_does_not_count_emulated_bf16(monkeypatch, is_bf16_supported, expected):
    """No GPU exists on this machine, so `torch.cuda.is_available` and `torch.cuda.is_bf16_supported` are replaced
    by stand-ins (the one place this suite does so) with torch's own signature: a T4, whose bf16 is emulated only,
    must get fp16; a GPU with native bf16 gets bf16. benchmarks/gpu_check.py checks it on a real GPU."""
    assert inspect.signature(is_bf16_supported) == inspect.signature(torch.cuda.is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto") == expected


# ----------------------------------------------------------------------------- out of memory
def test_out_of_memory_advice_offers_qlora_on_cpu_too():
    """bitsandbytes 4-bit runs on CPU (tests/test_qlora.py trains it), so QLoRA is advice for CPU RAM as well."""
    message = out_of_memory_message(RunConfig(base_model="demo", batch_size=1, max_seq_length=256,
                                              gradient_checkpointing=True), on_gpu=False)
    assert message == ("training ran out of memory (CPU RAM). Try: `method: qlora` (a 4-bit base needs about a "
                       "quarter of the weight memory)")
