"""Shared fixtures: the demo model in a temporary folder, and a LoRA run folder built without training.

`make_adapter_run` writes what `train` leaves behind for LoRA/QLoRA (adapter/ with tokenizer, run.yaml,
data/test.jsonl) in a fraction of a second: the adapter's B matrices, which PEFT initialises to zero,
are filled with seeded random values so that the adapter changes the model's outputs.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

# A few chat examples for data/test.jsonl: one-turn, with a system prompt, and two-turn.
CHAT_EXAMPLES = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Name a primary colour."},
                  {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "Count to three."},
                  {"role": "assistant", "content": "One, two, three."},
                  {"role": "user", "content": "And back?"},
                  {"role": "assistant", "content": "Three, two, one."}]},
]

LORA_STD = 0.2  # std of the random LoRA B entries: large enough that greedy answers change


@pytest.fixture
def chat_examples() -> list[dict]:
    """The normalised chat examples that the run fixtures write to data/test.jsonl (a fresh copy)."""
    return copy.deepcopy(CHAT_EXAMPLES)


@pytest.fixture(scope="session", autouse=True)
def data_cache_dir(tmp_path_factory) -> Path:
    """The data cache (`finetune.data_cache`) of this test session: never the user's cache folder."""
    folder = tmp_path_factory.mktemp("data-cache")
    os.environ["FINETUNE_DATA_CACHE"] = str(folder)  # inherited by the CLI subprocesses tests start
    return folder


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The offline demo model (a tiny Llama pre-trained for seconds, a BPE tokenizer with ChatML), built once per
    session."""
    from finetune.demo import demo_model_path

    return demo_model_path(cache_dir=tmp_path_factory.mktemp("demo-cache"))


@pytest.fixture(scope="session")
def make_adapter_run(demo_model_dir):
    """Factory: `make_adapter_run(run_dir, method="lora"|"qlora", seed=0) -> run_dir` with adapter/, run.yaml
    and data/test.jsonl, as a finished LoRA/QLoRA run leaves them (no results.json)."""

    def make(run_dir: Path, *, method: str = "lora", seed: int = 0, examples: list[dict] | None = None) -> Path:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from finetune.config import RunConfig
        from finetune.models import load_tokenizer
        from finetune.templates import apply_template_choice

        run_dir = Path(run_dir)
        kwargs = {"dtype": torch.float32}
        if method == "qlora":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), **kwargs)
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        # run.yaml below records these same LoRA settings
        model = get_peft_model(model, lora)
        perturb_lora_b(model, seed)
        model.save_pretrained(str(run_dir / "adapter"))
        tokenizer = load_tokenizer(str(demo_model_dir))
        apply_template_choice(tokenizer, "auto")
        tokenizer.save_pretrained(str(run_dir / "adapter"))
        data = run_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "test.jsonl").write_text(
            "".join(json.dumps(ex) + "\n" for ex in (examples or CHAT_EXAMPLES)), encoding="utf-8")
        RunConfig(base_model=str(demo_model_dir), method=method, output_dir=str(run_dir), lora_r=8, lora_alpha=16,
                  lora_dropout=0.0, dataset=str(data / "test.jsonl"), max_seq_length=256).to_yaml(run_dir / "run.yaml")
        return run_dir

    return make


def perturb_lora_b(model, seed: int, std: float = LORA_STD) -> None:
    """Fill every LoRA B matrix (zero after init, so the adapter would be a no-op) with N(0, std²) values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture(scope="session")
def lora_run_dir(make_adapter_run, tmp_path_factory) -> Path:
    """A LoRA run folder on the demo model: adapter/ (perturbed, with tokenizer), run.yaml, data/test.jsonl."""
    return make_adapter_run(tmp_path_factory.mktemp("lora-run"), method="lora", seed=0)


@pytest.fixture(scope="session")
def full_run_dir(demo_model_dir, tmp_path_factory) -> Path:
    """A full fine-tune run folder: model/ (the demo model with seeded noise on every weight, + tokenizer), run.yaml
    (`method: full`) and data/test.jsonl, as `train` leaves them (no results.json)."""
    from transformers import AutoModelForCausalLM

    from finetune.config import RunConfig
    from finetune.models import load_tokenizer
    from finetune.templates import apply_template_choice

    run_dir = tmp_path_factory.mktemp("full-run")
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(str(run_dir / "model"))
    tokenizer = load_tokenizer(str(demo_model_dir))
    apply_template_choice(tokenizer, "auto")
    tokenizer.save_pretrained(str(run_dir / "model"))
    (run_dir / "data").mkdir()
    (run_dir / "data" / "test.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in CHAT_EXAMPLES),
                                                 encoding="utf-8")
    RunConfig(base_model=str(demo_model_dir), method="full", output_dir=str(run_dir),
              dataset=str(run_dir / "data" / "test.jsonl"), max_seq_length=256).to_yaml(run_dir / "run.yaml")
    return run_dir
