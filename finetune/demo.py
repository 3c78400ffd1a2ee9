"""The offline demo model: a tiny random-weight Llama plus a byte-level BPE tokenizer, built locally.

Our CI and many users' machines cannot reach the Hugging Face Hub, yet every part of the pipeline
(data → template → LoRA/QLoRA/full training → merge → chat) needs a real causal LM to run on.
`build_demo_model` makes one in a few seconds from bundled text (`demo_corpus.txt`) and a seed;
`demo_model_path` builds it once into a cache folder and returns that folder. Its answers are noise
until it is trained: say so wherever it is shown (`DEMO_LABEL`).

The folder is a normal Hugging Face model folder (config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja) that
`AutoModelForCausalLM` / `AutoTokenizer` load, with `"finetune_demo": true` in config.json and a
DEMO_MODEL.md note.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .config import DEMO_MODEL_ID
from .templates import CHATML_TEMPLATE

logger = logging.getLogger(__name__)

# Bump when the build changes (architecture, corpus, tokenizer settings) so caches rebuild.
DEMO_VERSION = 2  # bump whenever the built weights or tokenizer change, so caches rebuild
DEMO_LABEL = "random-weight demo model (offline; answers are noise until trained)"
CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of turn and EOS: generation stops here
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]  # ids 0, 1, 2

VOCAB_SIZE = 1536  # tokens, including the 3 special ones and the 256 byte tokens
# Files a complete build contains; a cache folder missing one of them is rebuilt.
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json")
MARKER_FILE = "DEMO_MODEL.md"
MARKER_TEXT = f"""# Demo model (finetune, version {DEMO_VERSION})

This is a **{DEMO_LABEL}**, built locally by `finetune.demo.build_demo_model` so that the whole
pipeline can run without network access. It is a 2-layer Llama with random weights and a byte-level
BPE tokenizer trained on `finetune/demo_corpus.txt`. It knows no language: use it for tests and
dry runs, never to judge answer quality.
"""


def build_demo_model(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build the demo model into `out_dir` (created if needed) and return it.

    Deterministic: the same `seed` gives byte-identical files in any folder. Takes ~1-2 s on a CPU.
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
    model.generation_config = GenerationConfig(
        eos_token_id=ids[IM_END], pad_token_id=ids[PAD_TOKEN], do_sample=False, max_new_tokens=64,
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / MARKER_FILE).write_text(MARKER_TEXT, encoding="utf-8")
    return out_dir


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


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """The cached demo model folder `<cache_dir>/demo-v{DEMO_VERSION}`, built on first use.

    Safe when several processes ask at once: each builds into its own temporary folder beside the
    target and renames it into place; a process that loses the race keeps the winner's folder.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"demo-v{DEMO_VERSION}"
    if _is_complete(target):
        return target
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
