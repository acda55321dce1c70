"""Several processes on CPU (gloo): DDP and FSDP2 reach the adapter of one process that sees the global batch.

Two processes with b examples each per step must end where one process with 2b examples ends: every loss
here is a mean over its batch and dropout is off, DDP averages the two halves' gradients, and both runs
see the same examples in every step (process r takes every other example of the global batch, as
``DistributedSampler`` does). The library is tested first, in processes started with
``torch.multiprocessing``; then the ``tenslora train`` command under ``torchrun`` and ``accelerate launch``,
which is what users run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import tiny
from tenslora import TensLoraConfig
from tenslora.app.options import TrainOptions
from tenslora.app.train import run_training
from tenslora.tuner.distributed import fully_shard_model
from tiny_tasks import save_text_model, write_pair_task

WORLD = 2
PER_PROCESS = 2  # examples per process and micro-batch
STEPS = 3
TOLERANCE = 1e-5
TIMEOUT = 240  # seconds for one multi-process launch on a loaded 2-core machine


@dataclass(frozen=True)
class Scenario:
    """One way of training the same model in two processes."""

    construction: str = "qkv_depth"  # qkv_depth: one tensor for every layer; att: one per role and layer
    inactive_adapter: bool = False  # a second adapter, not trained, beside the active one
    accumulation: int = 1  # micro-batches per optimizer step in each process
    checkpointing: Optional[str] = None  # activation checkpointing: "non-reentrant" or "reentrant"
    engine: str = "ddp"  # or "fsdp2"


SCENARIOS = {
    "qkv_depth": Scenario(),
    "att": Scenario(construction="att"),
    "inactive_adapter": Scenario(inactive_adapter=True),
    "accumulation": Scenario(accumulation=2),
    "checkpointing": Scenario(checkpointing="non-reentrant"),  # transformers' default kind
    "reentrant_checkpointing": Scenario(checkpointing="reentrant"),  # needs DDP's static_graph
    "fsdp2": Scenario(engine="fsdp2"),
}


def build_model(scenario: Scenario) -> PeftModel:
    """The tiny BERT with a TensLoRA adapter and a trained head; dropout off, so that runs can agree exactly."""
    base = tiny.bert()
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model = get_peft_model(base, TensLoraConfig(construction=scenario.construction, ranks=4, task_type="SEQ_CLS"))
    if scenario.inactive_adapter:
        model.add_adapter("other", TensLoraConfig(construction="att", ranks=2, task_type="SEQ_CLS"))
    if scenario.checkpointing:
        reentrant = scenario.checkpointing == "reentrant"
        model.get_base_model().activation_checkpointing_enable({"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()  # reentrant checkpoints backpropagate only into inputs that need it
    return model.train()


def micro_batches(scenario: Scenario, rank: int, world: int) -> list[list[dict[str, torch.Tensor]]]:
    """Per optimizer step, this process's micro-batches; one process takes each global batch at once."""
    per_step = WORLD * PER_PROCESS * scenario.accumulation
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, tiny.VOCAB, (STEPS * per_step, 7), generator=generator)
    labels = torch.randint(0, 3, (STEPS * per_step,), generator=generator)
    steps = []
    for step in range(STEPS):
        mine = torch.arange(step * per_step, (step + 1) * per_step)[rank::world]
        chunks = mine.chunk(scenario.accumulation if world > 1 else 1)
        steps.append([{"input_ids": input_ids[chunk], "labels": labels[chunk]} for chunk in chunks])
    return steps


def train(model: nn.Module, scenario: Scenario, rank: int = 0, world: int = 1,
          after_step: Callable[[], None] = lambda: None) -> None:
    """AdamW on the mean loss of each step's examples; DDP synchronizes on the last micro-batch only."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batches in micro_batches(scenario, rank, world):
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            skip_sync = isinstance(model, DistributedDataParallel) and not last
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                (model(**batch).loss / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        after_step()


def trained_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trained tensor (adapter and head), whole: FSDP2 holds them as shards (a collective call)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def count_projection_clears(model: PeftModel) -> list[int]:
    """Calls of every bank's ``clear_projections`` (the model's forward pre/post hooks), appended to a list."""
    calls: list[int] = []
    for bank in model.base_model.tenslora_tensors.values():
        def counted(clear: Callable[[], None] = bank.clear_projections) -> None:
            calls.append(1)
            clear()

        bank.clear_projections = counted
    return calls


def train_distributed(scenario: Scenario, rank: int) -> dict[str, Any]:
    """One scenario in this process (of WORLD): what the checks in the main process need."""
    model = build_model(scenario)
    clears = count_projection_clears(model)
    reduced: list[int] = []  # elements all-reduced by DDP, per bucket
    per_step: list[int] = []

    def end_step() -> None:
        per_step.append(sum(reduced))
        reduced.clear()

    if scenario.engine == "fsdp2":
        wrapped = fully_shard_model(model)
    else:
        wrapped = DistributedDataParallel(model, static_graph=scenario.checkpointing == "reentrant")

        def count_and_reduce(state, bucket):  # no annotations: DDP rejects the postponed (string) ones
            reduced.append(bucket.buffer().numel())
            return allreduce_hook(None, bucket)

        wrapped.register_comm_hook(None, count_and_reduce)
    train(wrapped, scenario, rank, WORLD, after_step=end_step)
    banks = model.base_model.tenslora_tensors
    return {
        "weights": trained_weights(model),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "reduced_per_step": per_step,
        "clears": len(clears),
        "forwards": STEPS * scenario.accumulation,
        "banks": len(banks),
        "inactive": [(p.requires_grad, p.grad is None) for n, p in model.named_parameters() if ".other." in n],
        "sharded": all(isinstance(p, DTensor) for p in banks.parameters()),
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    for name, scenario in SCENARIOS.items():
        result = train_distributed(scenario, rank)
        if rank == 0:
            torch.save(result, os.path.join(out_dir, f"{name}.pt"))
    dist.barrier()  # a process that leaves while the other still talks to it can abort in gloo's teardown
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Every scenario, trained once in two spawned processes (one start-up for all: ~5 s on 2 cores)."""
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} training processes did not finish in {TIMEOUT} s")
    return {name: torch.load(out / f"{name}.pt") for name in SCENARIOS}


@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_reach_the_weights_of_one_with_the_global_batch(distributed, name):
    scenario = SCENARIOS[name]
    model = build_model(scenario)
    initial = trained_weights(model)
    train(model, scenario)
    expected, got = trained_weights(model), distributed[name]["weights"]
    assert got.keys() == expected.keys()
    assert any("tenslora_tensors" in key for key in got) and any("classifier" in key for key in got)
    difference = max((got[key] - expected[key]).abs().max().item() for key in got)
    print(f"{name}: {difference:.1e} apart")
    assert difference <= TOLERANCE
    moved = min((expected[key] - initial[key]).abs().max().item() for key in got)
    assert moved > 1e-3, "a tensor did not move in training: the comparison would prove little"


@pytest.mark.parametrize("name", [name for name, scenario in SCENARIOS.items() if scenario.engine == "ddp"])
def test_ddp_reduces_every_trained_tensor_once_per_optimizer_step(distributed, name):
    """The shared factors' gradients are all-reduced once per step: not per layer, not per micro-batch."""
    result = distributed[name]
    print(f"{name}: {result['reduced_per_step']} elements all-reduced in steps 1-{STEPS}, {result['trainable']} "
          "trainable")
    assert result["reduced_per_step"] == [result["trainable"]] * STEPS


def test_inactive_adapter_is_frozen_and_gets_no_gradient(distributed):
    inactive = distributed["inactive_adapter"]["inactive"]
    assert inactive and all(flags == (False, True) for flags in inactive)


@pytest.mark.parametrize("name", SCENARIOS)
def test_reused_projections_are_cleared_around_every_forward_pass(distributed, name):
    """The model's forward pre/post hooks run under DDP's and FSDP's wrappers (once before, once after)."""
    result = distributed[name]
    assert result["clears"] == 2 * result["forwards"] * result["banks"]


def test_fsdp2_keeps_the_shared_factors_sharded_in_the_root_unit(distributed):
    assert distributed["fsdp2"]["sharded"]


def test_fsdp2_refuses_a_unit_that_holds_the_factors():
    with pytest.raises(ValueError, match="must stay in the root FSDP unit"):
        fully_shard_model(build_model(Scenario()), block_classes=["TensLoraModel"])


# The command line: `tenslora train` launched in two processes, against one process with twice the batch.

RUN = dict(task="glue-mrpc", epochs=2, lr=1e-2, max_length=32, max_train_samples=32)  # float32; 4 steps an epoch
TORCHRUN = ["torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]  # `torchrun`: a free port
ACCELERATE_CONFIG = f"""\
# `accelerate config` on a machine with {WORLD} GPUs writes this; without GPUs, MULTI_GPU runs the same
# torch.distributed launcher and the Trainer trains on CPU with gloo.
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: {WORLD}
rdzv_backend: c10d
main_process_port: 0
mixed_precision: 'no'
"""
# Installed as `sitecustomize` in the launched processes: every process of rank > 0 logs the files it
# writes, renames or deletes in the run's folder (Python-level writes: the Trainer's and ours).
WRITE_AUDIT = """\
import os, sys
if os.environ.get("RANK", "0") != "0" and "TENSLORA_AUDITED_DIR" in os.environ:
    _watched = os.environ["TENSLORA_AUDITED_DIR"]
    _log = open(os.environ["TENSLORA_AUDIT_LOG"] + ".rank" + os.environ["RANK"], "a", buffering=1)

    def _audit(event, args):
        if event not in ("open", "os.rename", "os.remove", "shutil.rmtree"):
            return
        if not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        if event == "open" and not (set(args[1] or "") & set("wax+")
                                    or args[1] is None and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if path.startswith(_watched):
            _log.write(event + " " + os.path.relpath(path, _watched) + "\\n")

    sys.addaudithook(_audit)
"""


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory) -> Path:
    """A tiny saved BERT (dropout off), MRPC-shaped data, the accelerate config and the write audit."""
    root = tmp_path_factory.mktemp("cli")
    model = save_text_model(root / "bert", sentence_transformers=True)
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    write_pair_task(root / "mrpc")
    (root / "accelerate.yaml").write_text(ACCELERATE_CONFIG)
    (root / "audit").mkdir()
    (root / "audit" / "sitecustomize.py").write_text(WRITE_AUDIT)
    return root


def run_options(root: Path) -> dict[str, Any]:
    return dict(RUN, data_dir=str(root / "mrpc"), model=str(root / "bert"))


def launch(launcher: list[str], root: Path, out: Path, *extra: str, batch_size: int = 4) -> None:
    """``python -m <launcher> -m tenslora train`` with per-process ``batch_size``, auditing the writes into ``out``."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in run_options(root).items()]
    command = [sys.executable, "-m", *launcher, "-m", "tenslora", "train", *flags, "--no-bf16",
               f"--batch-size={batch_size}", f"--output-dir={out}", *extra]
    python_path = [str(root / "audit"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(python_path), TENSLORA_AUDITED_DIR=str(out),
               TENSLORA_AUDIT_LOG=str(root / out.name))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def writes_of_other_ranks(root: Path, out: Path) -> list[str]:
    """What the processes of rank > 0 wrote into ``out``, but their own RNG state in checkpoints."""
    own_rng_state = re.compile(r"open checkpoint-\d+/rng_state_(\d+)\.pth")
    lines = []
    for log in root.glob(f"{out.name}.rank*"):
        rank = log.name.rsplit("rank", 1)[1]
        lines += [line for line in log.read_text().splitlines()
                  if not ((match := own_rng_state.fullmatch(line)) and match.group(1) == rank)]
    return lines


def adapter_difference(first: Path, second: Path) -> float:
    first, second = (load_file(folder / "adapter_model.safetensors") for folder in (first, second))
    assert first.keys() == second.keys() and any("tenslora_tensors" in key for key in first)
    cores = [tensor for key, tensor in first.items() if key.endswith(".core")]  # zero until training moves them
    assert cores and all(core.abs().max() > 1e-4 for core in cores), "training left the adapter as initialized"
    return max((first[key] - second[key]).abs().max().item() for key in first)


@pytest.fixture(scope="module")
def torchrun_run(cli_root) -> Path:
    """``torchrun --nproc-per-node 2 -m tenslora train ... --batch-size 4``, run to the end."""
    out = cli_root / "torchrun"
    launch(TORCHRUN, cli_root, out)
    return out


@pytest.fixture(scope="module")
def resumed_run(cli_root, torchrun_run) -> Path:
    """The same run killed after its first checkpoint, continued with ``accelerate launch ... --resume``."""
    out = cli_root / "resumed"
    first = min(torchrun_run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    out.mkdir()
    shutil.copy(torchrun_run / "run.json", out)  # run.json and the first checkpoint: what a kill in epoch 2 leaves
    shutil.copytree(first, out / first.name)
    launch(["accelerate.commands.launch", f"--config_file={cli_root / 'accelerate.yaml'}"], cli_root, out,
           "--resume")
    return out


@pytest.fixture(scope="module")
def single_run(cli_root) -> Path:
    """The same run in one process with the global batch, 8."""
    out = cli_root / "single"
    assert run_training(TrainOptions(**run_options(cli_root), bf16=False, batch_size=8, output_dir=str(out)))[
        "steps"] == 8
    return out


@pytest.mark.parametrize("batch_size, accumulation", [(4, 1), (2, 2)])
def test_torchrun_reaches_the_adapter_of_one_process_with_the_global_batch(cli_root, single_run, torchrun_run,
                                                                         batch_size, accumulation):
    """2 processes x batch 4, or x batch 2 x 2 accumulated micro-batches: the adapter of 1 process x batch 8."""
    run = torchrun_run
    if accumulation > 1:
        run = cli_root / "accumulated"
        launch(TORCHRUN, cli_root, run, f"--gradient-accumulation={accumulation}", batch_size=batch_size)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8
    difference = adapter_difference(run, single_run)
    print(f"{WORLD} processes x batch {batch_size} x {accumulation} against 1 x batch 8: {difference:.1e} apart")
    assert difference <= TOLERANCE


def test_accelerate_launch_resumes_a_multi_process_run(torchrun_run, resumed_run):
    metrics = json.loads((resumed_run / "metrics.json").read_text())
    assert Path(metrics["resumed_from"]).parent == resumed_run and metrics["steps"] == 8
    with open(resumed_run / "history.csv") as handle:
        assert [float(row["epoch"]) for row in csv.DictReader(handle)] == [1.0, 2.0]
    assert adapter_difference(resumed_run, torchrun_run) <= TOLERANCE


def test_only_the_main_process_writes_the_run_files(cli_root, torchrun_run, resumed_run):
    for run in (torchrun_run, resumed_run):
        assert list(cli_root.glob(f"{run.name}.rank1")), "the write audit did not run in the second process"
        assert writes_of_other_ranks(cli_root, run) == []
