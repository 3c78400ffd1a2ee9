"""Data → template → tokens, once: the path training, `python -m finetune preview` and the app's Data tab share.

`prepare_data(config)` reads, normalises and de-duplicates the dataset a row at a time into an Arrow table
(`data.collect_examples`), loads the base model's tokenizer with the configured chat template, encodes every
example with its loss mask (`templates.encode_blocks`, one `datasets.map` over the table, in parallel where
there are cores: a document longer than `max_seq_length` becomes consecutive blocks), then splits, each example's
blocks in one split. A row the template can't encode is a bad row like any other: an error naming its row, or
skipped with `skip_invalid`. It keeps the encodings, their token-length statistics and a report of documents,
blocks and answer tokens lost to truncation (a warning when over 5% of the training answers are cut). What the
model trains on is exactly what the preview shows and measures.

Both the examples and their encodings are kept in the data cache (`finetune.data_cache`), keyed by the data's
content, the tokenizer, the template and the settings that change them, so a second run or a resume starts at
once. `preview_data` reads only the first rows of a large dataset and measures token lengths on those.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from .config import RunConfig
from .data import (
    SKIP_HINT,
    ExampleList,
    ExampleStore,
    PreparedData,
    SkippedRow,
    collect_examples,
    display_name,
    length_stats,
    read_rows,
)
from .errors import DataError
from .models import BaseModelSource, load_tokenizer, resolve_base_model
from .templates import (
    apply_template_choice,
    combined_report,
    encode_blocks,
    encoding_report,
    loss_token_count,
    system_turn_notice,
    tool_format_notice,
    truncation_warning,
)

log = logging.getLogger(__name__)

PREVIEW_SAMPLE = 2000      # rows a preview reads at most: its examples and its token-length sample
ROWS_PER_PROCESS = 500     # fewer examples than this per extra process are encoded in this process only
# what `encode_blocks` returns for each encoding (and `block`, a document block's index, null for a chat example)
ENCODED_FIELDS = ("input_ids", "labels", "length", "truncated", "loss_tokens")
REPORT_FIELDS = ("block", "length", "truncated", "loss_tokens", "loss_kept")  # what `_report` reads
# Errors `encode_blocks` raises for one example (the row is then reported, or skipped with `skip_invalid`).
ROW_ERRORS = (DataError,)


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


class EncodedList(Sequence):
    """A split's encodings as the list of `encode_blocks` results it stands for, read from an Arrow table
    (`table`: a `datasets.Dataset` with those columns plus `row`, the example's source row, and `loss_kept`,
    the tokens carrying loss within `max_seq_length`)."""

    def __init__(self, table: Any):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        return _encoding(self.table[item])

    def __iter__(self) -> Iterator[dict]:
        for batch in self.table.select_columns([*ENCODED_FIELDS, "block"]).iter(batch_size=1000):
            yield from (_encoding({name: values[i] for name, values in batch.items()})
                        for i in range(len(batch["length"])))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, EncodedList)):
            return NotImplemented
        return len(self) == len(other) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"EncodedList({len(self)} encodings)"


def _encoding(row: dict) -> dict:
    """One stored encoding as `encode_blocks` returned it: `block` only for a document's block."""
    enc = {name: row[name] for name in ENCODED_FIELDS}
    return enc if row["block"] is None else {**enc, "block": row["block"]}


@dataclass
class EncodedData:
    """Split examples with their encodings (input_ids, labels, untruncated length) and length statistics."""

    examples: PreparedData               # normalised, split examples, skipped rows, format, source
    model: TemplatedTokenizer
    encoded: dict[str, EncodedList]      # split → `encode_blocks` of each example (the first `limit` of them)
    stats: dict[str, dict]               # split → `data.length_stats` of the encoded examples (a document's blocks)
    report: dict[str, dict]              # split → `templates.encoding_report`: documents, blocks, answer tokens lost
    sample: int | None = None            # a preview of a larger dataset: rows read (the first ones), else None
    warning: str | None = None           # `templates.truncation_warning` of the train split: over 5% of answers cut

    def notices(self, shown: Sequence[dict]) -> list[str]:
        """What a preview says about this data before training (the CLI's `note:` lines, the app's Data tab): how the
        rows were read (a .txt file's documents, preference data's answers: `data`), and how the chat template takes
        the `shown` examples' system turns and tool calls (its own `tools` support or the built-in format)."""
        tokenizer = self.model.tokenizer
        found = (system_turn_notice(tokenizer, shown), tool_format_notice(tokenizer, shown))
        return [*self.examples.notices, *(notice for notice in found if notice)]

    @property
    def lengths(self) -> dict[str, list[int]]:
        """split → untruncated token length of each encoded example."""
        return {split: column(encs.table, "length") for split, encs in self.encoded.items()}

    def trainable(self, split: str):
        """input_ids and labels (a `datasets.Dataset`) of the split's examples that keep a loss token within
        `max_seq_length`."""
        table = self.encoded[split].table
        keep = [i for i, kept in enumerate(column(table, "loss_kept")) if kept]
        return table.select(keep).select_columns(["input_ids", "labels"])

    def dropped(self, split: str) -> int:
        """Examples whose prompt alone filled `max_seq_length`: nothing to learn from them."""
        return len(self.encoded[split]) - len(self.trainable(split))

    def dataset(self, split: str):
        """`trainable(split)` as a `datasets.Dataset`, or None when no example is left."""
        rows = self.trainable(split)
        return rows if len(rows) else None


def prepare_data(config: RunConfig, rows: list[dict] | None = None, *,
                 tokenizer_for: Callable[[RunConfig], TemplatedTokenizer] = load_templated_tokenizer,
                 limit: int | None = None) -> EncodedData:
    """Load `config.dataset` (or `rows`), encode every example as training will, then split.

    The data is read first, so a data mistake is reported before the tokenizer is fetched. A row the template
    can't encode is an error naming its row, or skipped with `skip_invalid` before the split. `tokenizer_for`
    loads the templated tokenizer (the app passes its cache). `limit` encodes only the first `limit` examples
    of each split (the app measures a sample of large datasets); training encodes them all, once: the
    encodings of a file or Hub dataset are kept in the data cache.
    """
    store = collect_examples(config, rows)
    model = tokenizer_for(config)
    if limit is not None:
        return _encode_first(store, model, config, limit)
    encoded, errors = _encode_store(store, model, config)
    skipped = _row_problems(errors, store.source, config.skip_invalid)
    failed = {row for row, _ in errors}
    keep = [i for i, row in enumerate(column(store.table, "row")) if row not in failed] if failed else None
    if keep == []:
        raise DataError(f"{store.source}: no example could be encoded, nothing is left to train on; the first "
                        f"problem: row {errors[0][0]}: {errors[0][1]}", source=store.source)
    examples = store.split(config, keep, skipped)
    spans = _example_spans(encoded, len(store.table))
    split_encoded = {name: EncodedList(encoded.select(_encoding_indices(spans, part.indices))) for name, part in
                     examples.splits.as_dict().items()}
    return _with_stats(examples, model, split_encoded, config)


def _example_spans(encoded, examples: int):
    """(starts, ends): example i of the store (in order) is encodings [starts[i], ends[i]) of `encoded` (a document
    has one per block; every example, an unencodable one too, has at least one)."""
    import numpy as np

    rows = np.asarray(column(encoded, "row"), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(rows)].astype(np.int64)
    if len(starts) != examples:
        raise AssertionError(f"{len(starts)} encoded examples for {examples} examples")  # a bug, not a data problem
    return starts, ends


def _encoding_indices(spans, positions: list[int]) -> list[int]:
    """The encodings of the examples at `positions`, in that order: all blocks of each example together."""
    starts, ends = spans
    return [i for p in positions for i in range(starts[p], ends[p])]


def preview_data(config: RunConfig, *,
                 tokenizer_for: Callable[[RunConfig], TemplatedTokenizer] = load_templated_tokenizer,
                 sample: int = PREVIEW_SAMPLE) -> EncodedData:
    """`prepare_data` on the first `sample` rows of the dataset only, so a preview of a 1 GB file answers in
    seconds. When the dataset has more rows, `EncodedData.sample` says how many were read; its splits and
    statistics are then estimates from those rows."""
    if not config.dataset.strip():
        raise DataError("`dataset` is not set; give a file path, a Hub dataset id, or rows", field="dataset")
    wanted = min(config.max_rows or sample + 1, sample + 1)  # one more row tells whether there are more
    rows = read_rows(config.dataset, dataset_config=config.dataset_config, split=config.dataset_split,
                     max_rows=wanted, skip_invalid=config.skip_invalid)
    more = len(rows) > sample
    if more:
        del rows[sample:]  # in place: a .txt file's rows keep their `text_split`
    store = collect_examples(config, rows, source=display_name(config.dataset))
    model = tokenizer_for(config)
    prepared = _encode_first(store, model, config, None)
    prepared.sample = sample if more else None
    return prepared


def _encode_first(store: ExampleStore, model: TemplatedTokenizer, config: RunConfig,
                  limit: int | None) -> EncodedData:
    """Split, then encode the first `limit` examples of each split (all when None), in memory (uncached). A row that
    can't be encoded leaves its split (it is skipped, as in `prepare_data`), so what is shown can be rendered."""
    examples = store.split(config)
    encoded, skipped = {}, []
    for name, part in examples.splits.as_dict().items():
        table = store.table.select(part.indices[:limit])
        table = _map_encode(table, model.tokenizer, config, store.source, _processes(len(table)), cache_file=None)
        errors = _errors(table)
        skipped += _row_problems(errors, store.source, config.skip_invalid)
        if errors:
            failed = {row for row, _ in errors}
            table = table.select([i for i, row in enumerate(column(table, "row")) if row not in failed])
            rows = column(store.table.select(part.indices), "row")
            setattr(examples.splits, name, ExampleList(store.table, [i for i, row in zip(part.indices, rows)
                                                                     if row not in failed]))
        encoded[name] = EncodedList(table)
    examples.skipped = sorted([*examples.skipped, *skipped], key=lambda s: s.row)
    return _with_stats(examples, model, encoded, config)


def _with_stats(examples: PreparedData, model: TemplatedTokenizer, encoded: dict[str, EncodedList],
                config: RunConfig) -> EncodedData:
    stats = {split: length_stats(column(encs.table, "length"), config.max_seq_length)
             for split, encs in encoded.items()}
    report = {split: _report(encs.table) for split, encs in encoded.items()}
    warning = truncation_warning(report["train"], config.max_seq_length)
    if warning:
        log.warning(warning)
    return EncodedData(examples=examples, model=model, encoded=encoded, stats=stats, report=report, warning=warning)


def _report(table) -> dict:
    """`templates.encoding_report` of a split, from its summary columns: no token ids are read (`loss_kept` is the
    count of loss tokens in the labels)."""
    return combined_report(encoding_report(_summaries(batch))
                           for batch in table.select_columns(list(REPORT_FIELDS)).iter(batch_size=_REPORT_BATCH))


_REPORT_BATCH = 10_000  # encodings summarised at a time: a dict per encoding for 1M rows would take ~1 GB


def _summaries(batch: dict[str, list]) -> list[dict]:
    return [{name: batch[name][i] for name in REPORT_FIELDS if name != "block" or batch[name][i] is not None}
            for i in range(len(batch["length"]))]


# ---------------------------------------------------------------------------- encoding with datasets.map

def _encode_store(store: ExampleStore, model: TemplatedTokenizer, config: RunConfig):
    """(the encoded table, in the store's order, with `row`; [(row, problem)] of rows that could not be encoded).
    Read from the data cache when this data, tokenizer, template and settings were encoded before."""
    from datasets import Dataset, concatenate_datasets

    from . import data_cache, templates

    num_proc = _processes(len(store.table))
    if store.folder is None:
        table = _map_encode(store.table, model.tokenizer, config, store.source, num_proc, cache_file=None)
        return table, _errors(table)
    key = data_cache.cache_key("encoded", store.key, tokenizer_digest(model.tokenizer), model.template,
                               config.max_seq_length, config.train_on_prompt, config.train_on_reasoning,
                               data_cache.code_digest(templates),
                               data_cache.code_digest(sys.modules[__name__]), _library_versions())
    meta_file = store.folder / f"encoded-{key}.json"
    meta = data_cache.read_json(meta_file)
    if meta is not None and all((store.folder / name).is_file() for name in meta["files"]):
        table = concatenate_datasets([Dataset.from_file(str(store.folder / name)) for name in meta["files"]])
        return table, [tuple(error) for error in meta["errors"]]
    table = _map_encode(store.table, model.tokenizer, config, store.source, num_proc,
                        cache_file=str(store.folder / f"encoded-{key}.arrow"))
    errors = _errors(table)
    files = [os.path.basename(f["filename"]) for f in table.cache_files]
    data_cache.write_json(meta_file, {"files": files, "errors": errors})
    data_cache.prune(keep=store.folder)
    return table, errors


def _map_encode(table, tokenizer, config: RunConfig, source: str, num_proc: int | None, cache_file: str | None):
    """`encode_blocks` over the table's `example` column: one `datasets.map`, written to `cache_file` (or kept in
    memory), in `num_proc` processes. One output row per encoding (a document's blocks follow each other), each
    with its example's source `row`."""
    from datasets import Dataset, Features, List, Value

    features = Features({"row": Value("int64"), "input_ids": List(Value("int32")), "labels": List(Value("int32")),
                         "length": Value("int64"), "truncated": Value("bool"), "loss_tokens": Value("int64"),
                         "block": Value("int64"), "loss_kept": Value("int64"), "error": Value("string")})
    if not len(table):  # an empty split: `map` would return it without the new columns
        return Dataset.from_dict({name: [] for name in features}, features=features)
    if num_proc:
        # forked workers encode one example at a time: the tokenizers library's own threads add nothing there
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # both input columns are removed: a batch may come back with more rows than it had (documents' blocks)
    return table.map(_encode_batch, batched=True, batch_size=100, remove_columns=["row", "example"],
                     features=features,
                     fn_kwargs={"tokenizer": tokenizer, "max_seq_length": config.max_seq_length,
                                "train_on_prompt": config.train_on_prompt,
                                "train_on_reasoning": config.train_on_reasoning, "skip_invalid": config.skip_invalid,
                                "source": source},
                     num_proc=num_proc, cache_file_name=cache_file, keep_in_memory=cache_file is None,
                     load_from_cache_file=cache_file is not None, desc="encoding examples")


_NO_ENCODING = {"input_ids": [], "labels": [], "length": 0, "truncated": False, "loss_tokens": 0}  # an error's row


def _encode_batch(batch: dict, *, tokenizer, max_seq_length: int, train_on_prompt: bool, train_on_reasoning: bool,
                  skip_invalid: bool, source: str) -> dict:
    out: dict[str, list] = {name: [] for name in ("row", *ENCODED_FIELDS, "block", "loss_kept", "error")}
    for row, text in zip(batch["row"], batch["example"]):
        error = None
        try:
            encs = encode_blocks(json.loads(text), tokenizer, max_seq_length=max_seq_length,
                                 train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
        except ROW_ERRORS as e:
            if not skip_invalid:
                raise _row_error(e, source, row) from None
            encs, error = [_NO_ENCODING], str(e)
        for enc in encs:
            out["row"].append(row)
            for name in ENCODED_FIELDS:
                out[name].append(enc[name])
            out["block"].append(enc.get("block"))
            out["loss_kept"].append(loss_token_count(enc))
            out["error"].append(error)
    return out


def column(table, name: str) -> list:
    """One column of a `datasets.Dataset` as a list, read through Arrow in one go (the dataset's own column
    accessor reads row by row)."""
    return table.select_columns([name]).with_format("arrow")[:].column(name).to_pylist()


def _row_error(error: DataError, source: str, row: int) -> DataError:
    """The encoder's problem with one example, named by file and row as normalisation names its problems."""
    message = str(error)
    if not message.startswith(f"{source}, row "):
        message = f"{source}, row {row}: {message}{SKIP_HINT}"
    return DataError(message, source=source, row=row, field=getattr(error, "field", None))


def _errors(table) -> list[tuple[int, str]]:
    """(row, problem) of the examples that could not be encoded (recorded with `skip_invalid`)."""
    if table.data.column("error").null_count == len(table):
        return []
    return [(row, error) for row, error in zip(column(table, "row"), column(table, "error")) if error is not None]


def _row_problems(errors: list[tuple[int, str]], source: str, skip_invalid: bool) -> list[SkippedRow]:
    """Rows the encoder could not use, as skipped rows; without `skip_invalid`, the first one is an error (a cached
    encoding may hold them from a run that skipped)."""
    if errors and not skip_invalid:
        row, reason = errors[0]
        raise DataError(f"{source}, row {row}: {reason}{SKIP_HINT}", source=source, row=row)
    return [SkippedRow(row, reason) for row, reason in errors]


def _processes(examples: int) -> int | None:
    """Processes for encoding: one per available core, while each gets at least ROWS_PER_PROCESS examples."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = min(cores, examples // ROWS_PER_PROCESS)
    return n if n > 1 else None


def tokenizer_digest(tokenizer) -> str:
    """What of the tokenizer changes encodings: its vocabulary, merges, normaliser and special tokens (the fast
    tokenizer's serialised form, or the files of a slow one), and its chat template."""
    from . import data_cache

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token")}
    return data_cache.cache_key(state, specials, tokenizer.chat_template, type(tokenizer).__name__)


def _library_versions() -> dict[str, str]:
    """Libraries whose upgrade may change a rendering or a tokenization."""
    from importlib.metadata import version

    return {name: version(name) for name in ("transformers", "tokenizers", "jinja2", "datasets")}


__all__ = ["EncodedData", "EncodedList", "PREVIEW_SAMPLE", "TemplatedTokenizer", "load_templated_tokenizer",
           "prepare_data", "preview_data", "tokenizer_digest"]
