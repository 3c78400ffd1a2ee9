"""merge_adapter: the merged model computes base + adapter, from an unquantised base, and loads on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import ConfigError, ModelError
from finetune.merge import check_sequences, merge_adapter, refuse_quantized

# Two fp32 computations of the same function (W + s·B·A)x, summed in different orders: the rounding
# is ~1e-7 relative on logits of size ~1-10, so 1e-4 is far above it and far below any real change.
FP32_TOLERANCE = 1e-4


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits[0].float()  # (T, V)


def max_diff(model_a, model_b, sequences) -> float:
    return max(float((logits(model_a, ids) - logits(model_b, ids)).abs().max()) for ids in sequences)


def base_plus_adapter(base_dir: Path, adapter_dir: Path, **load):
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **load)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


@pytest.fixture(scope="module")
def merged_fp32(lora_run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "fp32"
    return merge_adapter(lora_run_dir, out)


def test_merged_fp32_logits_equal_base_plus_adapter(merged_fp32, lora_run_dir, demo_model_dir):
    assert merged_fp32.dtype == "fp32" and merged_fp32.method == "lora"
    assert merged_fp32.base_model_path == str(demo_model_dir)
    assert 0 <= merged_fp32.max_abs_logit_diff < FP32_TOLERANCE

    # Recompute independently, from the saved folder and a fresh base + adapter.
    tokenizer = AutoTokenizer.from_pretrained(str(merged_fp32.out_dir))
    sequences = check_sequences(tokenizer) + [torch.tensor([list(range(3, 60))])]
    merged = AutoModelForCausalLM.from_pretrained(str(merged_fp32.out_dir)).eval()
    reference = base_plus_adapter(demo_model_dir, lora_run_dir / "adapter")
    assert max_diff(merged, reference, sequences) < FP32_TOLERANCE
    # ... and the comparison has teeth: the adapter moves the logits far more than the tolerance.
    plain_base = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    assert max_diff(merged, plain_base, sequences) > 100 * FP32_TOLERANCE


def test_merged_folder_is_a_standalone_model_with_the_chat_template(merged_fp32, lora_run_dir):
    out = merged_fp32.out_dir
    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    trained_with = AutoTokenizer.from_pretrained(str(lora_run_dir / "adapter"))
    assert tokenizer.chat_template and tokenizer.chat_template == trained_with.chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert im_end in (eos if isinstance(eos, list) else [eos])


def test_bf16_merge_saves_bf16_weights_and_reports_the_rounding(lora_run_dir, tmp_path):
    report = merge_adapter(lora_run_dir, tmp_path / "bf16", dtype="bf16")
    assert report.dtype == "bf16"
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"BF16"}
    # bf16 keeps 8 bits of mantissa: a visible but small difference on logits of size ~1-10.
    assert FP32_TOLERANCE < report.max_abs_logit_diff < 1.0


def test_qlora_run_merges_through_an_unquantised_base(make_adapter_run, demo_model_dir, tmp_path):
    run = make_adapter_run(tmp_path / "qlora-run", method="qlora", seed=1)
    report = merge_adapter(run, tmp_path / "merged")
    assert report.method == "qlora"
    assert report.max_abs_logit_diff < FP32_TOLERANCE

    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    linears = [m for m in merged.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in linears)

    sequences = check_sequences(AutoTokenizer.from_pretrained(str(tmp_path / "merged")))
    # Same tolerance as LoRA: the merge was done in fp32 on the fp32 base, so it is exact up to rounding.
    fp32_reference = base_plus_adapter(demo_model_dir, run / "adapter")
    assert max_diff(merged, fp32_reference, sequences) < FP32_TOLERANCE
    # Had the adapter been merged into (or checked against) the 4-bit base, the NF4 rounding of the base
    # weights (~10% of their size) would show: the 4-bit model is measurably different.
    from transformers import BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    quantized_reference = base_plus_adapter(demo_model_dir, run / "adapter", quantization_config=nf4)
    assert max_diff(merged, quantized_reference, sequences) > 100 * FP32_TOLERANCE

    with pytest.raises(ModelError) as err:
        refuse_quantized(quantized_reference, "demo-base")
    assert str(err.value).startswith("the base model `demo-base` loaded with quantised weights (e.g. `")
    assert "Use the unquantised original base model" in str(err.value)


def test_merging_an_adapter_folder_directly(lora_run_dir, tmp_path, merged_fp32):
    report = merge_adapter(lora_run_dir / "adapter", tmp_path / "out")
    assert report.adapter_dir == lora_run_dir / "adapter"
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    via_run = AutoModelForCausalLM.from_pretrained(str(merged_fp32.out_dir))
    for (name, a), (_, b) in zip(direct.state_dict().items(), via_run.state_dict().items()):
        assert torch.equal(a, b), name


def test_folder_without_adapter_is_refused(tmp_path):
    with pytest.raises(ModelError) as err:
        merge_adapter(tmp_path, tmp_path / "out")
    assert str(err.value) == f"no adapter_config.json in {tmp_path}; point to a run folder or its adapter/ subfolder"


def test_missing_folder_is_refused(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError) as err:
        merge_adapter(missing, tmp_path / "out")
    assert str(err.value) == (f"run folder not found: {missing}; give a run folder (with run.yaml and adapter/ or "
                              "model/) or an adapter folder (with adapter_config.json)")


def test_full_fine_tune_has_nothing_to_merge(full_run_dir, tmp_path):
    with pytest.raises(ModelError) as err:
        merge_adapter(full_run_dir, tmp_path / "out")
    assert str(err.value) == ("nothing to merge: this run trained the full model; its model/ folder is already "
                              "standalone")


def test_unfinished_run_is_explained(tmp_path, lora_run_dir):
    (tmp_path / "run.yaml").write_text((lora_run_dir / "run.yaml").read_text())
    with pytest.raises(ModelError) as err:
        merge_adapter(tmp_path, tmp_path / "out")
    assert str(err.value) == (f"{tmp_path} has run.yaml but neither adapter/ nor model/: the run hasn't finished "
                              "training (see its status.json); wait for it, or resume it with "
                              "`resume_from_checkpoint: latest`")


def test_bad_dtype_and_bad_output_folder(lora_run_dir):
    with pytest.raises(ConfigError) as err:
        merge_adapter(lora_run_dir, lora_run_dir / "merged", dtype="int8")
    assert str(err.value) == "`dtype` must be one of fp32, bf16, fp16 (got 'int8')"
    with pytest.raises(ModelError) as err:
        merge_adapter(lora_run_dir, lora_run_dir / "adapter")
    assert str(err.value).startswith(f"the merged model can't be written into {lora_run_dir / 'adapter'}")
