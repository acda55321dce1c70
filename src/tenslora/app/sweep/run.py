"""``tenslora sweep``: LoRA against the tensor constructions, fairly, at several budgets.

LoRA of each rank r, and each tensor construction under the *isorank* condition (every mode at
rank r, capped at the mode's size) and the *isoparameter* condition (ranks matched to LoRA rank
r's parameter count, or to an absolute count from ``budgets``), for each learning rate and seed.
Each row (method and budget) gets the learning rate with the best validation score, and its test
scores are reported at that rate (``sweep_report``). Every run is an ordinary ``tenslora train``
run in ``<sweep>/runs/<name>``: a finished run is read back, an interrupted one resumes from its
last checkpoint. The reports are rewritten after each run and cover every run in the folder, so a
later sweep there (more seeds, rates or budgets) adds to them; ``sweep.json`` records the options
the runs share, and a sweep with other shared options is refused.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.construction import CONSTRUCTIONS, PRESETS, TENSOR_CONSTRUCTIONS
from ...data import CAUSAL_LM_TASK
from ...data.causal_lm import is_paired
from ...data.metrics import SCORES
from ...files import write_json
from .. import inputs
from ..modeling import default_model, load_model_config, load_preprocessor
from ..options import TrainOptions, adapter_config, default_threads, default_value
from ..params import format_ranks
from ..runs import LOCK_FILE, folder_lock, read_json
from ..train import TrainingDiverged, run_training
from .report import DIVERGED, RESULTS_FILE, RowKey, read_csv, row_key, select_learning_rates, write_reports

CONDITIONS = ("isorank", "isoparameter")
SWEEP_FILE = "sweep.json"
DIVERGED_FILE = "diverged.json"  # in a run folder: the sweep's record of a run that diverged
BASE_FILE = "base.json"  # in the sweep folder: the base model's test score, the same for every run (a causal LM's)
BASE_SCORE = "base_test_exact_match"
#: The options a sweep sets run by run; the others are shared by all its runs (recorded in sweep.json).
PER_RUN_OPTIONS = ("construction", "ranks", "budget", "head_only", "seed", "lr")
MAX_WIDENINGS = 3  # --widen: the most rates added to one row (a factor of 8 beyond the grid)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


@dataclass(frozen=True)
class Point:
    """One method at one budget: a row of the results, whose runs differ in learning rate and seed."""

    construction: str
    condition: str  # "lora" for the baseline, else isorank / isoparameter
    lora_rank: int | None = None  # the LoRA rank r the point is matched to
    parameters: int | None = None  # or an absolute parameter budget (isoparameter only)

    @property
    def budget(self) -> str:
        """``lora:8`` (LoRA rank 8: its rank for isorank, its count otherwise) or a parameter count."""
        return f"lora:{self.lora_rank}" if self.lora_rank is not None else str(self.parameters)

    @property
    def key(self) -> RowKey:
        return self.construction, self.condition, self.budget

    @property
    def stem(self) -> str:
        """``lora-r8``, ``qkv-isorank-r8``, ``qkv-isoparameter-r8``, ``qkv-isoparameter-p1500``."""
        size = f"r{self.lora_rank}" if self.lora_rank is not None else f"p{self.parameters}"
        return f"lora-{size}" if self.condition == "lora" else f"{self.construction}-{self.condition}-{size}"

    @property
    def adapter(self) -> dict[str, Any]:
        """The adapter options of its runs."""
        if self.condition == "lora":  # LoRA has no block layout: a --layout blocks sweep applies to the others
            return {"construction": "lora", "factorization": None, "ranks": self.lora_rank, "budget": None,
                    "layout": "roles"}
        if self.condition == "isorank":
            return {"construction": self.construction, "ranks": self.lora_rank, "budget": None}
        return {"construction": self.construction, "ranks": default_value("ranks"), "budget": self.budget}


@dataclass(frozen=True)
class PlannedRun:
    name: str
    point: Point
    lr: float
    seed: int
    options: TrainOptions


def points(lora_ranks: Sequence[int], constructions: Sequence[str], conditions: Sequence[str],
           budgets: Sequence[int] = ()) -> list[Point]:
    """For each LoRA rank r: LoRA r, then each construction under each condition; then each construction
    at each absolute budget."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"Unknown condition(s) {unknown}; choose among {list(CONDITIONS)}.")
    if "lora" in constructions:
        raise ValueError("LoRA is the baseline every sweep trains at each --lora-ranks rank: leave 'lora' out of "
                         "--constructions.")
    unknown = [c for c in constructions if c not in CONSTRUCTIONS and c not in PRESETS]
    if unknown:
        raise ValueError(f"Unknown construction(s) {unknown}; choose among {list(TENSOR_CONSTRUCTIONS)} "
                         f"or the presets {sorted(PRESETS)}.")
    if not lora_ranks or min(lora_ranks) < 1:
        raise ValueError(f"A sweep needs at least one positive LoRA rank (got {list(lora_ranks)}).")
    if budgets and min(budgets) < 1:
        raise ValueError(f"Budgets are positive parameter counts (got {list(budgets)}).")
    found = []
    for rank in lora_ranks:
        found.append(Point("lora", "lora", lora_rank=rank))
        found += [Point(c, condition, lora_rank=rank) for c in constructions for condition in conditions]
    found += [Point(c, "isoparameter", parameters=budget) for budget in budgets for c in constructions]
    return found


def reachable(candidates: Sequence[Point], base: TrainOptions, model_config: Any) -> tuple[list[Point], list[str]]:
    """The points to run, and a note for each one left out: an isoparameter budget no ranks of the construction
    come near (``match_budget``'s tolerance), or an absolute budget whose ranks an earlier budget of the
    construction already has (a LoRA rank's budget is kept: it is compared with LoRA)."""
    kept, notes, seen = [], [], {}
    for point in candidates:
        if point.condition != "isoparameter":
            kept.append(point)
            continue
        options = dataclasses.replace(base, **point.adapter)
        try:
            ranks = format_ranks(adapter_config(options, model_config, None).ranks)
        except ValueError as error:
            notes.append(f"{point.construction} at budget {point.budget}: skipped. {error}")
            continue
        earlier = seen.setdefault((point.construction, ranks), point)
        if earlier is point or point.lora_rank is not None:
            kept.append(point)
        else:
            notes.append(f"{point.construction} at budget {point.budget}: skipped, the same ranks ({ranks}) as at "
                         f"budget {earlier.budget}.")
    return kept, notes


def plan(base: TrainOptions, sweep_dir: Path, planned: Sequence[Point], seeds: Sequence[int],
         lrs: Sequence[float]) -> list[PlannedRun]:
    """Every point at every learning rate, seed-major (an interrupted sweep has every configuration at its
    first seeds)."""
    runs = []
    for seed in seeds:
        for lr in lrs:
            for point in planned:
                name = f"{point.stem}-lr{lr:g}-seed{seed}"
                options = dataclasses.replace(base, **point.adapter, seed=seed, lr=lr, head_only=False, resume=True,
                                              output_dir=str(sweep_dir / "runs" / name))
                runs.append(PlannedRun(name, point, lr, seed, options))
    return runs


def execute(runs: Sequence[PlannedRun], jobs: int,
            on_result: Callable[[PlannedRun, dict[str, Any]], None]) -> None:
    """Run (or read back) every run, ``jobs`` at a time in separate processes; report each result."""
    if jobs <= 1:
        for run in runs:
            on_result(run, train_or_diverge(run.options))
        return
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=end_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(train_or_diverge, run.options): run for run in runs}
        try:
            for future in as_completed(futures):
                on_result(futures[future], future.result())
        except BaseException:
            # No new run starts. On Ctrl-C or a kill the runs under way end with the sweep (they resume later);
            # after a run's error, those under way finish first.
            pool.shutdown(cancel_futures=True)
            raise


def train_or_diverge(options: TrainOptions) -> dict[str, Any]:
    """``run_training``, except that a run which diverges is a result of the sweep (its learning rate is too
    large for that method at that budget), not its end. The divergence is recorded in the run's folder: the
    sweep run again reads it back rather than training the run again."""
    record = Path(options.output_dir) / DIVERGED_FILE
    if record.is_file():
        diverged = read_json(record, required=(DIVERGED,))
        step = diverged[DIVERGED]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"'{record}': its \"{DIVERGED}\" is {step!r}, not the step a run diverged at. It was "
                             "changed or damaged outside TensLoRA; restore it, or delete it to train that run again.")
        return {DIVERGED: step}
    try:
        sweep_dir = Path(options.output_dir).parents[1]  # a run's folder is <sweep>/runs/<name> (plan)
        return run_training(options, known_base_score(sweep_dir))
    except TrainingDiverged as error:
        diverged = {DIVERGED: error.step}
        write_json(record, diverged)
        return diverged


def known_base_score(sweep_dir: Path) -> float | None:
    """The base model's test exact match once a run of the sweep in ``sweep_dir`` has scored it (``BASE_FILE``):
    every run has the same base, test examples and precision, so the others need not generate it again."""
    record = sweep_dir / BASE_FILE
    if not record.is_file():
        return None
    score = read_json(record, required=(BASE_SCORE,))[BASE_SCORE]
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
        raise ValueError(f"'{record}': its \"{BASE_SCORE}\" is {score!r}, not an exact match between 0 and 1. It was "
                         "changed or damaged outside TensLoRA; delete it and the next run scores the base again.")
    return score


def end_with_parent(parent: int) -> None:
    """Make this run process end when the sweep that started it ends, however it ends (SIGTERM, SIGKILL).

    Orphaned, it would train on with its run folder locked, and the rerun of the sweep would be refused.
    A run stopped so resumes from its last checkpoint. Linux only (``prctl``); elsewhere a Ctrl-C, which
    reaches the whole process group, still stops every run.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the sweep ended before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def beyond_edges(planned: Sequence[Point], runs: Sequence[dict[str, Any]]) -> dict[Point, float]:
    """The rate to try next for each point whose chosen rate is the largest (twice it) or the smallest (half)
    of those tried; a point with a tried rate on either side of its choice has none."""
    chosen = select_learning_rates(runs)
    tried: dict[RowKey, set[float]] = {}
    for run in runs:
        tried.setdefault(row_key(run), set()).add(run["lr"])
    edges = {}
    for point in planned:
        rate, rates = chosen[point.key], tried[point.key]
        if rate == max(rates):
            edges[point] = rate * 2
        elif rate == min(rates):
            edges[point] = rate / 2
    return edges


def other_rates_recorded(planned: Sequence[Point], runs: Sequence[dict[str, Any]], seeds: Sequence[int],
                         lrs: Sequence[float]) -> list[dict[str, Any]]:
    """The recorded runs of ``planned`` points with ``seeds`` at rates other than ``lrs`` (those an earlier
    ``--widen`` added): the choice of rates counts them, and so does a resumed sweep's progress."""
    points = {point.key for point in planned}
    grid = {f"{lr:g}" for lr in lrs}
    return [run for run in runs if row_key(run) in points and run["seed"] in seeds and f"{run['lr']:g}" not in grid]


def result_row(run: PlannedRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """One line of ``results.csv`` (its ``selected`` column is added by the reports); a diverged run has no
    scores, only the step it diverged at."""
    row = {"name": run.name, "construction": run.point.construction, "condition": run.point.condition,
           "budget": run.point.budget, "lr": run.lr, "seed": run.seed}
    if DIVERGED in metrics:
        return {**row, DIVERGED: metrics[DIVERGED]}
    adapter = metrics["adapter"]
    return {**row, "factorization": adapter["factorization"],
            "ranks": format_ranks(adapter["ranks"]), "adapter_parameters": metrics["adapter_parameters"],
            "trainable_parameters": metrics["trainable_parameters"],
            **{f"validation_{name}": value for name, value in metrics["validation"].items() if name in SCORES},
            **{f"test_{name}": value for name, value in metrics["test"].items() if name in SCORES},
            "wall_time_s": metrics["wall_time_s"]}


def shared_options(base: TrainOptions) -> dict[str, Any]:
    """The options every run of a sweep has (as recorded in ``run.json``)."""
    return {key: value for key, value in base.identity().items() if key not in PER_RUN_OPTIONS}


def recorded_notes(sweep_dir: Path, shared: dict[str, Any]) -> list[str]:
    """The notes of the sweep already in ``sweep_dir`` (none in a new folder); raise ``ValueError`` if it
    was run with other shared options, whose runs and results must not be mixed with these."""
    if not (sweep_dir / SWEEP_FILE).is_file():
        if (sweep_dir / RESULTS_FILE).exists():
            raise ValueError(f"'{sweep_dir}' holds the results of an earlier version of `tenslora sweep` (no "
                             f"{SWEEP_FILE}); sweep into a new folder.")
        if any(path.name != LOCK_FILE for path in sweep_dir.iterdir()):
            raise ValueError(f"'{sweep_dir}' is not empty and holds no sweep (no {SWEEP_FILE}); sweep into a new or "
                             "empty folder (the sweep writes runs/, results.csv, results.md and results.png there).")
        return []
    recorded = read_json(sweep_dir / SWEEP_FILE, required=("options", "notes"))
    differences = [f"{key}: {recorded['options'].get(key)!r} there, {value!r} now" for key, value in shared.items()
                   if recorded["options"].get(key) != value]
    if differences:
        raise ValueError(f"The sweep folder '{sweep_dir}' holds a sweep with other shared options "
                         f"({'; '.join(differences)}); choose another folder, or repeat those options to continue it.")
    return recorded["notes"]


def _busy(sweep_dir: Path) -> ValueError:
    return ValueError(f"Another `tenslora sweep` is running in '{sweep_dir}' (it holds {sweep_dir / LOCK_FILE}); "
                      "wait for it to finish, or sweep into another folder.")


def checked_model_config(base: TrainOptions) -> Any:
    """The config of the model the runs fine-tune (the task's default model unless one is given), once the
    task's data and the model's pre-processor are known to load: what every run would find wrong first."""
    data = inputs.load(base)
    if data.modality == CAUSAL_LM_TASK and not is_paired(data.splits["train"]):
        raise ValueError(f"A sweep compares scores that are higher when better; a --task {CAUSAL_LM_TASK} run has one "
                         "(exact match of its greedy answers) only on prompt and completion columns or a messages "
                         "column: give such data, or train plain texts with `tenslora train` run by run.")
    model = base.model or default_model(data.modality)
    load_preprocessor(model, data.modality, base.trust_remote_code)
    return load_model_config(model, base.trust_remote_code)


def refuse_repeats(what: str, values: Sequence[Any], label: str) -> None:
    """Two values that name the same runs (run folders hold a rate to 6 significant digits: ``lr0.01`` for 0.01 and
    0.0100000001) would train a run twice, or twice at once in one folder: ``ValueError``."""
    names: dict[str, list[Any]] = {}
    for value in values:
        names.setdefault(f"{label}{value:g}" if isinstance(value, float) else f"{label}{value}", []).append(value)
    for name, same in names.items():
        if len(same) > 1:
            raise ValueError(f"The {what} {' and '.join(map(str, same))} name the same runs ({name}): give each once"
                             + (", distinct in its first 6 significant digits." if isinstance(same[0], float) else "."))


def run_sweep(base: TrainOptions, sweep_dir: str | os.PathLike, lora_ranks: Sequence[int] = (8,),
              constructions: Sequence[str] = TENSOR_CONSTRUCTIONS, conditions: Sequence[str] = CONDITIONS,
              seeds: Sequence[int] = (0, 1, 2), jobs: int = 1, lrs: Sequence[float] = (),
              budgets: Sequence[int] = (), select_on_seed: int | None = None,
              widen: bool = False) -> list[dict[str, Any]]:
    """Run the sweep (finished runs are read back) and write its reports; return every run in the folder.

    ``lrs`` (default: ``base.lr`` alone) are tried at every point. With ``select_on_seed`` only that seed
    runs at every rate; the other seeds run at the rate it selects (validation score of that seed alone).
    With ``widen`` a row whose chosen rate is at an edge of those tried gets the next rate beyond it.
    """
    sweep_dir = Path(sweep_dir)
    lrs = list(lrs) or [base.lr]
    candidates = points(lora_ranks, constructions, conditions, budgets)
    if not seeds or min(lrs) <= 0:
        raise ValueError(f"A sweep needs at least one seed and positive learning rates (got seeds {list(seeds)}, "
                         f"learning rates {lrs}).")
    if widen and len(set(lrs)) < 2:
        raise ValueError(f"--widen extends a grid of learning rates past its edges; give --lrs two rates or more "
                         f"(got {lrs}).")
    if select_on_seed is not None and select_on_seed not in seeds:
        raise ValueError(f"The selection seed {select_on_seed} is not among the seeds {list(seeds)}; add it to them.")
    for what, values, label in (("learning rates", lrs, "lr"), ("seeds", seeds, "seed"),
                                ("LoRA ranks", lora_ranks, "r"), ("budgets", budgets, "p"),
                                ("constructions", constructions, ""), ("conditions", conditions, "")):
        refuse_repeats(what, values, label)
    base = dataclasses.replace(base, threads=base.threads or default_threads(base.kind, jobs))  # cores shared out
    runs = plan(base, sweep_dir, candidates, seeds, lrs)  # every run's options checked before anything is loaded
    shared = shared_options(base)
    model_config = checked_model_config(base)  # a model or data the runs cannot load is refused before any write
    with folder_lock(sweep_dir, _busy):  # one sweep at a time writes the folder's reports
        notes = recorded_notes(sweep_dir, shared)
        planned, skipped = reachable(candidates, base, model_config)
        for note in skipped:
            print(note, flush=True)
        notes = list(dict.fromkeys([*notes, *skipped]))
        write_json(sweep_dir / SWEEP_FILE, {"options": shared, "notes": notes})

        kept = set(planned)
        first = [run for run in runs if run.point in kept and select_on_seed in (None, run.seed)]
        table = {row["name"]: row for row in read_csv(sweep_dir / RESULTS_FILE)}
        choosing = sorted({run.seed for run in first})
        done = len(other_rates_recorded(planned, list(table.values()), choosing, lrs))  # an earlier --widen's
        total = done + len(first) + len(planned) * (len(seeds) - len(choosing))

        def record(run: PlannedRun, metrics: dict[str, Any]) -> None:
            nonlocal done
            done += 1
            table[run.name] = result_row(run, metrics)
            base_score = known_base_score(sweep_dir)
            if base_score is None and BASE_SCORE in metrics:
                base_score = metrics[BASE_SCORE]
                write_json(sweep_dir / BASE_FILE, {BASE_SCORE: base_score})
            write_reports(sweep_dir, list(table.values()), notes, base_score)
            scores = ", ".join(f"{key}={value:.4f}" for key, value in table[run.name].items()
                               if key.startswith(("validation_", "test_")))
            print(f"[{done}/{total}] {run.name}: {scores or f'diverged at step {metrics[DIVERGED]}'}", flush=True)

        execute(first, jobs, record)
        for _ in range(MAX_WIDENINGS if widen else 0):
            beyond = [run for point, rate in beyond_edges(planned, list(table.values())).items()
                      for run in plan(base, sweep_dir, [point], choosing, [rate])]
            if not beyond:
                break
            total += len(beyond)
            execute(beyond, jobs, record)
        if select_on_seed is not None:
            chosen = select_learning_rates(list(table.values()))
            execute([run for seed in seeds if seed != select_on_seed for point in planned
                     for run in plan(base, sweep_dir, [point], [seed], [chosen[point.key]])], jobs, record)
        return list(table.values())
