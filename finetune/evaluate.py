"""Base vs fine-tuned on a run's held-out split: loss, perplexity and an answer table with scores.

`evaluate_run` loads the base and the adapter once (`inference.ChatModel`), measures the loss with
the adapter off and on, generates both models' greedy answers to each prompt (with the example's tool schemas, placed
as in training), and writes `eval/answers.jsonl`, `eval/answers.csv` and `eval/summary.json` in the run folder.

Scores compare an answer with the reference answer after normalisation (lowercase, punctuation
removed, whitespace collapsed): exact match, token F1 (SQuAD-style bag-of-words overlap) and
ROUGE-L F1 (longest common subsequence of tokens). All three lie in [0, 1].
"""

from __future__ import annotations

import csv
import json
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import RunConfig
from .errors import DataError
from .run_folder import CONFIG_FILE, RunFolder
from .templates import IGNORE_INDEX, encode_example
from .train import perplexity

ProgressFn = Callable[[float, str], None]  # (fraction done 0..1, message)

SCORES = ("exact_match", "token_f1", "rouge_l")
ANSWER_COLUMNS = ("prompt", "reference", "base_answer", "finetuned_answer",
                  *(f"base_{s}" for s in SCORES), *(f"finetuned_{s}" for s in SCORES))


# ----------------------------------------------------------------------------- scores (pure)
def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation (ASCII and Unicode), collapse whitespace."""
    text = "".join(ch for ch in text.lower()
                   if ch not in string.punctuation and not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised texts are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of precision and recall of the shared tokens, counted with multiplicity."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)  # both empty: a perfect (empty) answer
    shared = sum((Counter(pred) & Counter(ref)).values())
    return _f1(shared / len(pred), shared / len(ref))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: precision and recall of the longest common token subsequence."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    return _f1(lcs / len(pred), lcs / len(ref))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence; O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def score_answer(prediction: str, reference: str) -> dict[str, float]:
    return {"exact_match": exact_match(prediction, reference), "token_f1": token_f1(prediction, reference),
            "rouge_l": rouge_l(prediction, reference)}


# ----------------------------------------------------------------------------- loss
@torch.inference_mode()
def split_loss(model, tokenizer, examples: list[dict], *, max_seq_length: int, batch_size: int = 4,
               train_on_prompt: bool = False) -> float:
    """Token-weighted mean cross-entropy (nats/token) over the loss-carrying tokens of `examples`.

    Same tokens, masks and truncation as training (`templates.encode_example`); examples left with no
    loss token are skipped, as in training. Every token counts equally, whatever its example's length.
    """
    encoded = [enc for enc in (encode_example(ex, tokenizer, max_seq_length=max_seq_length,
                                              train_on_prompt=train_on_prompt) for ex in examples)
               if any(label != IGNORE_INDEX for label in enc["labels"])]
    if not encoded:
        raise DataError(f"none of the {len(examples)} examples has an answer token within `max_seq_length` "
                        f"({max_seq_length}); raise `max_seq_length` or shorten the prompts")
    total_nats, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        ids, labels, mask = _pad_batch(encoded[start:start + batch_size], tokenizer.pad_token_id)
        device = model.device
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        # token t predicts token t+1
        nats = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 labels[:, 1:].reshape(-1).to(device),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        total_nats += float(nats)
        total_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return total_nats / total_tokens


def _pad_batch(batch: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (B, T) input ids, labels (IGNORE_INDEX on padding) and attention mask."""
    width = max(len(enc["input_ids"]) for enc in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, enc in enumerate(batch):
        n = len(enc["input_ids"])
        ids[row, :n] = torch.tensor(enc["input_ids"])
        labels[row, :n] = torch.tensor(enc["labels"])
        mask[row, :n] = 1
    return ids, labels, mask


# ----------------------------------------------------------------------------- prompts and answers
def prompt_and_reference(example: dict) -> tuple[list[dict], str] | None:
    """(turns before the last assistant turn, that turn's text), or None for a plain-text example."""
    messages = example.get("messages")
    if not isinstance(messages, list):
        return None
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or not any(m.get("role") == "user" for m in messages[:last]):
        return None
    return messages[:last], messages[last]["content"]


@dataclass(frozen=True)
class Question:
    """A held-out chat example as a question to answer: the turns before its last reply, that reply's text, and the
    example's tool schemas (None without), which the prompt carries as training did."""

    turns: list[dict]
    reference: str
    tools: list[dict] | None = None


def questions(examples: list[dict]) -> list[Question]:
    """The chat examples of `examples` as questions (`prompt_and_reference`); plain-text examples have none."""
    return [Question(*pair, tools=example.get("tools")) for example in examples
            if (pair := prompt_and_reference(example)) is not None]


def prompt_text(turns: list[dict]) -> str:
    """The prompt for the answer table: the user's text alone, or `role: text` lines for longer histories."""
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def answer_row(turns: list[dict], reference: str, base_answer: str, finetuned_answer: str) -> dict:
    row = {"prompt": prompt_text(turns), "reference": reference, "base_answer": base_answer,
           "finetuned_answer": finetuned_answer}
    for side, answer in (("base", base_answer), ("finetuned", finetuned_answer)):
        for name, value in score_answer(answer, reference).items():
            row[f"{side}_{name}"] = value
    return row


# ----------------------------------------------------------------------------- the run evaluation
def evaluate_run(run_dir: str | Path, *, split: str = "test", max_new_tokens: int = 128, limit: int | None = None,
                 progress: ProgressFn | None = None, chat=None) -> dict:
    """Compare base and fine-tuned model on `data/<split>.jsonl` of a run; write `eval/` and return the summary.

    The loss uses every example of the split; answers are generated (greedy, up to `max_new_tokens`
    tokens) for the first `limit` chat examples (all when None). Plain-text examples have no
    prompt/answer structure: they count in the loss only. `chat`: an already loaded `ChatModel` of
    this run, to reuse (the app keeps one).
    """
    from tqdm.auto import tqdm

    from .data import read_jsonl_examples
    from .inference import ChatModel, locate_run

    run = locate_run(run_dir)
    if run.run_dir is None:
        raise DataError(f"{run_dir} is an adapter folder without its run; evaluate the run folder (with "
                        f"{CONFIG_FILE} and data/), e.g. the folder above it")
    folder = RunFolder(run.run_dir)
    split_path = folder.split_file(split)
    examples = read_jsonl_examples(split_path)
    if not examples:
        raise DataError(f"{split_path} is empty: the run has no {split} examples; train with `test_fraction` > 0 "
                        "(0.1 is typical) or evaluate another split (`validation`)", source=str(split_path))
    asked = questions(examples)
    to_answer = asked[:limit] if limit is not None else asked
    chat = chat or ChatModel.from_run(run.run_dir)
    cfg = run.config or RunConfig()  # no config saved: training's defaults
    loss_settings = dict(max_seq_length=cfg.max_seq_length, batch_size=cfg.batch_size,
                         train_on_prompt=cfg.train_on_prompt)

    steps = 2 + 2 * len(to_answer)  # two loss passes, then two answers per example
    bar = tqdm(total=steps, desc=f"evaluating {split}", unit="step")
    done = 0

    def advance(message: str) -> None:
        nonlocal done
        done += 1
        bar.update(1)
        bar.set_postfix_str(message, refresh=False)
        if progress is not None:
            progress(done / steps, message)

    losses = {}
    for side, adapter in (("base", False), ("finetuned", True)):
        with chat.selected_model(adapter) as model:
            losses[side] = split_loss(model, chat.tokenizer, examples, **loss_settings)
        advance(f"{side} loss {losses[side]:.4f}")
    rows = []
    greedy = dict(max_new_tokens=max_new_tokens, temperature=0.0)
    for i, question in enumerate(to_answer, 1):
        base_answer = chat.generate(question.turns, adapter=False, tools=question.tools, **greedy)
        advance(f"answer {i}/{len(to_answer)} (base)")
        finetuned_answer = chat.generate(question.turns, adapter=True, tools=question.tools, **greedy)
        advance(f"answer {i}/{len(to_answer)} (fine-tuned)")
        rows.append(answer_row(question.turns, question.reference, base_answer, finetuned_answer))
    bar.close()

    summary = _summary(split, examples, rows, losses, chat, max_new_tokens, asked)
    write_eval_files(folder, rows, summary)
    return summary


def _summary(split: str, examples: list[dict], rows: list[dict], losses: dict[str, float], chat,
             max_new_tokens: int, asked: list[Question]) -> dict:
    summary = {"split": split, "examples": len(examples), "answered": len(rows),
               "text_examples_without_prompt": len(examples) - len(asked),
               "base_loss": losses["base"], "finetuned_loss": losses["finetuned"],
               "base_perplexity": perplexity(losses["base"]), "finetuned_perplexity": perplexity(losses["finetuned"]),
               "has_adapter": chat.has_adapter, "max_new_tokens": max_new_tokens, "decoding": "greedy"}
    for side in ("base", "finetuned"):
        for name in SCORES:
            key = f"{side}_{name}"
            summary[key] = sum(r[key] for r in rows) / len(rows) if rows else None
    return summary


def write_eval_files(run: RunFolder, rows: list[dict], summary: dict) -> None:
    """The run's eval/ folder: answers.jsonl (one object per row), answers.csv (ANSWER_COLUMNS) and summary.json."""
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    with run.answers_file.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with run.answers_csv.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ANSWER_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    run.eval_summary_file.write_text(json.dumps(summary, indent=2), encoding="utf-8")
