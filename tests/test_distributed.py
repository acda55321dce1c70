"""Several processes on CPU (gloo): DDP and FSDP2 reach the adapter of one process that sees the global batch.

Two processes with b examples each per step must end where one process with 2b examples ends: every loss
here is a mean over its batch and dropout is off, DDP averages the two halves' gradients, and both runs
see the same examples in every step (process r takes every other example of the global batch, as
``DistributedSampler`` does). The processes are started with ``torch.multiprocessing`` (gloo, CPU).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import PeftModel, get_peft_model
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import tiny
from tenslora import TensLoraConfig
from tenslora.distributed import fully_shard_model

WORLD = 2
PER_PROCESS = 2  # examples per process and micro-batch
STEPS = 3
TOLERANCE = 1e-5
TIMEOUT = 240  # seconds for one multi-process launch on a loaded 2-core machine


@dataclass(frozen=True)
class Scenario:
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
        clear = bank.clear_projections
        bank.clear_projections = lambda clear=clear: (calls.append(1), clear())[1]
    return calls


def train_distributed(scenario: Scenario, rank: int) -> dict[str, Any]:
    """One scenario in this process (of WORLD): what the checks in the main process need."""
    model = build_model(scenario)
    clears = count_projection_clears(model)
    reduced: list[int] = []  # elements all-reduced by DDP, per bucket
    per_step: list[int] = []
    if scenario.engine == "fsdp2":
        wrapped = fully_shard_model(model)
    else:
        wrapped = DistributedDataParallel(model, static_graph=scenario.checkpointing == "reentrant")

        def count_and_reduce(state, bucket):  # no annotations: DDP rejects the postponed (string) ones
            reduced.append(bucket.buffer().numel())
            return allreduce_hook(None, bucket)

        wrapped.register_comm_hook(None, count_and_reduce)
    train(wrapped, scenario, rank, WORLD, after_step=lambda: (per_step.append(sum(reduced)), reduced.clear()))
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
    assert max((got[key] - expected[key]).abs().max().item() for key in got) <= TOLERANCE
    moved = min((expected[key] - initial[key]).abs().max().item() for key in got)
    assert moved > 1e-3, "a tensor did not move in training: the comparison would prove little"


@pytest.mark.parametrize("name", [name for name, scenario in SCENARIOS.items() if scenario.engine == "ddp"])
def test_ddp_reduces_every_trained_tensor_once_per_optimizer_step(distributed, name):
    """The shared factors' gradients are all-reduced once per step: not per layer, not per micro-batch."""
    result = distributed[name]
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
