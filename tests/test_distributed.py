"""Data-parallel training under a launcher, on CPU: `torchrun --nproc_per_node 2` with the gloo backend.

One 2-process run (40 steps, LoRA, demo model) and one 1-process run with the same global batch are shared by
the tests below; `FINETUNE_DEBUG_SHARDS=1` makes each process list the training rows it batched. The shipped
accelerate configs are checked with Accelerate's own loader and launch code (no GPU needed to parse them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from finetune.config import RunConfig
from finetune.distributed import DEBUG_SHARDS_ENV, LaunchSettings, launch_settings, validate_launch
from finetune.errors import ConfigError
from finetune.train import train
from test_train import greedy_answer, read_metrics

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))

# Eight one-turn facts: 6 train, 1 validation, 1 test with the fractions below.
FACTS = [("What is the capital of Zenovia?", "The capital of Zenovia is Marlport."),
         ("Name a prime number above 10.", "Eleven is a prime number."),
         ("What colour is the Zenovian flag?", "The flag of Zenovia is green."),
         ("Who founded Marlport?", "Marlport was founded by Ada Quill."),
         ("What is the river in Marlport?", "The Vell river runs through Marlport."),
         ("How many moons has Zenovia?", "Zenovia has three moons."),
         ("What do Zenovians eat?", "Zenovians eat blue bread."),
         ("When is Zenovia day?", "Zenovia day is in May.")]
STEPS = 40          # 6 train rows / global batch 2 = 3 steps per epoch: ~13 epochs, enough to memorise them
STEPS_PER_EPOCH = 3
PROCS = 2


def run_settings(dataset: Path, out: Path, **changes) -> dict:
    """Global batch 2 either way: 2 processes x batch_size 1, or 1 process x batch_size 2. fp32 so that the
    two runs differ only by summation order (bf16 autocast would add its own rounding)."""
    settings = dict(base_model=None, dataset=str(dataset), method="lora", learning_rate=5e-3, max_steps=STEPS,
                    batch_size=1, gradient_accumulation_steps=1, eval_fraction=0.125, test_fraction=0.125,
                    logging_steps=2, max_seq_length=64, lr_scheduler_type="constant", warmup_ratio=0.0,
                    lora_dropout=0.0, precision="fp32", output_dir=str(out))
    settings.update(changes)
    return settings


def torchrun(config_yaml: Path, *overrides: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m finetune train CONFIG.yaml ...` (standalone: a free port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # 2 processes on 2 cores: one thread each, no oversubscription
           DEBUG_SHARDS_ENV: "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(PROCS),
           "-m", "finetune", "train", str(config_yaml), *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def seen(run: Path, rank: int) -> list[int]:
    record = json.loads((run / "data" / f"rank{rank}_seen.json").read_text())
    assert record["rank"] == rank
    return record["seen"]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if r["loss"] is not None}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dist_run(demo_model_dir, dataset, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("ddp")
    config_yaml = folder / "run.yaml"
    config_yaml.write_text(yaml.safe_dump(run_settings(dataset, folder / "run", base_model=str(demo_model_dir))))
    proc = torchrun(config_yaml)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder / "run", proc


@pytest.fixture(scope="module")
def single_run(demo_model_dir, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DEBUG_SHARDS_ENV, "1")
        train(RunConfig(**run_settings(dataset, out, base_model=str(demo_model_dir), batch_size=2)))
    return out


# ----------------------------------------------------------------------------- 2 processes on CPU
def test_each_process_trains_on_its_own_shard(dist_run, single_run):
    run, _ = dist_run
    r0, r1 = seen(run, 0)[:STEPS], seen(run, 1)[:STEPS]  # batch 1: one row per step (+1 prefetched, dropped)
    assert len(r0) == len(r1) == STEPS
    for epoch in range(STEPS // STEPS_PER_EPOCH):
        a = set(r0[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH])
        b = set(r1[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH])
        assert not a & b, f"epoch {epoch}: both processes trained on {a & b}"
        assert a | b == set(range(6)), f"epoch {epoch}: together they cover the 6 training rows"
    # step k's global batch is the 1-process run's batch k, split across the two processes
    single = seen(single_run, 0)
    assert [single[2 * k:2 * k + 2] for k in range(STEPS)] == [[r0[k], r1[k]] for k in range(STEPS)]


def test_only_the_main_process_writes_outputs(dist_run):
    run, proc = dist_run
    files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    assert {"run.yaml", "status.json", "metrics.jsonl", "results.json", "data/train.jsonl", "data/validation.jsonl",
            "data/test.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "adapter/tokenizer_config.json"} <= files
    assert [f for f in files if "rank1" in f] == ["data/rank1_seen.json"], "the debug listing is rank 1's only file"
    assert not any(f.endswith(".tmp") for f in files)
    records = read_metrics(run)
    assert [r["step"] for r in records if r["loss"] is not None] == [1, *range(2, STEPS + 1, 2)], "one line per log"
    assert len(records) == len({(r["step"], r["loss"] is None) for r in records}), "no record written twice"
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == STEPS and results["data"]["rows"] == {"train": 6, "validation": 1, "test": 1}
    # one log: the main process prints each record once, and library progress bars only appear once
    output = proc.stdout + proc.stderr
    assert len(re.findall(rf"step {STEPS} \| epoch [\d.]+ \| loss ", output)) == 1
    assert output.count("Loading weights: 100%") == 1
    # each process keeps its own RNG state in a checkpoint, so a resume replays the same dropout and sampling
    last = run / "checkpoints" / f"checkpoint-{STEPS}"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in last.iterdir()}


def test_adapter_reproduces_trained_answers(dist_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = dist_run
    results = json.loads((run / "results.json").read_text())
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(results["base_model_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    for line in (run / "data" / "train.jsonl").read_text().splitlines():
        question, answer = (m["content"] for m in json.loads(line)["messages"])
        assert greedy_answer(model, tok, question) == answer


def test_logged_loss_matches_one_process_with_the_same_global_batch(dist_run, single_run):
    """Same global batches (asserted above) and the same normalisation: the loss is the sum over every target
    token of the global batch divided by their count across processes (`average_tokens_across_devices`), and
    the logged value is the mean of the per-process terms (all-gathered), times the process count. So the runs
    differ only in float32 summation order (two backward passes + a gloo all-reduce vs one packed backward):
    ~1e-7 relative at step 1, grown by 40 Adam steps to ~1e-5 measured. 1e-3 leaves margin; logging rank 0's
    loss alone would be off by ~10% at step 1, and a missing world-size factor by 50%."""
    run, _ = dist_run
    dist, one = train_losses(run), train_losses(single_run)
    assert list(dist) == list(one)
    assert dist[1] == pytest.approx(one[1], rel=1e-5)
    for step in dist:
        assert dist[step] == pytest.approx(one[step], rel=1e-3), step
    a, b = (json.loads((r / "results.json").read_text()) for r in (run, single_run))
    for key in ("train_loss", "eval_loss", "test_loss_before", "test_loss_after"):
        assert a[key] == pytest.approx(b[key], rel=1e-3), key


def test_resume_under_torchrun_continues_the_run(dist_run, tmp_path):
    run, _ = dist_run
    resumed = tmp_path / "run"
    shutil.copytree(run, resumed)
    config_yaml = tmp_path / "resume.yaml"
    settings = RunConfig.from_yaml(run / "run.yaml").to_dict()
    settings.update(output_dir=str(resumed), resume_from_checkpoint="latest", max_steps=STEPS + 4)
    config_yaml.write_text(yaml.safe_dump(settings))
    proc = torchrun(config_yaml)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = [r["step"] for r in read_metrics(resumed) if r["loss"] is not None]
    assert steps == [1, *range(2, STEPS + 5, 2)], "the curve continues after step 40, nothing repeated"
    assert json.loads((resumed / "results.json").read_text())["global_step"] == STEPS + 4
    assert len(seen(resumed, 0)) >= 4 and len(seen(resumed, 1)) >= 4, "both processes trained the 4 new steps"


def test_a_failure_on_one_process_ends_the_whole_job(demo_model_dir, dataset, tmp_path):
    """Only rank 0 writes the split files; make that fail (data/ is a file). Rank 1 goes on and waits in the
    first collective (the test-loss evaluation); the launcher must end it instead of hanging."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "data").write_text("not a folder")
    config_yaml = tmp_path / "run.yaml"
    config_yaml.write_text(yaml.safe_dump(run_settings(dataset, out, base_model=str(demo_model_dir))))
    start = time.monotonic()
    proc = torchrun(config_yaml, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 90, "the job ended instead of waiting for the failed process"
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and "data" in status["error"]


# ----------------------------------------------------------------------------- shipped accelerate configs
def accelerate_launch_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file FILE -m finetune train x.yaml` gives each process,
    built by Accelerate's own launch code (commands/launch.py: launch_command), without starting anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "finetune", "train",
                                               "x.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


EXPECTED = {  # file: (accelerate's distributed_type, what our launcher detection makes of it)
    "ddp.yaml": ("MULTI_GPU", LaunchSettings(2, "ddp")),
    "fsdp.yaml": ("FSDP", LaunchSettings(2, "fsdp", fsdp_version=1, fsdp_state_dict_type="FULL_STATE_DICT")),
    "deepspeed_zero2.yaml": ("DEEPSPEED", LaunchSettings(2, "deepspeed", zero_stage=2, zero3_save_16bit_model=False)),
    "deepspeed_zero3.yaml": ("DEEPSPEED", LaunchSettings(2, "deepspeed", zero_stage=3, zero3_save_16bit_model=True)),
}


def test_every_example_config_is_shipped_and_tested():
    assert sorted(p.name for p in ACCELERATE_CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("config_file", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_parses_and_starts_with_its_command(config_file):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config_file))
    assert str(loaded.distributed_type).split(".")[-1] == EXPECTED[config_file.name][0]
    first = config_file.read_text().splitlines()[0]
    command = f"# accelerate launch --config_file examples/accelerate/{config_file.name} -m finetune train "
    assert first.startswith(command)
    run_config = first[len(command):].strip()
    RunConfig.from_yaml(ROOT / run_config)  # the command names a config that exists and is valid
    if config_file.name == "fsdp.yaml":
        assert loaded.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert loaded.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"


@pytest.mark.parametrize("config_file", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_launch_env_of_each_config_is_understood_and_accepted(config_file):
    env = {**accelerate_launch_env(config_file), "WORLD_SIZE": "2"}
    settings = launch_settings(env)
    assert settings == EXPECTED[config_file.name][1]
    lora = RunConfig(base_model="demo", method="lora")
    if settings.engine == "deepspeed" and not _deepspeed_installed():
        with pytest.raises(ConfigError, match="asks for DeepSpeed but it is not installed; `pip install deepspeed`"):
            validate_launch(lora, settings, cuda_available=True)
    else:
        validate_launch(lora, settings, cuda_available=True)  # a GPU box with the launcher's settings: accepted


def _deepspeed_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


# ----------------------------------------------------------------------------- combinations refused up front
FSDP_ENV = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}
ZERO3_ENV = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
             "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}


@pytest.mark.parametrize("env,method,cuda,message", [
    (FSDP_ENV, "lora", False, "FSDP needs CUDA GPUs and none is visible; on CPU run plain data parallel instead: "
                              "`torchrun --nproc_per_node N -m finetune train CONFIG.yaml`, or launch with "
                              "examples/accelerate/ddp.yaml"),
    (ZERO3_ENV, "lora", False, "DeepSpeed needs CUDA GPUs and none is visible; on CPU run plain data parallel"),
    (FSDP_ENV, "qlora", True, "`method: qlora` can't be sharded with FSDP here: FSDP needs the 4-bit weights "
                              "stored in the compute dtype (bnb_4bit_quant_storage=bfloat16)"),
    ({**FSDP_ENV, "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": ""}, "full", True,
     "FSDP `fsdp_state_dict_type: SHARDED_STATE_DICT` would leave the final model/ folder empty"),
    (ZERO3_ENV, "qlora", True, "`method: qlora` with DeepSpeed ZeRO-3: ZeRO-3 partitions every weight"),
    ({**ZERO3_ENV, "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false"}, "lora", True,
     "DeepSpeed ZeRO-3 without `zero3_save_16bit_model: true` saves a sharded DeepSpeed checkpoint"),
], ids=["fsdp-cpu", "deepspeed-cpu", "fsdp-qlora", "fsdp2-sharded-save", "zero3-qlora", "zero3-no-16bit-save"])
def test_unworkable_combinations_are_refused_up_front(env, method, cuda, message):
    config = RunConfig(base_model="demo", method=method)
    with pytest.raises(ConfigError) as err:
        validate_launch(config, launch_settings(env), cuda_available=cuda)
    assert str(err.value).startswith(message)


def test_deepspeed_json_config_is_read_for_the_stage(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}))
    env = {"WORLD_SIZE": "4", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds)}
    assert launch_settings(env) == LaunchSettings(4, "deepspeed", zero_stage=3, zero3_save_16bit_model=False)
    with pytest.raises(ConfigError, match="ZeRO-3 without `zero3_save_16bit_model: true`"):
        validate_launch(RunConfig(base_model="demo"), launch_settings(env), cuda_available=True)


def test_plain_torchrun_and_qlora_data_parallel_are_accepted():
    """torchrun alone (DDP) works on CPU, and QLoRA replicates cleanly under DDP: nothing to refuse."""
    for method in ("lora", "qlora", "full"):
        validate_launch(RunConfig(base_model="demo", method=method), launch_settings({"WORLD_SIZE": "2"}),
                        cuda_available=False)
