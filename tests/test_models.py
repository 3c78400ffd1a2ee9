"""Loading the base model: the precision `auto` picks, the attention kernel, and the out-of-memory advice."""

import inspect
import json

import pytest
import torch

from finetune.config import RunConfig
from finetune.errors import ConfigError
from finetune.models import load_base_model, out_of_memory_message, resolve_attention, resolve_precision
from finetune.train import train


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


# ----------------------------------------------------------------------------- attention
ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(4)]


def _one_step(demo_model_dir, out, **changes) -> RunConfig:
    """One LoRA step on the demo model over `ROWS`, no held-out splits."""
    return RunConfig(base_model=str(demo_model_dir), max_steps=1, batch_size=2, gradient_accumulation_steps=1,
                     eval_fraction=0.0, test_fraction=0.0, max_seq_length=64, output_dir=str(out), **changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
@pytest.mark.parametrize("kernel", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_on_cpu_fails_before_anything_loads(demo_model_dir, tmp_path, kernel):
    """The run stops with the field and the fix before its data is split or any weights load (transformers would
    only say, at load time, that a flash-attn package is not installed)."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        train(_one_step(demo_model_dir, out, attn_implementation=kernel), rows=ROWS)
    expected = (f"`attn_implementation: {kernel}` needs a CUDA GPU and none is visible; on CPU use "
                "`attn_implementation: auto` (or `sdpa`, `eager`)")
    assert str(e.value) == expected
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]
    assert json.loads((out / "status.json").read_text())["error"] == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_auto_attention_on_cpu_is_transformers_default(demo_model_dir, precision):
    """`auto` passes nothing on CPU: the model loads with the kernel it loaded with before the field existed."""
    assert resolve_attention("auto", precision) is None
    chosen = load_base_model(str(demo_model_dir), attn_implementation=resolve_attention("auto", precision))
    assert chosen.config._attn_implementation == load_base_model(str(demo_model_dir)).config._attn_implementation \
        == "sdpa"


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_the_attention_field_reaches_the_trained_model(demo_model_dir, tmp_path, kernel):
    """`attn_implementation` goes from the config through `train` to the model that trained."""
    result = train(_one_step(demo_model_dir, tmp_path / "run", attn_implementation=kernel), rows=ROWS)
    assert result.model.config._attn_implementation == kernel


# ----------------------------------------------------------------------------- out of memory
def test_out_of_memory_advice_offers_qlora_on_cpu_too():
    """bitsandbytes 4-bit runs on CPU (tests/test_qlora.py trains it), so QLoRA is advice for CPU RAM as well."""
    message = out_of_memory_message(RunConfig(base_model="demo", batch_size=1, max_seq_length=256,
                                              gradient_checkpointing=True), on_gpu=False)
    assert message == ("training ran out of memory (CPU RAM). Try: `method: qlora` (a 4-bit base needs about a "
                       "quarter of the weight memory)")
