"""Real tokenizers and chat templates (tests/fixtures) paired with tiny random-weight models of their architectures.

Each family is what users bring: the real tokenizer or chat template, and a model of the real architecture (Qwen2
with q/k/v bias, Phi-3 with fused qkv, Mistral and Gemma-2 with sliding windows, Gemma-2 with soft-capping, Llama)
at a size that runs in well under a second on a CPU. Weights are random and seeded; only the architecture is real.
"""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOKENIZERS = FIXTURES / "tokenizers"
TEMPLATES = FIXTURES / "chat_templates"

# family → (tokenizer folder, chat template file or None for the tokenizer's own, architecture)
# Mistral v0.3's and Gemma-2's tokenizers are not in the fixtures: their templates go on the Phi-3 tokenizer (a
# Llama SentencePiece vocabulary with <s> and </s>, as Mistral's is); Gemma's turn markers are then plain text.
FAMILIES = {
    "qwen2": ("qwen2.5-instruct", None, "qwen2"),
    "phi3": ("phi3-mini-4k-instruct", None, "phi3"),
    "mistral": ("phi3-mini-4k-instruct", "mistral-v0.3.jinja", "mistral"),
    "gemma2": ("phi3-mini-4k-instruct", "gemma-2-it.jinja", "gemma2"),
    "llama": ("phi3-mini-4k-instruct", None, "llama"),
}

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def real_tokenizer(family: str):
    """The family's real tokenizer, with its real chat template."""
    from transformers import AutoTokenizer

    folder, template, _ = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS / folder))
    if template is not None:
        tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    return tokenizer


def tiny_config(family: str, vocab_size: int, *, window: int | None = 16):
    """A small config of the family's architecture; `window` is the sliding window where the architecture has one."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    arch = FAMILIES[family][2]
    common = dict(SMALL, vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":  # q/k/v projections carry a bias in Qwen2
        return Qwen2Config(**common, use_sliding_window=window is not None, sliding_window=window,
                           max_window_layers=0, tie_word_embeddings=True)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return Phi3Config(**common, sliding_window=window)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=window)
    if arch == "gemma2":  # alternating sliding/full layers, attention and final logit soft-capping
        return Gemma2Config(**common, head_dim=16, sliding_window=window or 4096, attn_logit_softcapping=50.0,
                            final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    return LlamaConfig(**common)


def tiny_model(family: str, tokenizer=None, *, window: int | None = 16, seed: int = 0,
               attn_implementation: str | None = None, dtype=torch.float32):
    """A seeded random-weight model of the family's architecture, sized to the tokenizer's vocabulary.

    `attn_implementation` defaults to what users get: sdpa, or eager for Gemma-2 (soft-capping has no sdpa path).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or real_tokenizer(family)
    config = tiny_config(family, len(tokenizer), window=window)
    attn_implementation = attn_implementation or ("eager" if FAMILIES[family][2] == "gemma2" else "sdpa")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def save_tiny_model(folder: Path, family: str, *, window: int | None = 16, seed: int = 0) -> Path:
    """Writes the tiny model and the real tokenizer (with its template) to `folder`, loadable as `base_model`."""
    tokenizer = real_tokenizer(family)
    tiny_model(family, tokenizer, window=window, seed=seed).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return Path(folder)
