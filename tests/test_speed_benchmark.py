"""benchmarks/speed.py's code paths on a tiny LLaMA (hidden 256, 1 layer, 8 tokens, 1 step): all-linear at
LoRA's budget, compiled, on a 4-bit base, profiled, and one run end to end. Nothing here is timed."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

import tenslora

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "speed.py"
_spec = importlib.util.spec_from_file_location("speed", SCRIPT)
speed = sys.modules["speed"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(speed)

TINY = ["--models", "llama", "--llama-hidden", "256", "--llama-layers", "1", "--batch-size", "2", "--seq-len", "8",
        "--steps", "1"]


@pytest.fixture(autouse=True)
def _keep_threads():
    """The worker sets torch's thread count for its own process; give the test process its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class _Clock:
    """``time.perf_counter`` for the benchmark: each (start, end) pair of calls lasts the next of ``durations``;
    one call more than they allow fails the test (a step the benchmark ran beyond those it should have)."""

    def __init__(self, *durations: float) -> None:
        self.durations, self.now, self.started = list(durations), 0.0, False

    def perf_counter(self) -> float:
        if self.started:
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


@pytest.fixture
def clock(monkeypatch):
    """Install a ``_Clock`` as the benchmark's time (its own ``time`` only: torch keeps the real one)."""
    def install(*durations: float) -> _Clock:
        fake = _Clock(*durations)
        monkeypatch.setattr(speed, "time", fake)
        return fake

    return install


def _work(variant: str, *options: str) -> dict:
    return speed.worker(speed.parse_args(["--worker", "--model", "llama", "--variant", variant, *TINY[2:], *options]))


def _tiny_config():
    return speed.build_model("llama", speed.parse_args(TINY))[1]


def _near_budget(params: int) -> bool:
    budget = tenslora.lora_parameter_count(8, _tiny_config(), roles="all-linear")
    return abs(params - budget) < 0.05 * budget


def test_llama_all_linear_adapters_at_lora_r8_budget(clock):
    """Each variant: its adapter at LoRA r=8's count, and one untimed warm-up step then exactly --steps timed steps
    (3 here), whose median is the step time (the warm-up's 9 s left out)."""
    budget = tenslora.lora_parameter_count(8, _tiny_config(), roles="all-linear")
    results = {}
    for variant in ("floor", "lora", "qkv_depth", "lorta"):
        timer = clock(9.0, 1.0, 4.0, 2.0)
        results[variant] = _work(variant, "--steps", "3")
        assert timer.durations == [] and not timer.started, variant  # as many steps as the durations, no more
        assert results[variant]["step_s"] == 2.0, variant
    assert results["floor"]["adapter_params"] == 0
    assert results["lora"]["adapter_params"] == budget  # PEFT's all-linear: every block linear, not the head
    for variant in ("qkv_depth", "lorta"):
        assert _near_budget(results[variant]["adapter_params"]), (variant, results[variant])


def test_compiled_variant_reports_its_compile_time(clock):
    """The compiling step (10 s) minus a timed step's median (2 s, the warm-up's 4 s left out)."""
    clock(10.0, 4.0, 1.0, 2.0, 3.0)
    result = _work("qkv_depth+compile", "--compile-backend", "aot_eager", "--steps", "3")
    assert (result["compile_s"], result["step_s"]) == (8.0, 2.0) and _near_budget(result["adapter_params"])


def test_4bit_base_quantizes_the_block_linears_and_keeps_the_head():
    bnb = pytest.importorskip("bitsandbytes")
    model = speed.quantized_4bit(speed.build_model("llama", speed.parse_args(TINY))[0])
    layer = model.model.layers[0]
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in (layer.self_attn.k_proj, layer.mlp.down_proj))
    assert type(model.score) is torch.nn.Linear and model.score.weight.dtype == torch.float32
    lora, tensor = _work("lora+4bit"), _work("qkv_depth+4bit")
    assert lora["adapter_params"] == tenslora.lora_parameter_count(8, _tiny_config(), roles="all-linear")
    assert _near_budget(tensor["adapter_params"])  # the same budget on the quantized base


def test_profile_counts_operators_and_compares_with_lora():
    results = {v: [_work(v, "--profile")] for v in ("lora", "qkv_depth")}
    for (result,) in results.values():
        assert result["profile"]["calls"] > 0 and result["profile"]["op_ms"] > 0
        assert result["profile"]["ops"]["aten::mm"][0] > 0
    table = speed.profile_report("llama", results)
    assert "| qkv_depth |" in table and "qkv_depth minus lora:" in table
    assert "| qkv_depth | " in speed.report("llama", results)


def test_variants_expand_groups_and_refuse_unknown_names():
    assert speed.expand_variants(["4bit", "lora+4bit", "infer_base"]) == ["floor+4bit", "lora+4bit",
                                                                          "qkv_depth+4bit", "infer_base"]
    for name in ("qkv_depth+8bit", "infer_base+compile", "matrix"):
        with pytest.raises(ValueError, match=re.escape(f"Unknown variant '{name}'.") + ".*qkv_depth\\+4bit"):
            speed.expand_variants([name])
    quick = speed.parse_args(["--quick"])
    assert (quick.rounds, quick.steps) == (1, 2)
    assert speed.parse_args(["--quick", "--steps", "5"]).steps == 5


def test_report_gives_ratios_to_lora_of_the_same_mode():
    def run(step: float, extra: float) -> list[dict]:
        return [{"step_s": step, "extra_mib": extra, "adapter_params": 1}]

    results = {"floor": run(1.0, 100), "lora": run(2.0, 300), "qkv_depth": run(3.0, 500),
               "lora+4bit": run(4.0, 50), "qkv_depth+4bit": run(2.0, 150)}
    table = speed.report("llama", results)
    assert "| qkv_depth | 1 | 3.00 | 1.50 | 400 | 2.00 |" in table  # memory over the eager floor
    assert "| qkv_depth | 1 | 2.00 | 0.50 | 150 | 3.00 |" in table  # no 4-bit floor: memory as measured


def test_a_variant_runs_in_its_own_process_with_the_options_forwarded(tmp_path):
    # ~7 s: one real worker process, the benchmark's own way of isolating a variant's memory.
    args = speed.parse_args([*TINY, "--variants", "lora"])
    result = speed.run_variant(args, "llama", "lora", tmp_path / "compiler-cache")
    # The 256-wide, 1-layer LLaMA's budget: the size options reached the worker (the default's is 1,163,264).
    assert result["adapter_params"] == tenslora.lora_parameter_count(8, _tiny_config(), roles="all-linear")
