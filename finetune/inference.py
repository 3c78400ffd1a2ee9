"""Chat with a trained run: one base copy in memory, the adapter switched on (fine-tuned) or off (base).

`ChatModel.from_run(run_dir)` finds the base model and the adapter (or, for a full fine-tune, the
`model/` folder) of a run, loads them once, and answers chat messages with `generate` (whole text)
or `stream` (text chunks as they are produced). `adapter=False` answers as the base model by
disabling the LoRA layers for that call (`PeftModel.disable_adapter`): no second copy of the base.

`stream_both` answers as base and fine-tuned at once for the compare view: one batched `generate` over the
one copy of the weights, row 0 with the adapter off and row 1 with it on (PEFT's mixed-adapter batches), so
both panes grow together. On CPU its linear layers take the few rows of each decoding step weight-major
(`finetune.speed.decode_linears`: F.linear's values, a faster kernel; `weight_major=False` switches it off).

A full fine-tune has no adapter to switch off, so `ChatModel` then holds two models (base and
fine-tuned) and `has_adapter` is False; memory doubles. That is the only case with two copies, and there
`stream_both` answers with one model after the other.

The prompt is built by `templates.prompt_ids` with the tokenizer saved next to the adapter, which
carries the chat template used in training; a conversation's tool schemas (`tools=`) go in as training put them.
Generation stops at the EOS ids of the generation config, the tokenizer's EOS token and `<|im_end|>`.

`describe_tool_calls` reads the tool calls an answer makes (`<tool_call>` JSON, as Qwen2.5's template and the
built-in tool format write them; or a bare JSON call, as Llama 3.1 and Mistral write them) for display.

Calls are serialised by a lock: switching the adapter off for one caller must not change what a
concurrent caller's generation sees.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .config import RunConfig
from .errors import ModelError
from .run_folder import CONFIG_FILE, STATUS_FILE, RunFolder, read_json_object
from .speed.decode_linears import log_stock_path, weight_major_linears

END_OF_TURN = "<|im_end|>"  # ChatML's end of turn; also a stop token when the vocabulary has it
BASE_ROW = "__base__"  # PEFT's adapter name for "no adapter" in a mixed-adapter batch (peft/tuners/lora/model.py)

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PaneText:
    """One side of a compare answer as it grows (`ChatModel.stream_both` yields a base and a fine-tuned one)."""

    text: str    # the whole answer so far, not a chunk
    tokens: int  # tokens generated for it so far, its end-of-turn token included
    done: bool   # it ended its turn, reached max_new_tokens, or generation stopped


# ----------------------------------------------------------------------------- where a run's pieces are
@dataclass(frozen=True)
class TrainedRun:
    """The parts of a finished run that inference and merging need."""

    run_dir: Path | None        # the run folder (None: a bare adapter folder given on its own)
    base_path: str              # local folder or Hub id of the base model
    adapter_dir: Path | None    # LoRA/QLoRA: the PEFT adapter (+ tokenizer)
    model_dir: Path | None      # full fine-tune: the standalone model (+ tokenizer)
    config: RunConfig | None    # the run's config, when there is one

    @property
    def method(self) -> str:
        if self.model_dir is not None:
            return "full"
        return self.config.method if self.config is not None else "lora"

    @property
    def trained_in_4bit(self) -> bool:
        return bool(self.config and self.config.load_in_4bit)

    @property
    def tokenizer_dir(self) -> Path:
        """The folder whose tokenizer carries the chat template used in training (the base's if none was saved)."""
        folder = self.adapter_dir or self.model_dir
        return folder if (folder / "tokenizer_config.json").is_file() else Path(self.base_path)

    @property
    def chat_template_choice(self) -> str | None:
        """None when the run saved its tokenizer (template included); else the `chat_template` to apply again."""
        if self.tokenizer_dir != Path(self.base_path):
            return None
        return self.config.chat_template if self.config is not None else "auto"


def locate_run(path: str | Path) -> TrainedRun:
    """Find adapter or full model, run config and base model of a run folder (or of its adapter/ folder)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"run folder not found: {p}; give a run folder (with {CONFIG_FILE} and adapter/ or model/) "
                         "or an adapter folder (with adapter_config.json)")
    here, parent = RunFolder(p), RunFolder(p.parent)
    adapter_dir = model_dir = None
    if (p / "adapter_config.json").is_file():
        adapter_dir, run_dir = p, (p.parent if parent.has_config else None)
    elif (here.adapter_dir / "adapter_config.json").is_file():
        adapter_dir, run_dir = here.adapter_dir, p
    elif (here.model_dir / "config.json").is_file():
        model_dir, run_dir = here.model_dir, p
    elif p == parent.model_dir and (p / "config.json").is_file() and parent.has_config:
        model_dir, run_dir = p, p.parent
    elif here.has_config:
        raise ModelError(f"{p} has {CONFIG_FILE} but neither adapter/ nor model/: the run hasn't finished training "
                         f"(see its {STATUS_FILE}); wait for it, or resume it with `resume_from_checkpoint: latest`")
    else:
        raise ModelError(f"no adapter_config.json in {p}; point to a run folder or its adapter/ subfolder")
    run = RunFolder(run_dir) if run_dir is not None else None
    config = run.read_config() if run is not None and run.has_config else None
    results = (run.read_results() or {}) if run is not None else {}
    base = _base_model_path(adapter_dir or model_dir, adapter_dir is not None, config, results)
    return TrainedRun(run_dir=run_dir, base_path=base, adapter_dir=adapter_dir, model_dir=model_dir, config=config)


def _base_model_path(trained_dir: Path, is_adapter: bool, config: RunConfig | None, results: dict) -> str:
    """Prefer a base that exists on this machine: the run's results' resolved path, then the adapter's record,
    then the run config's `base_model` (which may be `demo` or a Hub id)."""
    from .demo import demo_model_path
    from .models import HUB_ID, resolve_base_model

    recorded = [results.get("base_model_path")]
    if is_adapter:
        recorded.append((read_json_object(trained_dir / "adapter_config.json") or {}).get("base_model_name_or_path"))
    for candidate in recorded:
        if candidate and (Path(candidate) / "config.json").is_file():
            return str(candidate)
    if results.get("is_demo_model"):  # trained on the demo model, whose cache folder has moved since
        return str(demo_model_path())
    if config is not None:
        # No silent fallback to the demo model: an adapter only fits the base it was trained on.
        return resolve_base_model(config.replace(offline_fallback=False)).path
    hub_ids = [c for c in recorded if c and HUB_ID.fullmatch(c)]
    if hub_ids:
        return hub_ids[0]
    missing = [c for c in recorded if c]
    why = f"{missing[0]} doesn't exist any more" if missing else "nothing records it"
    raise ModelError(f"can't find the base model that {trained_dir} was trained from: {why}, and there is no "
                     f"{CONFIG_FILE} beside it; point to the run folder, or put the base model back in place")


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids that end an answer: the generation config's EOS ids, the tokenizer's EOS and `<|im_end|>`."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.extend([configured] if isinstance(configured, int) else list(configured))
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if END_OF_TURN in tokenizer.get_vocab():
        ids.append(tokenizer.convert_tokens_to_ids(END_OF_TURN))
    return list(dict.fromkeys(ids))  # unique, in order


# ----------------------------------------------------------------------------- the chat model
class ChatModel:
    """A base model loaded once, with an optional LoRA adapter that each call switches on or off."""

    def __init__(self, base_path: str, adapter_path: str | Path | None = None, *,
                 finetuned_path: str | Path | None = None, tokenizer_path: str | Path | None = None,
                 load_in_4bit: bool = False, precision: str = "auto", revision: str | None = None,
                 trust_remote_code: bool = False, system_prompt: str | None = None, chat_template: str | None = None,
                 weight_major: bool = True):
        """`adapter_path`: a PEFT adapter folder; `finetuned_path`: a full fine-tune's model folder (then the
        base is loaded a second time, for `adapter=False`). At most one of the two. `tokenizer_path`
        defaults to the adapter/fine-tuned folder (it carries the training chat template), else the base.
        `system_prompt` is added to conversations that have none (the run's `system_prompt`). `chat_template`
        (auto | tokenizer | chatml | alpaca) replaces the tokenizer's template, as in training; None keeps it.
        `weight_major`: batched decoding steps run their linear layers weight-major where that is measured (CPU,
        fp32); False keeps PyTorch's stock path everywhere."""
        from .models import load_base_model, load_tokenizer, resolve_precision

        if adapter_path is not None and finetuned_path is not None:
            raise ModelError("give either an adapter folder or a fully fine-tuned model folder, not both")
        self.base_path = str(base_path)
        self.default_system_prompt = system_prompt
        precision = resolve_precision(precision)
        load = dict(load_in_4bit=load_in_4bit, precision=precision, revision=revision,
                    trust_remote_code=trust_remote_code)
        tok_dir = tokenizer_path or adapter_path or finetuned_path or base_path
        self.tokenizer = load_tokenizer(str(tok_dir), trust_remote_code=trust_remote_code)  # sets a pad token
        if chat_template is not None:
            from .templates import apply_template_choice

            apply_template_choice(self.tokenizer, chat_template)
        self.model = load_base_model(self.base_path, **load)
        self._finetuned = None
        if adapter_path is not None:
            self.model = attach_adapter(self.model, Path(adapter_path))
        elif finetuned_path is not None:
            self._finetuned = load_base_model(str(finetuned_path), **{**load, "revision": None}).eval()
        self.model.eval()
        self.weight_major = weight_major
        if weight_major:
            log_stock_path(self.model)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, *, load_in_4bit: bool | None = None) -> ChatModel:
        """Load a run's base + adapter (or base + full fine-tune). `load_in_4bit=None`: as it was trained."""
        run = locate_run(run_dir)
        config = run.config
        return cls(run.base_path, run.adapter_dir, finetuned_path=run.model_dir, tokenizer_path=run.tokenizer_dir,
                   load_in_4bit=run.trained_in_4bit if load_in_4bit is None else load_in_4bit,
                   precision=config.precision if config else "auto",
                   revision=config.model_revision if config else None,
                   trust_remote_code=bool(config and config.trust_remote_code),
                   system_prompt=config.system_prompt if config else None,
                   chat_template=run.chat_template_choice)

    @property
    def has_adapter(self) -> bool:
        """True when base and fine-tuned answers come from one model copy with a LoRA adapter."""
        from peft import PeftModel

        return isinstance(self.model, PeftModel)

    @property
    def has_finetuned(self) -> bool:
        """True when `adapter=True` answers differ from the base: an adapter or a full fine-tune is loaded."""
        return self.has_adapter or self._finetuned is not None

    @property
    def answers_together(self) -> bool:
        """True when `stream_both` generates base and fine-tuned answers in one batched pass (see there)."""
        return self.has_adapter and _mixes_adapters_in_a_batch(self.model)

    @contextmanager
    def selected_model(self, adapter: bool = True) -> Iterator[torch.nn.Module]:
        """Hold the lock and yield the model answering as fine-tuned (`adapter=True`) or as the base.

        Don't call `generate`/`stream` inside the block: the lock is not re-entrant.
        """
        with self._lock:
            if self.has_adapter and not adapter:
                with self.model.disable_adapter():
                    yield self.model
            elif self._finetuned is not None and adapter:
                yield self._finetuned
            else:
                yield self.model

    # --- generation
    def generate(self, messages: Messages | str, *, adapter: bool = True, max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0,
                 seed: int | None = None, system_prompt: str | None = None, tools: list[dict] | None = None) -> str:
        """The assistant's answer to `messages` (a conversation ending with a user turn, or one user text), with the
        tool schemas `tools` (as an example's `tools`) if given.

        `temperature` 0 means greedy decoding (then top_p, top_k and seed don't matter).
        """
        input_ids = self._prompt_tensor(messages, system_prompt, tools)
        settings = self._generation_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        with self.selected_model(adapter) as model, self._decoding(model), torch.inference_mode():
            _seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **settings)
        new_tokens = out[0, input_ids.shape[1]:]  # (T_new,)
        return _cut_at_end_marker(self.tokenizer.decode(new_tokens, skip_special_tokens=True))

    def stream(self, messages: Messages | str, *, adapter: bool = True, max_new_tokens: int = 256,
               temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.0,
               seed: int | None = None, system_prompt: str | None = None,
               tools: list[dict] | None = None) -> Iterator[str]:
        """Like `generate`, yielding text chunks as tokens are produced; the chunks join to `generate`'s text.

        Generation runs in a worker thread. Closing the iterator early (the user pressed Stop) stops
        generation at the next token.
        """
        from transformers import TextIteratorStreamer

        input_ids = self._prompt_tensor(messages, system_prompt, tools)
        settings = self._generation_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with self._generating_in_background(streamer, adapter=adapter, seed=seed, input_ids=input_ids,
                                            attention_mask=torch.ones_like(input_ids), **settings):
            yield from _until_end_marker(streamer)

    def stream_both(self, base_messages: Messages | str, finetuned_messages: Messages | str | None = None, *,
                    max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9, top_k: int = 50,
                    repetition_penalty: float = 1.0, seed: int | None = None, system_prompt: str | None = None,
                    tools: list[dict] | None = None) -> Iterator[tuple[PaneText, PaneText]]:
        """The base and the fine-tuned answer as they grow: yields (base, fine-tuned) after each token.

        `finetuned_messages` defaults to `base_messages` (each compare pane may keep its own history).
        When `answers_together`, one batched `generate` over the one copy of the weights answers both:
        row 0 with the adapter off (PEFT's `__base__`), row 1 with it on; each row stops at its own end of
        turn while the other goes on. Greedy answers equal `generate(adapter=False)` and `generate(adapter=True)`
        (up to floating-point differences between batch shapes, which in bf16 can flip a near-tie); sampled
        ones come from the same distributions, but the batch draws random numbers for both rows, so they are
        not the draws one-at-a-time calls with the same seed make.
        Otherwise (a full fine-tune: two different models; or an adapter PEFT can't mix in a batch, e.g.
        DoRA) the base answer is generated first, then the fine-tuned one. Closing the iterator stops generation.
        """
        settings = self._generation_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty)
        conversations = [base_messages, base_messages if finetuned_messages is None else finetuned_messages]
        if self.answers_together:
            inputs = self._prompt_batch(conversations, system_prompt, tools)  # (2, T_prompt), left-padded
            names = [BASE_ROW, self.model.active_adapter]
            for base, finetuned in self._stream_rows(inputs, adapter=True, seed=seed, adapter_names=names,
                                                     **settings):
                yield base, finetuned
            return
        base = PaneText("", 0, False)
        for (base,) in self._stream_rows(self._prompt_batch(conversations[:1], system_prompt, tools), adapter=False,
                                         seed=seed, **settings):
            yield base, PaneText("", 0, False)
        for (finetuned,) in self._stream_rows(self._prompt_batch(conversations[1:], system_prompt, tools), adapter=True,
                                              seed=seed, **settings):
            yield base, finetuned

    def _stream_rows(self, inputs: dict, *, adapter: bool, seed: int | None, **generate_kwargs
                     ) -> Iterator[tuple[PaneText, ...]]:
        """Each row's answer as it grows, from one `generate` over the rows of `inputs`."""
        streamer = _RowStreamer()
        with self._generating_in_background(streamer, adapter=adapter, seed=seed, **inputs, **generate_kwargs):
            yield from _grow_panes(streamer, self.tokenizer, self.stop_ids, rows=inputs["input_ids"].shape[0])

    @contextmanager
    def _generating_in_background(self, streamer, *, adapter: bool, seed: int | None, **generate_kwargs):
        """Run `generate` (feeding `streamer`) in a worker thread while the caller reads the streamer.

        On leaving the block (the answer is complete, or the caller closed its iterator: the user pressed
        Stop) generation stops at the next token, the worker is joined and its error, if any, re-raised here.
        """
        from transformers import StoppingCriteriaList

        cancelled = threading.Event()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with self.selected_model(adapter) as model, self._decoding(model), torch.inference_mode():
                    _seed(seed)
                    model.generate(streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancel(cancelled)]),
                                   **generate_kwargs)
            except BaseException as e:  # re-raised in the caller's thread below
                failure.append(e)
                streamer.end()  # wake the consumer

        worker = threading.Thread(target=work, name="chatmodel-stream", daemon=True)
        worker.start()
        try:
            yield
        finally:
            cancelled.set()
            worker.join()
        if failure:
            raise failure[0]

    # --- helpers
    def _decoding(self, model):
        """The context `generate` runs in: weight-major linear layers for batched steps, unless switched off."""
        return weight_major_linears(model) if self.weight_major else nullcontext()

    def prompt_ids(self, messages: Messages | str, *, system_prompt: str | None = None,
                   tools: list[dict] | None = None) -> list[int]:
        """The token ids an answer to `messages` follows: the run's system prompt added when the conversation has
        none, and the tool schemas `tools` placed as in training (the template's own `tools=` support, or the
        built-in format in the system text), so a tool example's prompt is the one its reply was trained after."""
        from .templates import prompt_ids

        conversation = with_system_prompt(messages, system_prompt or self.default_system_prompt)
        return prompt_ids(conversation, self.tokenizer, tools)

    def _prompt_tensor(self, messages: Messages | str, system_prompt: str | None,
                       tools: list[dict] | None = None) -> torch.Tensor:
        ids = self.prompt_ids(messages, system_prompt=system_prompt, tools=tools)
        return torch.tensor([ids], dtype=torch.long, device=self.model.device)  # (1, T_prompt)

    def _prompt_batch(self, conversations: list[Messages | str], system_prompt: str | None,
                      tools: list[dict] | None = None) -> dict:
        """`input_ids` and `attention_mask` (B, T_prompt) for several prompts (all with `tools`), left-padded so that
        every row's answer starts at the same position."""
        rows = [self.prompt_ids(messages, system_prompt=system_prompt, tools=tools) for messages in conversations]
        batch = self.tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt")
        return {key: batch[key].to(self.model.device) for key in ("input_ids", "attention_mask")}

    def _generation_settings(self, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                             repetition_penalty: float) -> dict:
        from transformers import GenerationConfig

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None,
            top_k=top_k if sample else None, repetition_penalty=repetition_penalty,
            eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id,
        )
        return {"generation_config": config}


def with_system_prompt(messages: Messages | str, system_prompt: str | None) -> Messages:
    """`messages` as a list, with `system_prompt` as the first turn if given and there is no system turn. It ends with
    what the assistant answers: a user turn, or a tool result (a tool row's last reply follows one)."""
    conversation = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
    if not conversation or conversation[-1].get("role") not in ("user", "tool"):
        raise ValueError("the conversation must end with a user turn or a tool result (the one to answer)")
    if system_prompt and conversation[0].get("role") != "system":
        conversation.insert(0, {"role": "system", "content": system_prompt})
    return conversation


def attach_adapter(base, adapter_dir: Path):
    """Wrap `base` (in place: no copy of its weights) with the PEFT adapter saved in `adapter_dir`."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except Exception as e:  # most often: the adapter was trained on another base model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load the adapter in {adapter_dir} onto its base model: {first}; check that "
                         "the run's base model is the one it was trained on") from None


def _mixes_adapters_in_a_batch(model) -> bool:
    """Whether PEFT can run the adapter on some rows of a batch and not others (`generate(adapter_names=...)`).

    PEFT raises for DoRA, for LoRA on `nn.MultiheadAttention` and on raw parameters (`target_parameters`),
    and with merged adapters (`ChatModel` never merges).
    """
    from peft.tuners.lora.layer import LoraLayer, MultiheadAttention, ParamWrapper

    if any(getattr(config, "use_dora", False) for config in model.peft_config.values()):
        return False
    return not any(isinstance(m, (MultiheadAttention, ParamWrapper)) or (isinstance(m, LoraLayer) and m.merged)
                   for m in model.modules())


_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def tool_calls_in(answer: str) -> list[dict]:
    """The tool calls in a model's answer, as {"name", "arguments"} (None where a call isn't valid JSON, with its
    `text`): each `<tool_call>` block, or else the whole answer when it is a JSON call or a list of them."""
    blocks = _TOOL_CALL_BLOCK.findall(answer)
    if not blocks:
        parsed = _json_or_none(answer.strip())
        calls = parsed if isinstance(parsed, list) else [parsed]
        return [_call(c) for c in calls] if all(_looks_like_call(c) for c in calls) and calls else []
    calls = []
    for block in blocks:
        parsed = _json_or_none(block)
        calls.append(_call(parsed) if _looks_like_call(parsed) else {"name": None, "arguments": None, "text": block})
    return calls


def describe_tool_calls(answer: str) -> list[str]:
    """One line per tool call in `answer`, for chat and compare output: `tool call: name({"arg": ...})`."""
    lines = []
    for call in tool_calls_in(answer):
        if call["name"] is None:
            lines.append(f"tool call that is not valid JSON: {call['text']}")
        else:
            lines.append(f"tool call: {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})")
    return lines


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _looks_like_call(value) -> bool:
    return isinstance(value, dict) and isinstance(value.get("name"), str) and (
        "arguments" in value or "parameters" in value)


def _call(value: dict) -> dict:
    return {"name": value["name"], "arguments": value.get("arguments", value.get("parameters"))}


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)  # seeds CPU and all CUDA devices


class _Cancel:
    """Stopping criterion: stop every sequence once `event` is set (the stream's consumer went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _RowStreamer:
    """A `generate` streamer that queues each decoding step's new token ids, one per row, for another thread.

    transformers' `TextStreamer`/`TextIteratorStreamer` take batch size 1 only (`put` raises on more rows).
    """

    def __init__(self):
        self.steps: queue.Queue[list[int] | None] = queue.Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # `generate` first puts the prompt, (B, T_prompt)
            self.prompt_seen = True
            return
        self.steps.put(value.tolist())  # (B,): one new token per row

    def end(self) -> None:
        self.steps.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (step := self.steps.get()) is not None:
            yield step


def _grow_panes(steps: Iterator[list[int]], tokenizer, stop_ids: list[int], rows: int
                ) -> Iterator[tuple[PaneText, ...]]:
    """Each row's answer after every step in which one changed; the last yield has every row done.

    A row ends at its first stop token (decoded like `generate`'s answers: dropped when it is a special token);
    `generate` pads the rows that finished until all have.
    """
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    texts = [""] * rows
    shown = None
    for step in steps:
        for row, token in enumerate(step):
            if done[row]:
                continue
            tokens[row].append(token)
            done[row] = token in stop_ids
            text = tokenizer.decode(tokens[row], skip_special_tokens=True)
            texts[row] = _cut_at_end_marker(text) if done[row] else _partial_text(text)
        panes = tuple(PaneText(text, len(ids), end) for text, ids, end in zip(texts, tokens, done))
        if panes != shown:
            shown = panes
            yield panes
    final = tuple(PaneText(_cut_at_end_marker(tokenizer.decode(ids, skip_special_tokens=True)), len(ids), True)
                  for ids in tokens)
    if final != shown:
        yield final


def _partial_text(text: str) -> str:
    """What to show of an answer still being written: up to a literal `<|im_end|>`, holding back a tail that
    could be its beginning and a trailing U+FFFD (a character whose remaining bytes come with the next token)."""
    text = _cut_at_end_marker(text).removesuffix("\ufffd")
    return text[: len(text) - _marker_prefix_len(text)]


def _cut_at_end_marker(text: str) -> str:
    """Drop a literal `<|im_end|>` and what follows: built-in ChatML on a tokenizer without that token
    writes it as plain text before the EOS token."""
    cut = text.find(END_OF_TURN)
    return text if cut < 0 else text[:cut]


def _until_end_marker(chunks: Iterator[str]) -> Iterator[str]:
    """Pass chunks through until a literal `<|im_end|>`; hold back a tail that could be its beginning."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        cut = pending.find(END_OF_TURN)
        if cut >= 0:
            if pending[:cut]:
                yield pending[:cut]
            return
        keep = _marker_prefix_len(pending)
        if len(pending) > keep:
            yield pending[: len(pending) - keep]
            pending = pending[len(pending) - keep:]
    if pending:
        yield pending


def _marker_prefix_len(text: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of END_OF_TURN."""
    for n in range(min(len(text), len(END_OF_TURN) - 1), 0, -1):
        if END_OF_TURN.startswith(text[-n:]):
            return n
    return 0
