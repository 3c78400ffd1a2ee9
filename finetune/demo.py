"""The offline demo model: a tiny Llama, briefly pre-trained on bundled text, plus a byte-level BPE tokenizer.

Our CI and many users' machines cannot reach the Hugging Face Hub, yet every part of the pipeline
(data → template → LoRA/QLoRA/full training → merge → chat) needs a real causal LM to run on.
`build_demo_model` makes one in seconds from bundled text (`demo_corpus.txt`) and a seed: it trains
the tokenizer on the corpus, then pre-trains the model on it (`pretrain_on_corpus`), so that the
quickstart's LoRA run visibly learns its answers. `demo_model_path` builds it once into a cache folder
and returns that folder. It knows no language and its answers are noise until it is fine-tuned: say
so wherever it is shown (`DEMO_LABEL`).

The folder is a normal Hugging Face model folder (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja) that
`AutoModelForCausalLM` / `AutoTokenizer` load, with `"finetune_demo": true` in config.json and a
DEMO_MODEL.md note.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from .config import DEMO_MODEL_ID
from .templates import CHATML_TEMPLATE

logger = logging.getLogger(__name__)

# The demo's version, as DEMO_MODEL.md and the cache folder's name show it. The folder is also keyed by
# `build_digest()`, so a changed build never reuses older weights, bumped or not.
DEMO_VERSION = 3
DEMO_LABEL = ("tiny offline demo model (pre-trained for seconds on a small bundled corpus; answers are noise until "
              "fine-tuned)")
CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of turn and EOS: generation stops here
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]  # ids 0, 1, 2

VOCAB_SIZE = 1536  # tokens, including the 3 special ones and the 256 byte tokens
# Build-time pre-training on the corpus (`pretrain_on_corpus`): a few seconds on one CPU thread.
PRETRAIN_STEPS = 120  # AdamW steps; about 15 passes over the ~8k-token corpus
PRETRAIN_BATCH = 8  # windows per step
PRETRAIN_WINDOW = 128  # tokens per window
PRETRAIN_LR = 3e-3  # peak learning rate
# Files a complete build contains; a cache folder missing one of them is rebuilt.
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
MARKER_FILE = "DEMO_MODEL.md"
MARKER_TEXT = f"""# Demo model (finetune, version {DEMO_VERSION})

This is a **{DEMO_LABEL}**, built locally by `finetune.demo.build_demo_model` so that the whole
pipeline can run without network access. It is a 2-layer Llama pre-trained for {PRETRAIN_STEPS} steps on
`finetune/demo_corpus.txt` (about 8,000 tokens of English and Python), with a byte-level BPE tokenizer
trained on the same text. It knows no language: use it for tests, dry runs and to watch a LoRA run learn
its training answers, never to judge answer quality.
"""


def build_demo_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the demo model into `out_dir` (created if needed) and return it.

    Deterministic: the same `seed` gives byte-identical files in any folder. Takes seconds on a CPU, mostly
    pre-training.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,  # head_dim 32
        num_key_value_heads=2,  # grouped-query attention, as in Llama 3 and SmolLM2
        max_position_embeddings=2048,  # tokens; longer than any demo run's max_seq_length
        # std of the random weights. The default 0.02 caps |logits| near 2.5 (tied 128-d embeddings after a
        # unit RMSNorm), so LoRA, which can't rescale embeddings or norms, could never push the loss far below
        # ln(vocab). At 0.1 logits span ~±13: adapters can memorise an answer and the loss curve shows it.
        initializer_range=0.1,
        # Tied input/output embeddings, like the default real base (SmolLM2-135M): the demo then
        # exercises the same save/merge code paths for tied weights, and stays ~40% smaller.
        tie_word_embeddings=True,
        bos_token_id=None,  # like SmolLM2/Qwen: no BOS is added; the chat template starts each turn
        eos_token_id=ids[IM_END],
        pad_token_id=ids[PAD_TOKEN],
        dtype="float32",
    )
    config.finetune_demo = True  # saved into config.json; read by `is_demo_model`
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    pretrain_on_corpus(model, tokenizer, seed=seed, steps=PRETRAIN_STEPS)
    model.generation_config = GenerationConfig(
        eos_token_id=ids[IM_END], pad_token_id=ids[PAD_TOKEN], do_sample=False, max_new_tokens=64,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER_FILE).write_text(MARKER_TEXT, encoding="utf-8")
    return out_dir


def pretrain_on_corpus(model, tokenizer, *, seed: int, steps: int) -> list[float]:
    """Train every weight of `model` for `steps` AdamW steps of next-token prediction on the bundled corpus.

    Why: LoRA on random weights learns so slowly that a quickstart never reproduces its answers; a base
    that has seen some English and Python gives the adapters features to build on. The corpus is small,
    so the model mostly memorises it: it still knows no language. One CPU thread and a seeded window
    sampler make the weights the same on every run, whatever the machine's thread count.
    Returns the loss of each step (nats/token).
    """
    import torch

    windows = corpus_windows(tokenizer, PRETRAIN_WINDOW)  # (N, window) token ids
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 10)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reductions in one fixed order; also the fastest setting for a model this small
    try:
        model.train()
        for step in range(steps):
            batch = windows[torch.randint(len(windows), (PRETRAIN_BATCH,), generator=generator)]
            for group in optimizer.param_groups:  # linear warmup, then cosine decay to 0
                group["lr"] = PRETRAIN_LR * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels: token t predicts t + 1
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def corpus_windows(tokenizer, window: int):
    """The corpus as consecutive, non-overlapping (N, window) windows of token ids; the leftover tail is dropped."""
    import torch

    text = CORPUS_PATH.read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids)  # no length warning
    n = len(ids) // window
    return ids[:n * window].view(n, window)


def build_demo_tokenizer():
    """A byte-level BPE tokenizer (`VOCAB_SIZE` tokens) trained on the bundled corpus, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: a token's character offsets include its leading space, so offsets tile the text.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown tokens
        show_progress=False,
    )
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    backend.train_from_iterator(corpus.split("\n\n"), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text
    )


def is_demo_model(path: str | Path) -> bool:
    """True for `demo` (the config value) or a folder whose config.json says `"finetune_demo": true`."""
    if str(path) == DEMO_MODEL_ID:
        return True
    config_file = Path(path) / "config.json"
    try:
        return json.loads(config_file.read_text(encoding="utf-8")).get("finetune_demo") is True
    except (OSError, ValueError, AttributeError):
        return False


def default_cache_dir() -> Path:
    """`$FINETUNE_CACHE`, else `~/.cache/finetune`."""
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune")


_BUILD_LOCK = threading.Lock()


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """The cached demo model folder `<cache_dir>/demo-v{DEMO_VERSION}-<build digest>`, built on first use.

    Safe when several processes ask at once: each builds into its own temporary folder beside the
    target and renames it into place; a process that loses the race keeps the winner's folder. Threads of one
    process take turns (two first imports of transformers at once can fail).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / demo_folder_name()
    if _is_complete(target):
        return target
    with _BUILD_LOCK:  # threads of one process (the app's first page load) build once, one after the other
        return target if _is_complete(target) else _build_into(root, target)


def demo_folder_name() -> str:
    """`demo-v{DEMO_VERSION}-<first 12 hex digits of build_digest()>`."""
    return f"demo-v{DEMO_VERSION}-{build_digest()[:12]}"


def build_digest() -> str:
    """A digest of what decides the built files: the build settings, the corpus, the build code (this file,
    which holds the architecture), the chat template, and the libraries that tokenize, initialise and train."""
    from importlib.metadata import version

    from .data_cache import cache_key, code_digest, file_digest

    settings = {"vocab_size": VOCAB_SIZE, "special_tokens": SPECIAL_TOKENS, "pretrain_steps": PRETRAIN_STEPS,
                "pretrain_batch": PRETRAIN_BATCH, "pretrain_window": PRETRAIN_WINDOW, "pretrain_lr": PRETRAIN_LR,
                "chat_template": CHATML_TEMPLATE}
    versions = {name: version(name) for name in ("torch", "transformers", "tokenizers")}
    return cache_key(settings, file_digest(CORPUS_PATH), code_digest(sys.modules[__name__]), versions)


def _build_into(root: Path, target: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if target.exists():  # damaged (a file was deleted by hand): move it aside atomically, then rebuild
        _discard(target, root)
    logger.info("Building the %s into %s", DEMO_LABEL, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=root))
    try:
        build_demo_model(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process has put a folder there meanwhile
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _discard(folder: Path, root: Path) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}-damaged-", dir=root))
    try:
        os.rename(folder, trash / folder.name)
    except OSError:
        pass  # another process moved or replaced it already
    shutil.rmtree(trash, ignore_errors=True)
