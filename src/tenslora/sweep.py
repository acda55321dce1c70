"""``tenslora sweep``: the paper's protocol on any task.

LoRA of rank r against the seven tensor constructions, under the *isorank* condition (every mode
at rank r, capped at the mode's size) and the *isoparameter* condition (ranks matched to LoRA
rank r's parameter count), for several seeds. Every run is an ordinary ``tenslora train`` run in
``<sweep>/runs/<name>``: a finished run is read back, an interrupted one resumes from its last
checkpoint. The results are rewritten after each run: ``results.csv`` (one row a run),
``results.md`` (mean ± std by construction and condition) and ``results.png`` (the metric against
trainable parameters, one point a run). They accumulate: a later sweep in the same folder (more
seeds, another condition) adds its runs to those already there.
"""

from __future__ import annotations

import csv
import dataclasses
import multiprocessing
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .construction import CONSTRUCTIONS, PRESETS, TENSOR_CONSTRUCTIONS
from .data.metrics import METRICS
from .options import TrainOptions
from .params import format_ranks
from .runs import atomic_destination, write_atomic, write_csv
from .train import run_training

CONDITIONS = ("isorank", "isoparameter")
_INTEGER_COLUMNS = ("seed", "adapter_parameters", "trainable_parameters")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    construction: str
    condition: str  # "lora" for the baseline, else isorank / isoparameter
    seed: int
    options: TrainOptions


def plan(base: TrainOptions, sweep_dir: Path, lora_rank: int, constructions: Sequence[str],
         conditions: Sequence[str], seeds: Sequence[int]) -> list[PlannedRun]:
    """LoRA r, then each construction under each condition, for every seed (seed-major, so that an
    interrupted sweep has every configuration at its first seeds)."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"Unknown condition(s) {unknown}; choose among {list(CONDITIONS)}.")
    unknown = [c for c in constructions if c not in CONSTRUCTIONS and c not in PRESETS]
    if unknown:
        raise ValueError(f"Unknown construction(s) {unknown}; choose among {list(TENSOR_CONSTRUCTIONS)} "
                         f"or the presets {sorted(PRESETS)}.")
    if lora_rank < 1 or not seeds:
        raise ValueError(f"A sweep needs a positive LoRA rank and at least one seed (got rank {lora_rank}, "
                         f"seeds {list(seeds)}).")
    variants = [("lora", "lora", {"construction": "lora", "factorization": None, "ranks": lora_rank,
                                  "budget": None})]
    for construction in constructions:
        for condition in conditions:
            budget = None if condition == "isorank" else f"lora:{lora_rank}"
            variants.append((construction, condition, {"construction": construction, "ranks": lora_rank,
                                                       "budget": budget}))
    runs = []
    for seed in seeds:
        for construction, condition, adapter in variants:
            name = f"{construction}-r{lora_rank}-seed{seed}" if condition == "lora" else \
                f"{construction}-{condition}-r{lora_rank}-seed{seed}"
            options = dataclasses.replace(base, **adapter, seed=seed, head_only=False, resume=True,
                                          output_dir=str(sweep_dir / "runs" / name))
            runs.append(PlannedRun(name, construction, condition, seed, options))
    return runs


def execute(runs: Sequence[PlannedRun], jobs: int,
            on_result: Callable[[PlannedRun, dict[str, Any]], None]) -> None:
    """Run (or read back) every run, ``jobs`` at a time in separate processes; report each result."""
    if jobs <= 1:
        for run in runs:
            on_result(run, run_training(run.options))
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_training, run.options): run for run in runs}
        try:
            for future in as_completed(futures):
                on_result(futures[future], future.result())
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the runs under way end (they resume later); no new one starts
            raise


def result_row(run: PlannedRun, metrics: dict[str, Any]) -> dict[str, Any]:
    scores = {f"test_{name}": value for name, value in metrics["test"].items() if name in METRICS}
    adapter = metrics["adapter"]
    return {"name": run.name, "construction": run.construction, "condition": run.condition, "seed": run.seed,
            "factorization": adapter["factorization"], "ranks": format_ranks(adapter["ranks"]),
            "adapter_parameters": metrics["adapter_parameters"],
            "trainable_parameters": metrics["trainable_parameters"], **scores,
            "wall_time_s": metrics["wall_time_s"]}


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier ``results.csv`` (none if there is none), with their numbers as numbers."""
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in list(row.items()):
            if value == "":  # a metric this run's task does not have
                del row[key]
            elif key in _INTEGER_COLUMNS:
                row[key] = int(value)
            elif key.startswith("test_") or key == "wall_time_s":
                row[key] = float(value)
    return rows


def _metric_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row if key.startswith("test_")))


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _distinct(rows: Sequence[dict[str, Any]], column: str) -> str:
    """The values of ``column`` in ``rows``, each once (the same in every seed, unless the model changed)."""
    values = dict.fromkeys(row[column] for row in rows)
    return " / ".join(f"{value:,}" if isinstance(value, int) else str(value) for value in values)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Mean ± standard deviation over seeds, one line per (condition, construction)."""
    metrics = _metric_columns(rows)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["condition"], row["construction"]), []).append(row)
    header = ["condition", "construction", "ranks", "adapter parameters", "trainable parameters", "seeds",
              *[m.removeprefix("test_") for m in metrics]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (condition, construction), group in sorted(groups.items(), key=lambda item: (item[0][0] != "lora", item[0])):
        cells = [condition, construction, *(_distinct(group, column) for column in
                                            ("ranks", "adapter_parameters", "trainable_parameters")), str(len(group)),
                 *[_mean_std([row[m] for row in group if m in row]) for m in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    """One panel a metric, one point a run: the metric against trainable parameters (log scale);
    colour = construction, marker = condition."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"lora": "*", "isorank": "o", "isoparameter": "s"}
    constructions = list(dict.fromkeys(row["construction"] for row in rows))
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(constructions)}
    figure, panels = plt.subplots(1, len(metrics), figsize=(8 * len(metrics), 5), squeeze=False)
    for axes, metric in zip(panels[0], metrics, strict=True):
        for construction, condition in dict.fromkeys((r["construction"], r["condition"]) for r in rows):
            points = [r for r in rows if r["construction"] == construction and r["condition"] == condition
                      and metric in r]
            axes.scatter([r["trainable_parameters"] for r in points], [r[metric] for r in points],
                         color=colours[construction], marker=markers.get(condition, "o"),
                         s=90 if condition == "lora" else 40, label=f"{construction} ({condition})", alpha=0.8,
                         edgecolors="black", linewidths=0.4)
        axes.set_xscale("log")
        axes.set_xlabel("trainable parameters, adapter + classification head (log scale)")
        axes.set_ylabel(metric.removeprefix("test_").replace("_", " ") + " (test)")
        axes.grid(True, which="both", alpha=0.3)
    panels[0][0].legend(fontsize=7, ncol=2, loc="best")
    figure.tight_layout()
    try:
        with atomic_destination(path) as staging:
            figure.savefig(staging, dpi=120)
    finally:
        plt.close(figure)


def write_reports(sweep_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    write_csv(sweep_dir / "results.csv", rows)
    write_atomic(sweep_dir / "results.md", markdown_table(rows))
    metrics = _metric_columns(rows)
    if metrics:
        plot(sweep_dir / "results.png", rows, metrics)


def run_sweep(base: TrainOptions, sweep_dir: str | os.PathLike, lora_rank: int = 8,
              constructions: Sequence[str] = TENSOR_CONSTRUCTIONS, conditions: Sequence[str] = CONDITIONS,
              seeds: Sequence[int] = (0, 1, 2), jobs: int = 1) -> list[dict[str, Any]]:
    """Run the sweep (finished runs are read back) and write its reports; return one row a run,
    those of earlier sweeps in the same folder first."""
    sweep_dir = Path(sweep_dir)
    runs = plan(base, sweep_dir, lora_rank, constructions, conditions, seeds)
    planned = {run.name for run in runs}
    earlier = [row for row in read_csv(sweep_dir / "results.csv") if row["name"] not in planned]
    rows: dict[str, dict[str, Any]] = {}

    def record(run: PlannedRun, metrics: dict[str, Any]) -> None:
        rows[run.name] = result_row(run, metrics)
        write_reports(sweep_dir, earlier + [rows[r.name] for r in runs if r.name in rows])
        print(f"[{len(rows)}/{len(runs)}] {run.name}: "
              + ", ".join(f"{k}={v:.4f}" for k, v in rows[run.name].items() if k.startswith("test_")), flush=True)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    execute(runs, jobs, record)
    return earlier + [rows[r.name] for r in runs]
