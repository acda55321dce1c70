"""The results of ``tenslora sweep``: the learning rate chosen on validation, and the three reports.

A *row* is one method at one budget: LoRA of rank r (budget ``lora:r``), a construction at
isorank r (``lora:r``: LoRA rank r's rank) or at an isoparameter budget (``lora:r``, LoRA rank r's
count, or a number of parameters). Its runs differ in learning rate and seed. The learning rate
of a row is chosen on the validation split, and its test scores are reported at that rate only:

- ``results.csv``: every run, with its ``lr`` and ``selected`` (run at its row's chosen rate);
- ``results.md``: per row, the chosen rate and the test scores over seeds (mean ± std and 95 %
  t-interval); each construction against LoRA at the same budget (paired by seed); the smallest
  adapter within one point of LoRA's largest rank on validation, with its test score; skipped budgets;
- ``results.png``: the frontier, test score against adapter parameters, one line per method.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ...data.metrics import main_metric
from ...files import atomic_destination, write_atomic
from ..runs import write_csv
from .stats import Estimate, format_estimate, paired_difference, t_interval

RowKey = tuple[str, str, str]  # (construction, condition, budget)
RESULTS_FILE = "results.csv"  # every run of the sweep, one per line
DIVERGED = "diverged_at_step"  # the column of results.csv that marks a run that diverged (it has no scores)

_INTEGER_COLUMNS = ("seed", "adapter_parameters", "trainable_parameters", DIVERGED)
_REQUIRED_COLUMNS = ("name", "construction", "condition", "budget", "lr", "seed")  # of every run
_SCORED_COLUMNS = ("ranks", "adapter_parameters", "trainable_parameters")  # of a run that did not diverge
_FLOAT_PREFIXES = ("test_", "validation_", "wall_time_s", "lr")
_CONDITION_ORDER = {"lora": 0, "isoparameter": 1, "isorank": 2}
ONE_POINT = 0.01  # a point of a score on [0, 1]: how far below LoRA's largest rank an adapter may be and still match it


def row_key(run: dict[str, Any]) -> RowKey:
    return run["construction"], run["condition"], run["budget"]


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The runs of an earlier ``results.csv`` (none if there is none), with their numbers as numbers;
    ``ValueError`` naming the file, the line and the field if it is damaged."""
    if not path.exists():
        return []
    runs = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            for run in reader:
                runs.append(_typed(path, reader.line_num, run))
    except (csv.Error, UnicodeDecodeError) as error:
        raise _damaged(path, f"it does not parse as CSV ({error})") from None
    return runs


def _typed(path: Path, line: int, run: dict[Any, Any]) -> dict[str, Any]:
    """One line of ``results.csv``: its fields checked, blank ones (a metric this run's task lacks) dropped."""
    if None in run:
        raise _damaged(path, f"line {line} has more fields than the header")
    run = {key: value for key, value in run.items() if value not in ("", None)}
    needed = _REQUIRED_COLUMNS if DIVERGED in run else (*_REQUIRED_COLUMNS, *_SCORED_COLUMNS)
    missing = [key for key in needed if key not in run]
    if missing:
        raise _damaged(path, f"line {line} has no {missing[0]!r} field")
    for key, value in run.items():
        kind = int if key in _INTEGER_COLUMNS else float if key.startswith(_FLOAT_PREFIXES) else None
        if key == "selected":
            run[key] = value == "True"
        elif kind is not None:
            try:
                run[key] = kind(value)
            except ValueError:
                expected = "an integer" if kind is int else "a number"
                raise _damaged(path, f"line {line}, field {key!r}: {value!r} is not {expected}") from None
    return run


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"'{path}' is damaged: {problem}. Restore it, or delete it and run the sweep's commands again "
                      "(finished runs are read back, not trained again).")


def metric_columns(runs: Iterable[dict[str, Any]], prefix: str = "test_") -> list[str]:
    return list(dict.fromkeys(key for run in runs for key in run if key.startswith(prefix)))


def selection_metric(runs: Iterable[dict[str, Any]]) -> str | None:
    """The metric the choices are made on (each row's rate, the smallest adapter matching LoRA): the task's own
    (``main_metric``: Matthews correlation for CoLA, F1 for MRPC, else accuracy); None without scores."""
    names = [column.removeprefix("validation_") for column in metric_columns(runs, "validation_")]
    return main_metric(names) if names else None


def select_learning_rates(runs: Sequence[dict[str, Any]]) -> dict[RowKey, float]:
    """Each row's learning rate: the best mean validation score (the task's own metric, ``selection_metric``)
    over the seeds every rate of the row was run with (over each rate's own seeds if they share none); ties go
    to the smaller rate. With the economy of ``--select-on-seed`` the only shared seed is the selection seed. A
    run that diverged scores below any other."""
    metric = f"validation_{selection_metric(runs)}"
    scores: dict[RowKey, dict[float, dict[int, float]]] = {}
    for run in runs:
        scores.setdefault(row_key(run), {}).setdefault(run["lr"], {})[run["seed"]] = run.get(metric, -math.inf)
    chosen = {}
    for key, by_lr in scores.items():
        shared = set.intersection(*(set(seeds) for seeds in by_lr.values()))

        def mean_score(lr: float, by_lr: dict[float, dict[int, float]] = by_lr, shared: set[int] = shared) -> float:
            return statistics.fmean(by_lr[lr][seed] for seed in (shared or by_lr[lr]))

        chosen[key] = max(sorted(by_lr), key=mean_score)
    return chosen


def with_selection(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs with their ``selected`` column (after ``seed``), recomputed from every run in the folder."""
    chosen = select_learning_rates(runs)
    marked = []
    for run in runs:
        columns = {key: value for key, value in run.items() if key != "selected"}
        position = list(columns).index("seed") + 1
        items = list(columns.items())
        items.insert(position, ("selected", columns["lr"] == chosen[row_key(run)]))
        marked.append(dict(items))
    return marked


def selected_rows(runs: Sequence[dict[str, Any]]) -> dict[RowKey, list[dict[str, Any]]]:
    """The selected runs that did not diverge, by row, in report order: LoRA, isoparameter, isorank; by
    construction, then size."""
    rows: dict[RowKey, list[dict[str, Any]]] = {}
    for run in runs:
        if run["selected"] and DIVERGED not in run:
            rows.setdefault(row_key(run), []).append(run)
    return dict(sorted(rows.items(), key=lambda item: (_CONDITION_ORDER.get(item[0][1], 3), item[0][0],
                                                        min(run["adapter_parameters"] for run in item[1]))))


def _distinct(runs: Sequence[dict[str, Any]], column: str) -> str:
    """The values of ``column``, each once (the same in every seed, unless the model changed)."""
    values = dict.fromkeys(run[column] for run in runs)
    return " / ".join(f"{value:,}" if isinstance(value, int) else str(value) for value in values)


def _learning_rates(runs: Sequence[dict[str, Any]], key: RowKey, chosen: float) -> str:
    """``0.005 of 0.003, 0.005, 0.01``: the chosen rate and those tried (a choice at an edge asks for more)."""
    tried = sorted({run["lr"] for run in runs if row_key(run) == key})
    return f"{chosen:g}" if len(tried) == 1 else f"{chosen:g} of {', '.join(f'{lr:g}' for lr in tried)}"


def _table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cells) + " |" for cells in lines)]


def _scores(runs: Sequence[dict[str, Any]], metric: str) -> list[float]:
    """The runs' scores on ``metric`` (a run of another task may not have it)."""
    return [run[metric] for run in runs if metric in run]


def _by_seed(runs: Sequence[dict[str, Any]], metric: str) -> dict[int, float]:
    return {run["seed"]: run[metric] for run in runs if metric in run}


def comparisons(rows: dict[RowKey, list[dict[str, Any]]],
                metrics: Sequence[str]) -> list[tuple[RowKey, dict[str, Estimate]]]:
    """Each construction at a LoRA budget (isoparameter, ``lora:r``) minus LoRA rank r, paired by the seeds
    both have."""
    found = []
    for (construction, condition, budget), runs in rows.items():
        lora = rows.get(("lora", "lora", budget))
        if condition != "isoparameter" or not lora:
            continue
        differences = {metric: paired_difference(_by_seed(runs, metric), _by_seed(lora, metric)) for metric in metrics}
        if all(differences.values()):
            found.append(((construction, condition, budget), differences))
    return found


def markdown_report(runs: Sequence[dict[str, Any]], notes: Sequence[str] = (),
                    base_test_exact_match: float | None = None) -> str:
    """The rows at their chosen learning rates (and the base model's score they improve on), the comparisons
    with LoRA, and the skipped budgets."""
    metrics = metric_columns(runs)
    names = [metric.removeprefix("test_") for metric in metrics]
    selection = selection_metric(runs) or "score"
    rows = selected_rows(runs)
    lines = ["# Sweep results", "",
             f"Test scores at each row's learning rate: mean ± standard deviation over seeds [95 % t-interval of "
             f"the mean]. A row's learning rate is, of those tried, the one with the best mean validation "
             f"{selection} over the seeds every "
             f"tried rate was run with.", ""]
    if base_test_exact_match is not None:
        lines += [f"The base model (adapter off) has a test exact match of {base_test_exact_match:.4f} on the same "
                  "examples.", ""]
    lines += _table(["condition", "construction", "budget", "ranks", "adapter parameters", "trainable parameters",
                     "lr", "seeds", *names],
                    ([key[1], key[0], key[2],
                      *(_distinct(group, column) for column in ("ranks", "adapter_parameters", "trainable_parameters")),
                      _learning_rates(runs, key, group[0]["lr"]), str(len(group)),
                      *(format_estimate(t_interval(_scores(group, m))) for m in metrics)]
                     for key, group in rows.items()))
    compared = comparisons(rows, metrics)
    if compared:
        lines += ["", "## Against LoRA at the same budget", "",
                  "Test score of the construction minus LoRA's, each at its own learning rate, paired by seed: "
                  "mean ± standard deviation [95 % t-interval].", ""]
        lines += _table(["construction", "budget", "paired seeds", *names],
                        ([construction, budget, str(next(iter(differences.values())).n),
                          *(format_estimate(differences[m], signed=True) for m in metrics)]
                         for (construction, _, budget), differences in compared))
        lines += ["", *_verdict(compared, metrics, names)]
    matching = _smallest_matching(rows, selection)
    if matching:
        lines += ["", "## Smallest adapter within one point of LoRA's largest rank", "",
                  f"Of every row (LoRA's ranks included), the one with the fewest adapter parameters whose mean "
                  f"validation {selection} is at most {ONE_POINT:g} below that of LoRA at its largest rank: chosen on "
                  f"validation, as the rates are, and reported on test (mean ± standard deviation over the row's "
                  f"seeds [95 % t-interval]).", "", matching]
    diverged = [run for run in runs if DIVERGED in run]
    if diverged:
        lines += ["", "## Diverged", "", "Runs whose loss became NaN or infinite (or, a causal LM's, passed twice that "
                  "of a uniform guess over its vocabulary): a rate at which a row diverged "
                  "counts as its worst in the choice of its rate; a seed that diverged at the chosen rate is left "
                  "out of the row's scores (see its number of seeds).", "",
                  *(f"- {run['name']}: diverged at step {run[DIVERGED]}" for run in diverged)]
    if notes:
        lines += ["", "## Skipped", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def _smallest_matching(rows: dict[RowKey, list[dict[str, Any]]], metric: str) -> str | None:
    """One line: LoRA at its largest rank and the smallest row whose mean validation ``metric`` is within one point
    of LoRA's, each with its test score (None without LoRA). The choice is made on validation: made on test, it
    would report the very scores it was picked for."""
    validation = {key: statistics.fmean(scores) for key, group in rows.items()
                  if (scores := _scores(group, f"validation_{metric}")) and _scores(group, f"test_{metric}")}
    size = {key: rows[key][0]["adapter_parameters"] for key in validation}
    lora = [key for key in validation if key[1] == "lora"]
    if not lora:
        return None
    reference = max(lora, key=size.__getitem__)
    smallest = min((key for key in validation if validation[key] >= validation[reference] - ONE_POINT),
                   key=size.__getitem__)

    def scores(key: RowKey) -> str:
        test = format_estimate(t_interval(_scores(rows[key], f"test_{metric}")))
        return f"validation {validation[key]:.4f}, test {test}"

    found = f"- {metric}: LoRA at {reference[2]} ({size[reference]:,} parameters): {scores(reference)}; "
    if smallest == reference:
        return found + f"no smaller adapter is within {ONE_POINT:g} of it on validation."
    return found + (f"the smallest adapter within {ONE_POINT:g} of it on validation is {smallest[0]} at {smallest[2]} "
                    f"({size[smallest]:,} parameters, {size[reference] / size[smallest]:.3g}× fewer): "
                    f"{scores(smallest)}.")


def _verdict(compared: Sequence[tuple[RowKey, dict[str, Estimate]]], metrics: Sequence[str],
             names: Sequence[str]) -> list[str]:
    """Which differences with LoRA exclude zero; those of a single paired seed have no interval to tell."""
    single = [f"{construction} at {budget}" for (construction, _, budget), differences in compared
              if next(iter(differences.values())).n < 2]
    excluding = [f"{construction} at {budget} ({name} {differences[m].mean:+.4f})"
                 for (construction, _, budget), differences in compared
                 for m, name in zip(metrics, names, strict=True) if differences[m].excludes_zero]
    lines = []
    if excluding:
        lines.append(f"Intervals that exclude zero: {'; '.join(excluding)}.")
    elif len(single) < len(compared):
        lines.append("No interval excludes zero: no construction differs from LoRA at its budget by more than the "
                     "seeds' spread allows to tell.")
    if single:
        lines.append(f"One paired seed, so no interval yet: {', '.join(single)}.")
    return lines


def plot(path: Path, runs: Sequence[dict[str, Any]], metrics: Sequence[str]) -> None:
    """The frontier, one panel a metric: test score against adapter parameters (log scale) at each row's
    chosen learning rate; a line per method (LoRA over its ranks, a construction over its isoparameter
    budgets), isorank rows as open circles; error bars one standard deviation over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = selected_rows(runs)
    constructions = list(dict.fromkeys(key[0] for key in rows if key[1] != "lora"))
    colours = {"lora": "black", **{c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(constructions)}}
    figure, panels = plt.subplots(1, len(metrics), figsize=(8 * len(metrics), 5), squeeze=False)
    for axes, metric in zip(panels[0], metrics, strict=True):
        lines: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
        for (construction, condition, _), group in rows.items():
            scores = _scores(group, metric)
            if scores:
                spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
                lines.setdefault((construction, condition), []).append(
                    (group[0]["adapter_parameters"], statistics.fmean(scores), spread))
        for (construction, condition), points in lines.items():
            x, y, error = zip(*sorted(points), strict=True)
            isorank = condition == "isorank"
            axes.errorbar(x, y, yerr=error, color=colours[construction], capsize=3,
                          linestyle="none" if isorank else "-",
                          marker="o" if isorank else ("*" if condition == "lora" else "s"),
                          markerfacecolor="none" if isorank else colours[construction],
                          markersize=10 if condition == "lora" else 6,
                          label="LoRA (ranks)" if condition == "lora" else f"{construction} ({condition})")
        axes.set_xscale("log")
        axes.set_xlabel("adapter parameters (log scale; a classifier's head not counted)")
        axes.set_ylabel(metric.removeprefix("test_").replace("_", " ") + " (test, ± std over seeds)")
        axes.grid(True, which="both", alpha=0.3)
    panels[0][0].legend(fontsize=7, ncol=2, loc="best")
    figure.tight_layout()
    try:
        with atomic_destination(path) as staging:
            figure.savefig(staging, dpi=120)
    finally:
        plt.close(figure)


def write_reports(sweep_dir: Path, runs: Sequence[dict[str, Any]], notes: Sequence[str] = (),
                  base_test_exact_match: float | None = None) -> None:
    """``results.csv``, ``results.md`` and ``results.png`` of every run in the folder (and the base model's
    score, a causal LM's, in ``results.md``)."""
    runs = with_selection(runs)
    write_csv(sweep_dir / RESULTS_FILE, runs)
    write_atomic(sweep_dir / "results.md", markdown_report(runs, notes, base_test_exact_match))
    metrics = metric_columns(runs)
    if metrics:
        plot(sweep_dir / "results.png", runs, metrics)
