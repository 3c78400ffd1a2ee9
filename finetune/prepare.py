"""Data → template → tokens, once: the path training, `python -m finetune preview` and the app's Data tab share.

`prepare_data(config)` reads, normalises and splits the dataset (`data.load_examples`), loads the base model's
tokenizer with the configured chat template, and encodes every example with its loss mask
(`templates.encode_blocks`: a document longer than `max_seq_length` becomes consecutive blocks), keeping the
encodings, their token-length statistics and a report of documents, blocks and answer tokens lost to truncation (a
warning when over 5% of the training answers are cut). What the model trains on is what the preview shows and measures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .config import RunConfig
from .data import PreparedData, length_stats, load_examples
from .errors import DataError
from .models import BaseModelSource, load_tokenizer, resolve_base_model
from .templates import IGNORE_INDEX, apply_template_choice, encode_blocks, encoding_report, truncation_warning

log = logging.getLogger(__name__)


@dataclass
class TemplatedTokenizer:
    """The base model's tokenizer, its chat template applied, and where the base model comes from."""

    source: BaseModelSource   # local folder or Hub id, demo or not, and a fallback notice for people
    tokenizer: Any            # a transformers tokenizer with `chat_template` and a pad token set
    template: str             # tokenizer | chatml | alpaca: the template applied


def load_templated_tokenizer(config: RunConfig, source: BaseModelSource | None = None) -> TemplatedTokenizer:
    """The tokenizer of `config.base_model` (resolved here unless `source` is given) with `config.chat_template`."""
    source = source or resolve_base_model(config)
    tokenizer = load_tokenizer(source.path, revision=config.model_revision,
                               trust_remote_code=config.trust_remote_code)
    template = apply_template_choice(tokenizer, config.chat_template)
    return TemplatedTokenizer(source=source, tokenizer=tokenizer, template=template)


@dataclass
class EncodedData:
    """Split examples with their encodings (input_ids, labels, untruncated length) and length statistics."""

    examples: PreparedData               # normalised, split examples, skipped rows, format, source
    model: TemplatedTokenizer
    encoded: dict[str, list[dict]]       # split → `encode_blocks` of each example (the first `limit` of them)
    stats: dict[str, dict]               # split → `data.length_stats` of the encoded examples (a document's blocks)
    report: dict[str, dict]              # split → `templates.encoding_report`: documents, blocks, answer tokens lost

    @property
    def lengths(self) -> dict[str, list[int]]:
        """split → untruncated token length of each encoded example."""
        return {split: [enc["length"] for enc in encs] for split, encs in self.encoded.items()}

    def trainable(self, split: str) -> list[dict]:
        """input_ids and labels of the split's examples that keep a loss token within `max_seq_length`."""
        return [{"input_ids": enc["input_ids"], "labels": enc["labels"]} for enc in self.encoded[split]
                if any(label != IGNORE_INDEX for label in enc["labels"])]

    def dropped(self, split: str) -> int:
        """Examples whose prompt alone filled `max_seq_length`: nothing to learn from them."""
        return len(self.encoded[split]) - len(self.trainable(split))

    def dataset(self, split: str):
        """`trainable(split)` as a `datasets.Dataset`, or None when no example is left."""
        from datasets import Dataset

        rows = self.trainable(split)
        return Dataset.from_list(rows) if rows else None


def prepare_data(config: RunConfig, rows: list[dict] | None = None, *,
                 tokenizer_for: Callable[[RunConfig], TemplatedTokenizer] = load_templated_tokenizer,
                 limit: int | None = None) -> EncodedData:
    """Load and split `config.dataset` (or `rows`), then encode each split as training will.

    The data is read first, so a data mistake is reported before the tokenizer is fetched; then every example is
    encoded once. A row the template can't encode is a bad row like any other: the data is read again with the
    encoding as a per-row check, so the error names its row (or `skip_invalid` drops it before the split).
    `tokenizer_for` loads the templated tokenizer (the app passes its cache). `limit` encodes only the first
    `limit` examples of each split (the app measures a sample of large datasets).
    """
    examples = load_examples(config, rows)
    model = tokenizer_for(config)
    encodings: dict[int, list[dict]] = {}  # id(example) → its encodings; split_examples keeps the same dict objects

    def encode(example: dict) -> list[dict]:  # a chat example's encoding, or a document's blocks
        encodings[id(example)] = encode_blocks(example, model.tokenizer, max_seq_length=config.max_seq_length,
                                               train_on_prompt=config.train_on_prompt,
                                               train_on_reasoning=config.train_on_reasoning)
        return encodings[id(example)]

    def encode_splits() -> dict[str, list[dict]]:
        return {split: [enc for ex in exs[:limit] for enc in encodings.get(id(ex)) or encode(ex)]
                for split, exs in examples.splits.as_dict().items()}

    try:
        encoded = encode_splits()
    except DataError:  # which row? read again with the encoding as the row check (rare: costs a second pass)
        encodings.clear()
        examples = load_examples(config, rows, check_example=encode)
        encoded = encode_splits()
    stats = {split: length_stats([enc["length"] for enc in encs], config.max_seq_length)
             for split, encs in encoded.items()}
    report = {split: encoding_report(encs) for split, encs in encoded.items()}
    warning = truncation_warning(report["train"], config.max_seq_length)
    if warning:
        log.warning(warning)
    return EncodedData(examples=examples, model=model, encoded=encoded, stats=stats, report=report)


__all__ = ["EncodedData", "TemplatedTokenizer", "load_templated_tokenizer", "prepare_data"]
