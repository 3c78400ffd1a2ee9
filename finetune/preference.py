"""Preference stages (`stage: dpo | kto | orpo`): preference rows → tokens → TRL's trainer for the stage → scores.

    start_run / start_model       `init_from`: the finished run a stage starts from (its adapter, or its model)
    prepare_preference_data       split the preference rows, unpair them for KTO, encode them with our template
    preference_trainer            TRL's DPOTrainer, KTOTrainer or (trl.experimental) ORPOTrainer on those rows
    preference_scores             preference accuracy and mean margin of a model on encoded rows
    stage_results                 what the run's results say about the stage (scores before → after, the stages)

The reference model of DPO and KTO is never a second copy of the weights: with LoRA/QLoRA it is the same model
with the adapter switched off (TRL does this when `ref_model` is None), or, with `init_from`, with a frozen copy of
the starting adapter switched on (TRL's `ref` adapter: a copy of the adapter only).

Rows reach TRL already tokenised by `templates.encode_example`, the encoder SFT uses: TRL's own tokenisation takes
as the answer everything rendering adds after the generation prompt, which for Qwen2.5's and Gemma-2's templates
includes the newline after the end-of-turn token; ours ends the answer at the end-of-turn token, as SFT's mask does.
"""

from __future__ import annotations

import bisect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .data import PreparedData, Splits, display_name
from .errors import ConfigError, DataError
from .run_folder import RunFolder
from .templates import IGNORE_INDEX, encode_example

# The reward metrics TRL logs per step (KTO logs no accuracies: its answers are unpaired); the metrics records carry
# them next to `train.METRIC_FIELDS`, and the validation ones with an `eval_` prefix.
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
METRIC_FIELDS = REWARD_METRICS + tuple(f"eval_{name}" for name in REWARD_METRICS)
TRAINER_NAMES = {"sft": "SFTTrainer", "dpo": "DPOTrainer", "kto": "KTOTrainer", "orpo": "ORPOTrainer"}
REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of a starting adapter


# ----------------------------------------------------------------------------- the starting point
def start_run(config: RunConfig) -> RunFolder | None:
    """The run `init_from` names, checked: a finished run on the same base, with the weights this method needs."""
    if not config.init_from:
        return None
    run = RunFolder(Path(config.init_from).expanduser())
    if not run.has_config:
        raise ConfigError(f"`init_from`: {config.init_from} is not a run folder (no {run.config_file.name}); give "
                          "the `output_dir` of a finished training run")
    earlier = run.read_config()
    weights = run.final_dir_for(config.method)
    if not weights.is_dir():
        kind = "a LoRA/QLoRA run (adapter/)" if config.method != "full" else "a full fine-tuning run (model/)"
        raise ConfigError(f"`init_from`: {config.init_from} has no {weights.name}/ folder; `method: "
                          f"{config.method}` starts from {kind}; finish that run first or pick another")
    if earlier.base_model != config.base_model and config.method != "full":
        raise ConfigError(f"`init_from`: {config.init_from} trained an adapter for `base_model: "
                          f"{earlier.base_model}`, but this stage has `base_model: {config.base_model}`; set "
                          f"`base_model: {earlier.base_model}`")
    if earlier.chat_template != config.chat_template:
        raise ConfigError(f"`init_from`: {config.init_from} used `chat_template: {earlier.chat_template}`, this "
                          f"stage `{config.chat_template}`; use the same prompt format in both stages")
    return run


def weights_path(config: RunConfig, base_path: str) -> str:
    """Where the stage's weights load from: the earlier run's model/ for a full fine-tune, else the base."""
    run = start_run(config)
    return str(run.model_dir) if run is not None and config.method == "full" else base_path


def start_model(config: RunConfig, model):
    """`model` (the loaded base) with `init_from`'s adapter on it, trainable; `model` itself when there is none."""
    run = start_run(config)
    if run is None or config.method == "full":
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(run.adapter_dir), is_trainable=True)


def remove_reference_adapter(final_dir: Path) -> None:
    """PEFT saves every adapter of a model; the frozen reference copy TRL adds is not part of the result."""
    shutil.rmtree(Path(final_dir) / REFERENCE_ADAPTER, ignore_errors=True)


# ----------------------------------------------------------------------------- data
@dataclass
class PreferenceData:
    """The stage's rows: preference rows per split, their encodings for TRL, and the answers SFT would learn."""

    kind: str                        # pairs ({prompt, chosen, rejected}) or kto ({prompt, completion, label})
    splits: Splits                   # preference rows per split (KTO: unpaired)
    encoded: dict[str, list[dict]]   # split → token rows for TRL (rows whose prompt fills max_seq_length left out)
    answers: Splits                  # normalised {"messages"} examples of the good answers: data/*.jsonl

    def dataset(self, split: str):
        """The split's encoded rows as a `datasets.Dataset`, or None when it has none."""
        from datasets import Dataset

        rows = self.encoded[split]
        return Dataset.from_list(rows) if rows else None

    def dropped(self, split: str) -> int:
        """Rows whose prompt alone fills `max_seq_length`: no answer token is left to compare."""
        return len(getattr(self.splits, split)) - len(self.encoded[split])


def prepare_preference_data(config: RunConfig, data: PreparedData, tokenizer) -> PreferenceData:
    """Split the preference rows of `data` as `config` says, unpair them for KTO, and encode each split."""
    kind = _stage_kind(config, data)
    from .data import split_examples

    splits = split_examples(data.preference_rows, eval_fraction=config.eval_fraction,
                            test_fraction=config.test_fraction, seed=config.seed)
    if config.stage == "kto" and kind == "pairs":  # split first, so a pair's two answers stay in one split
        splits = Splits(*(unpair(getattr(splits, s)) for s in ("train", "validation", "test")),
                        duplicates_removed=splits.duplicates_removed)
        kind = "kto"
    encode = encode_pair if kind == "pairs" else encode_unpaired
    encoded = {}
    for split, rows in splits.as_dict().items():
        encs = (encode(row, tokenizer, config.max_seq_length) for row in rows)
        encoded[split] = [enc for enc in encs if enc is not None]
    if not encoded["train"]:
        raise DataError(f"no training row has an answer token left within `max_seq_length` "
                        f"({config.max_seq_length}); raise `max_seq_length` or shorten the prompts")
    answers = Splits(*(good_answers(getattr(splits, s)) for s in ("train", "validation", "test")))
    return PreferenceData(kind=kind, splits=splits, encoded=encoded, answers=answers)


def _stage_kind(config: RunConfig, data: PreparedData) -> str:
    """The kind of preference rows `data` holds, checked against what the stage learns from."""
    source = data.source
    if data.preference is None:
        raise DataError(f"`stage: {config.stage}` learns from preferences, but {source} holds plain examples (no "
                        "`chosen`/`rejected` columns and no true/false `label`); give rows such as {\"prompt\": ..., "
                        "\"chosen\": ..., \"rejected\": ...}, or use `stage: sft`", source=source, field="stage")
    if data.preference == "kto" and config.stage != "kto":
        raise DataError(f"`stage: {config.stage}` learns from chosen/rejected pairs, but {source} holds answers "
                        "labelled true/false; use `stage: kto`, or give pairs", source=source, field="stage")
    if not data.preference_rows:
        raise DataError(f"{source} has no complete preference row left to learn from", source=source)
    return data.preference


def unpair(rows: list[dict]) -> list[dict]:
    """Pairs → KTO rows: the chosen answer labelled true, the rejected one false."""
    out = []
    for row in rows:
        extra = {"tools": row["tools"]} if "tools" in row else {}
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True, **extra})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False, **extra})
    return out


def good_answers(rows: list[dict]) -> list[dict]:
    """The normalised examples SFT would learn from `rows`: each prompt with its chosen (or label-true) answer."""
    out = []
    for row in rows:
        answer = row.get("chosen") or (row["completion"] if row.get("label") else None)
        if answer:
            out.append({"messages": row["prompt"] + answer, **({"tools": row["tools"]} if "tools" in row else {})})
    return out


def _answer_span(prompt: list[dict], answer: list[dict], tools: list | None, tokenizer) -> tuple[list[int], int, int]:
    """(token ids of prompt + answer, start, end) where ids[start:end] is the answer with its end-of-turn tokens,
    exactly the tokens SFT's loss mask keeps for that reply (earlier assistant turns in the prompt are context)."""
    example = {"messages": prompt + answer, **({"tools": tools} if tools else {})}
    enc = encode_example(example, tokenizer, max_seq_length=2**62)
    labels = enc["labels"]
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:  # the newline after the end-of-turn token carries no loss
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return enc["input_ids"], start, end


def encode_pair(row: dict, tokenizer, max_length: int) -> dict | None:
    """{prompt_ids, chosen_ids, rejected_ids} as TRL's DPO collator takes them; None when the prompt alone fills
    `max_length`. Answers are cut so that prompt + answer fits `max_length`."""
    chosen, c_start, c_end = _answer_span(row["prompt"], row["chosen"], row.get("tools"), tokenizer)
    rejected, r_start, r_end = _answer_span(row["prompt"], row["rejected"], row.get("tools"), tokenizer)
    cut = min(c_start, r_start, _common_prefix(chosen, rejected))  # below it both sequences are the same prompt
    if cut >= max_length or c_end <= cut or r_end <= cut:
        return None
    room = max_length - cut
    return {"prompt_ids": chosen[:cut], "chosen_ids": chosen[cut:c_end][:room],
            "rejected_ids": rejected[cut:r_end][:room]}


def encode_unpaired(row: dict, tokenizer, max_length: int) -> dict | None:
    """{prompt_ids, completion_ids, label} as TRL's KTO collator takes them; None when the prompt fills `max_length`."""
    ids, start, end = _answer_span(row["prompt"], row["completion"], row.get("tools"), tokenizer)
    if start >= max_length or end <= start:
        return None
    return {"prompt_ids": ids[:start], "completion_ids": ids[start:end][:max_length - start], "label": row["label"]}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def write_preference_splits(data: PreferenceData, run: RunFolder) -> None:
    """data/preference_<split>.jsonl: the preference rows of each split, as the stage used them."""
    for split, rows in data.splits.as_dict().items():
        path = run.preference_split_file(split)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


# ----------------------------------------------------------------------------- trainers
def preference_trainer(config: RunConfig, *, model, training_args: dict[str, Any], data: PreferenceData, tokenizer,
                       peft_config, callbacks):
    """TRL's trainer for `config.stage` on `data`'s encoded rows. `training_args` are the TrainingArguments the
    SFT path uses too (schedule, precision, logging, saving); `peft_config` is None when `model` already has its
    adapter (`init_from`)."""
    stage_args = {"beta": config.beta, "max_length": config.max_seq_length}
    if config.stage == "orpo":
        from trl.experimental.orpo import ORPOConfig

        args = ORPOConfig(**training_args, **stage_args)
        return _orpo_class()(model=model, args=args, train_dataset=_orpo_rows(data.dataset("train")),
                     eval_dataset=_orpo_rows(data.dataset("validation")), processing_class=tokenizer,
                     peft_config=peft_config, callbacks=callbacks)
    if config.stage == "kto":
        from trl import KTOConfig

        args = KTOConfig(**training_args, **stage_args, loss_type=config.loss_type or "kto")
        trainer_class = _kto_class()
    else:
        from trl import DPOConfig

        args = DPOConfig(**training_args, **stage_args, loss_type=[config.loss_type or "sigmoid"])
        trainer_class = _dpo_class()
    return trainer_class(model=model, args=args, train_dataset=data.dataset("train"),
                         eval_dataset=data.dataset("validation"), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)


def _dpo_class():
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer on rows already encoded by `encode_pair` (TRL's own step would re-tokenise them)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PretokenizedDPOTrainer


def _kto_class():
    from trl import KTOTrainer

    class PretokenizedKTOTrainer(KTOTrainer):
        """TRL's KTOTrainer on rows encoded by `encode_unpaired`; it still adds the mismatched answers KTO's KL
        term is estimated from, as its own preparation does (each answer moved one row on within a batch)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset

            def rotate(batch):
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

    return PretokenizedKTOTrainer


def _orpo_class():
    from trl.experimental.orpo import ORPOTrainer

    class PretokenizedORPOTrainer(ORPOTrainer):
        """trl.experimental's ORPOTrainer on rows from `_orpo_rows` (its `tokenize_row` would re-tokenise them)."""

        def tokenize_row(self, feature, model=None):
            return feature

    return PretokenizedORPOTrainer


def _orpo_rows(dataset):
    """`encode_pair` rows in the legacy column layout ORPO's collator pads: full sequences with labels (-100 on
    the prompt) and attention masks."""
    if dataset is None:
        return None

    def layout(row):
        prompt = row["prompt_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            answer = row[f"{side}_ids"]
            out[f"{side}_input_ids"] = prompt + answer
            out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
            out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
        return out

    return dataset.map(layout, remove_columns=dataset.column_names)


# ----------------------------------------------------------------------------- scores
def answer_logps(model, rows: list[tuple[list[int], list[int]]], *, batch_size: int = 8) -> list[float]:
    """log p(answer | prompt) under `model` for each (prompt_ids, answer_ids): the sum over the answer's tokens,
    in nats, as DPO and KTO compare answers."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            width = max(len(p) + len(a) for p, a in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)           # (B, T), right-padded
            attention = torch.zeros(len(batch), width, dtype=torch.long)
            answer = torch.zeros(len(batch), width, dtype=torch.bool)        # True on answer tokens
            for j, (p, a) in enumerate(batch):
                ids[j, :len(p) + len(a)] = torch.tensor(p + a)
                attention[j, :len(p) + len(a)] = 1
                answer[j, len(p):len(p) + len(a)] = True
            ids, attention, answer = ids.to(device), attention.to(device), answer.to(device)
            logits = model(input_ids=ids, attention_mask=attention).logits.float()  # (B, T, V)
            token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            out += (token_logps * answer[:, 1:]).sum(1).tolist()
    model.train(was_training)
    return out


def preference_scores(model, rows: list[dict], *, batch_size: int = 8) -> dict[str, Any]:
    """Preference accuracy and mean margin (nats) of `model` on encoded rows (`encode_pair` or `encode_unpaired`).

    Pairs: accuracy is the share of pairs whose chosen answer is more likely than the rejected one, the margin the
    mean of log p(chosen) - log p(rejected). KTO rows: accuracy is the share of (good, bad) answer combinations in
    which the good one is more likely, the margin mean log p(good) - mean log p(bad). None where nothing compares.
    """
    if not rows:
        return {"rows": 0, "accuracy": None, "margin": None}
    if "chosen_ids" in rows[0]:
        seqs = [(r["prompt_ids"], r["chosen_ids"]) for r in rows] + [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
        logps = answer_logps(model, seqs, batch_size=batch_size)
        diffs = [c - r for c, r in zip(logps[:len(rows)], logps[len(rows):])]
        return {"rows": len(rows), "accuracy": sum(d > 0 for d in diffs) / len(diffs),
                "margin": sum(diffs) / len(diffs)}
    logps = answer_logps(model, [(r["prompt_ids"], r["completion_ids"]) for r in rows], batch_size=batch_size)
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = sorted(lp for lp, r in zip(logps, rows) if not r["label"])
    if not good or not bad:
        return {"rows": len(rows), "accuracy": None, "margin": None}
    wins = sum(bisect.bisect_left(bad, g) for g in good)  # bad answers strictly less likely than each good one
    return {"rows": len(rows), "accuracy": wins / (len(good) * len(bad)),
            "margin": sum(good) / len(good) - sum(bad) / len(bad)}


def held_out_rows(data: PreferenceData) -> tuple[str, list[dict]]:
    """The split the results compare before → after: test, else validation (empty when neither has rows)."""
    split = "test" if data.encoded["test"] or not data.encoded["validation"] else "validation"
    return split, data.encoded[split]


# ----------------------------------------------------------------------------- results
def stage_results(config: RunConfig, data: PreferenceData, before: dict, after: dict, split: str,
                  dataset_source: str) -> dict[str, Any]:
    """The results' preference entries. Losses of a preference stage are not per-token cross-entropies, so the
    perplexities train.py derives from them are left out (null)."""
    return {
        "stage": config.stage, "stages": stages(config, dataset_source),
        "preference": {"kind": data.kind, "split": split, "rows": after["rows"], "beta": config.beta,
                       "loss_type": config.loss_type or {"dpo": "sigmoid", "kto": "kto"}.get(config.stage, "orpo"),
                       "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                       "margin_before": before["margin"], "margin_after": after["margin"]},
        "train_perplexity": None, "eval_perplexity": None,
        "test_perplexity_before": None, "test_perplexity_after": None,
    }


def stages(config: RunConfig, dataset_source: str) -> list[dict[str, Any]]:
    """The stages that produced this run's weights, oldest first: `init_from`'s, then this one. Each names its
    stage, its TRL trainer, its dataset and where that came from (hub | file | rows), for the model card."""
    earlier: list[dict[str, Any]] = []
    if config.init_from:
        run = RunFolder(Path(config.init_from).expanduser())
        results = run.read_results() or {}
        earlier = results.get("stages") or [_stage_entry(run.read_config(), (results.get("data") or {}).get(
            "dataset_source", "file"))]
    return earlier + [_stage_entry(config, dataset_source)]


def _stage_entry(config: RunConfig, dataset_source: str) -> dict[str, Any]:
    return {"stage": config.stage, "trainer": TRAINER_NAMES[config.stage],
            "dataset": config.dataset if dataset_source == "hub" else display_name(config.dataset or "rows"),
            "dataset_source": dataset_source}


__all__ = ["METRIC_FIELDS", "REWARD_METRICS", "PreferenceData", "answer_logps", "encode_pair", "encode_unpaired",
           "good_answers", "held_out_rows", "prepare_preference_data", "preference_scores", "preference_trainer",
           "remove_reference_adapter", "stage_results", "stages", "start_model", "start_run", "unpair",
           "weights_path", "write_preference_splits"]
