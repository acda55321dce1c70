"""`tenslora sweep`: the plan, the learning rate chosen on validation, budgets, statistics, reports, resuming.

One real sweep on a tiny model and task runs every flag end to end; the tests of the selection and
the statistics replace the training by a stand-in whose scores they choose (validation and test
disagreeing on purpose), which makes them fast and exact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tenslora.app.sweep.run
import tiny_llm
from tenslora.app.cli import main
from tenslora.app.options import TrainOptions
from tenslora.app.runs import LOCK_FILE, check_not_busy
from tenslora.app.sweep.report import markdown_report, select_learning_rates, with_selection
from tenslora.app.sweep.run import plan, points, run_sweep
from tenslora.app.sweep.stats import format_estimate, t_interval
from tenslora.app.train import TrainingDiverged
from tenslora.files import atomic_destination
from test_cli import FLAGS, _error_line
from test_run_safety import _hold_lock_in_another_process
from test_train import tiny  # noqa: F401  (the session fixture of tiny models and data)

#: The test flags without the learning rate, which each sweep gives (--lr or --lrs).
SWEEP_FLAGS = [flag for i, flag in enumerate(FLAGS) if flag != "--lr" and FLAGS[i - 1] != "--lr"]


def _sweep(tiny, sweep_dir, *extra) -> int:  # noqa: F811
    return main(["sweep", str(sweep_dir), "--task", "glue-mrpc", "--data-dir", str(tiny / "mrpc"),
                 "--model", str(tiny / "bert"), "--constructions", "qkv_depth", *SWEEP_FLAGS, *extra])


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv") as handle:
        return list(csv.DictReader(handle))


def _table_line(sweep_dir: Path, start: str) -> str:
    return next(line for line in (sweep_dir / "results.md").read_text().splitlines() if line.startswith(start))


@pytest.fixture(scope="module")
def sweep_dir(tiny, tmp_path_factory) -> Path:  # noqa: F811
    """LoRA r=1, 2 and qkv_depth at their counts and at 150 parameters (10 is out of reach), two learning
    rates chosen on seed 0 (the economy), seeds 0 and 1: 5 rows, 5 x 2 + 5 runs."""
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert _sweep(tiny, out, "--lora-ranks", "1,2", "--conditions", "isoparameter", "--budgets", "150,10",
                  "--lrs", "1e-2,3e-2", "--select-on-seed", "0", "--seeds", "0,1") == 0
    return out


def test_points_then_plan_seed_major_and_rate_by_rate():
    found = points([2, 8], ["qkv", "att"], ["isorank", "isoparameter"], [1500])
    assert [point.stem for point in found[:5]] == ["lora-r2", "qkv-isorank-r2", "qkv-isoparameter-r2",
                                                  "att-isorank-r2", "att-isoparameter-r2"]
    assert [point.budget for point in found[-2:]] == ["1500", "1500"] and len(found) == 2 * 5 + 2
    runs = plan(TrainOptions(), Path("s"), found, [0, 1], [0.01, 0.005])
    assert len(runs) == len(found) * 2 * 2 and {run.seed for run in runs[:len(found) * 2]} == {0}
    by_name = {run.name: run.options for run in runs}
    assert by_name["lora-r8-lr0.005-seed1"].construction == "lora" and by_name["lora-r8-lr0.005-seed1"].lr == 0.005
    assert by_name["qkv-isoparameter-r2-lr0.01-seed0"].budget == "lora:2"
    assert by_name["qkv-isorank-r2-lr0.01-seed0"].budget is None and by_name["qkv-isorank-r2-lr0.01-seed0"].ranks == 2
    assert by_name["att-isoparameter-p1500-lr0.01-seed1"].budget == "1500"
    assert by_name["att-isorank-r8-lr0.01-seed1"].output_dir == str(Path("s") / "runs" / "att-isorank-r8-lr0.01-seed1")
    blocks = {run.name: run.options for run in plan(TrainOptions(construction="qkv", layout="blocks"), Path("s"),
                                                    found[:2], [0], [0.01])}
    assert blocks["lora-r2-lr0.01-seed0"].layout == "roles"  # LoRA has none; the constructions keep theirs
    assert blocks["qkv-isorank-r2-lr0.01-seed0"].layout == "blocks"


def test_sweep_selects_on_validation_and_reports_every_run(sweep_dir):
    rows = _rows(sweep_dir)
    assert list(rows[0])[:7] == ["name", "construction", "condition", "budget", "lr", "seed", "selected"]
    rows_by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        rows_by_key.setdefault((row["construction"], row["condition"], row["budget"]), []).append(row)
    assert sorted(rows_by_key) == [("lora", "lora", "lora:1"), ("lora", "lora", "lora:2"),
                                   ("qkv_depth", "isoparameter", "150"), ("qkv_depth", "isoparameter", "lora:1"),
                                   ("qkv_depth", "isoparameter", "lora:2")]
    for group in rows_by_key.values():
        seed0 = {float(row["lr"]): float(row["validation_accuracy"]) for row in group if row["seed"] == "0"}
        chosen = max(sorted(seed0), key=seed0.get)  # the economy: seed 0's validation score
        assert len(seed0) == 2 and {float(row["lr"]) for row in group if row["selected"] == "True"} == {chosen}
        assert [float(row["lr"]) for row in group if row["seed"] == "1"] == [chosen]  # seed 1 at that rate only
    for row in rows:
        assert (sweep_dir / "runs" / row["name"] / "adapter_model.safetensors").is_file()
        assert int(row["trainable_parameters"]) > int(row["adapter_parameters"]) > 0
    assert {row["ranks"] for row in rows_by_key["qkv_depth", "isoparameter", "150"]} == {"in=2,out=2,qkv=2,depth=2"}

    selected = [float(row["test_accuracy"]) for row in rows_by_key["qkv_depth", "isoparameter", "lora:2"]
                if row["selected"] == "True"]
    line = _table_line(sweep_dir, "| isoparameter | qkv_depth | lora:2 |")
    assert f"{statistics.mean(selected):.4f} ± {statistics.stdev(selected):.4f} [" in line
    assert " of 0.01, 0.03 | 2 |" in line  # the chosen rate of the two tried, and the seeds run at it
    report = (sweep_dir / "results.md").read_text()
    assert "## Against LoRA at the same budget" in report and "| qkv_depth | lora:1 | 2 |" in report
    assert "qkv_depth at budget 10: skipped. No ranks of the 'qkv_depth' construction" in report
    assert (sweep_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_again_reads_finished_runs_and_adds_new_ones(tiny, sweep_dir, capsys):  # noqa: F811
    adapter = sweep_dir / "runs" / "lora-r2-lr0.01-seed0" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns
    assert _sweep(tiny, sweep_dir, "--lora-rank", "2", "--conditions", "isorank", "--seeds", "0,2", "--lr", "1e-2",
                  "--jobs", "2") == 0
    assert adapter.stat().st_mtime_ns == written  # read back, not trained again
    names = [row["name"] for row in _rows(sweep_dir)]
    assert len(names) == len(set(names)) == 15 + 3  # the first sweep's runs, then seed 2's LoRA and two isorank
    assert {"lora-r2-lr0.01-seed2", "qkv_depth-isorank-r2-lr0.01-seed0",
            "qkv_depth-isorank-r2-lr0.01-seed2"} < set(names)
    assert "18 runs" in capsys.readouterr().out
    assert "| isorank | qkv_depth | lora:2 | in=2,out=2,qkv=2,depth=2 |" in (sweep_dir / "results.md").read_text()


def test_sweep_with_other_shared_options_into_the_same_folder_is_refused(tiny, sweep_dir, capsys):  # noqa: F811
    before = (sweep_dir / "results.csv").read_bytes()
    assert _sweep(tiny, sweep_dir, "--seeds", "0", "--lora-rank", "2", "--max-length", "16") == 2
    assert "holds a sweep with other shared options (max_length: 32 there, 16 now)" in _error_line(capsys)
    assert (sweep_dir / "results.csv").read_bytes() == before


def test_a_sweep_into_a_busy_or_foreign_folder_is_refused(tiny, sweep_dir, tmp_path, capsys):  # noqa: F811
    """While a sweep runs in the folder (it holds the lock), a second one is refused before it writes anything (it
    would rewrite the reports without the first one's rows); a folder of other files is not taken for a sweep's."""
    before = {name: (sweep_dir / name).read_bytes() for name in ("results.csv", "results.md", "sweep.json")}
    holder = _hold_lock_in_another_process(sweep_dir / LOCK_FILE)
    try:
        assert _sweep(tiny, sweep_dir, "--seeds", "5", "--lrs", "1e-2") == 2
        assert f"Another `tenslora sweep` is running in '{sweep_dir}'" in _error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    assert {name: (sweep_dir / name).read_bytes() for name in before} == before
    assert not list((sweep_dir / "runs").glob("*seed5"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.md").write_text("my notes")
    assert _sweep(tiny, notes, "--seeds", "0") == 2
    assert f"'{notes}' is not empty and holds no sweep (no sweep.json)" in _error_line(capsys)
    assert (notes / "results.md").read_text() == "my notes" and not (notes / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--conditions", "isobudget"], "Unknown condition(s) ['isobudget']"),
    (["--constructions", "qkv_depht"], "Unknown construction(s) ['qkv_depht']"),
    (["--constructions", "qkv,lora"], "leave 'lora' out of --constructions"),
    (["--seeds", "zero"], "--seeds takes comma-separated integers"),
    (["--lrs", "fast"], "--lrs takes comma-separated numbers"),
    (["--lrs", "1e-2,0"], "positive learning rates"),
    (["--lrs", ","], "--lrs takes comma-separated numbers, e.g. 3e-3,5e-3,1e-2; got ','"),  # not the default rate
    (["--lrs", ""], "--lrs takes comma-separated numbers"),
    (["--seeds", ","], "--seeds takes comma-separated integers"),
    # one run folder (lr0.01) for both: trained once, or twice at once with --jobs 2
    (["--lrs", "0.01,0.0100000001"], "The learning rates 0.01 and 0.0100000001 name the same runs (lr0.01): give "
                                     "each once, distinct in its first 6 significant digits."),
    (["--lrs", "1e-2,0.01"], "The learning rates 0.01 and 0.01 name the same runs (lr0.01)"),
    (["--seeds", "0,1,0", "--jobs", "2"], "The seeds 0 and 0 name the same runs (seed0): give each once."),
    (["--lora-ranks", "2,2"], "The LoRA ranks 2 and 2 name the same runs (r2)"),
    (["--lrs", "1e-2", "--lr", "1e-2"], "give one of them"),
    (["--lora-ranks", "0,8"], "at least one positive LoRA rank"),
    (["--budgets", "-5"], "Budgets are positive parameter counts"),
    (["--select-on-seed", "5"], "The selection seed 5 is not among the seeds [0, 1, 2]"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--widen"], "give --lrs two rates or more"),
])
def test_bad_sweep_options_are_one_line_and_exit_code_2(flags, message, tiny, tmp_path, capsys):  # noqa: F811
    assert main(["sweep", str(tmp_path / "sweep"), "--task", "glue-mrpc", "--data-dir", str(tiny / "mrpc"),
                 *flags]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("bad", ["model", "data"])
def test_a_model_or_data_the_runs_cannot_load_is_refused_before_the_sweep_writes_anything(bad, tiny, tmp_path,  # noqa: F811
                                                                                         capsys):
    """Checked once, before the folder (its sweep.json) is created; even with no isoparameter budget to compute."""
    empty = tmp_path / "empty"
    empty.mkdir()
    model, data = (tmp_path / "nowhere", tiny / "mrpc") if bad == "model" else (tiny / "bert", empty)
    assert main(["sweep", str(tmp_path / "sweep"), "--task", "glue-mrpc", "--data-dir", str(data), "--model",
                 str(model), "--constructions", "qkv_depth", "--conditions", "isorank", *SWEEP_FLAGS]) == 2
    assert str(model if bad == "model" else empty) in _error_line(capsys)
    assert not (tmp_path / "sweep").exists()


def test_a_damaged_diverged_record_stops_the_sweep_with_one_line_naming_it(tiny, tmp_path, monkeypatch,  # noqa: F811
                                                                          capsys):
    """Read back in each run's own process (--jobs 2): the run's error ends the sweep, as one line."""
    out, _ = _fake_sweep(tiny, tmp_path, monkeypatch, lambda options: (0.7, 0.7), "--seeds", "0")
    monkeypatch.undo()
    records = [out / "runs" / f"{stem}-lr0.01-seed1" / "diverged.json"
               for stem in ("lora-r2", "qkv_depth-isoparameter-r2")]
    for record in records:
        record.parent.mkdir(parents=True)
        record.write_text('{"diverged_at_step": "soon"}')
    assert _sweep(tiny, out, "--lora-rank", "2", "--conditions", "isoparameter", "--seeds", "1", "--jobs", "2") == 2
    line = _error_line(capsys)
    assert any(f"'{record}': its \"diverged_at_step\" is 'soon'" in line for record in records)
    assert [record.read_text() for record in records] == ['{"diverged_at_step": "soon"}'] * 2


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data.replace(b",0.01,", b",fast,", 1), "line 2, field 'lr': 'fast' is not a number"),
    (lambda data: data.replace(b",0.01,0,", b",0.01,,", 1), "line 2 has no 'seed' field"),
    (lambda data: re.sub(rb"(\n[^\r\n]*)", rb"\1,extra", data, count=1), "line 2 has more fields than the header"),
    (lambda data: data + b"\xff\xfe\r\n", "it does not parse as CSV"),
])
def test_a_damaged_results_file_is_refused_naming_the_file_and_the_field(damage, problem, tiny, tmp_path,  # noqa: F811
                                                                        monkeypatch, capsys):
    out, _ = _fake_sweep(tiny, tmp_path, monkeypatch, lambda options: (0.7, 0.7), "--seeds", "0")
    results = out / "results.csv"
    results.write_bytes(damage(results.read_bytes()))
    before = results.read_bytes()
    assert _sweep(tiny, out, "--lora-rank", "2", "--conditions", "isoparameter", "--seeds", "0") == 2
    assert f"'{results}' is damaged: {problem}" in _error_line(capsys)
    assert results.read_bytes() == before


def _busy(run_dir: Path) -> bool:
    try:
        check_not_busy(run_dir)
    except ValueError:
        return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the run processes follow the sweep through prctl")
def test_killing_the_sweep_ends_its_runs_so_the_rerun_is_not_refused(tiny, tmp_path):  # noqa: F811
    """SIGKILL to the sweep while two runs train: the run processes end too, and free their run folders.

    Slow (~15 s on 2 cores): a real sweep and its two real worker processes, since only a real kill shows it."""
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "tenslora", "sweep", str(out), "--task", "glue-mrpc", "--data-dir",
               str(tiny / "mrpc"), "--model", str(tiny / "bert"), "--constructions", "qkv_depth", "--conditions",
               "isorank", "--seeds", "0", "--jobs", "2", "--epochs", "1000", "--batch-size", "2", "--max-length", "32",
               "--no-bf16"]
    runs = [out / "runs" / "lora-r8-lr0.01-seed0", out / "runs" / "qkv_depth-isorank-r8-lr0.01-seed0"]
    sweep = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    try:
        deadline = time.monotonic() + 120
        while not all(_busy(run) for run in runs):
            assert sweep.poll() is None and time.monotonic() < deadline, "the two runs did not start"
            time.sleep(0.1)
        children = _children(sweep.pid)
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
        deadline = time.monotonic() + 30
        while any(_busy(run) for run in runs):
            assert time.monotonic() < deadline, "a run went on training after its sweep was killed"
            time.sleep(0.1)
        assert not any((run / "metrics.json").exists() for run in runs)
    finally:  # whatever failed, leave no process training on
        for pid in [sweep.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sweep.wait()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux: the fourth field of /proc/<pid>/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path):
    report = tmp_path / "results.png"
    report.write_bytes(b"earlier plot")
    with pytest.raises(RuntimeError), atomic_destination(report) as staging:
        staging.write_bytes(b"half a plot")
        raise RuntimeError("the writer failed")
    assert report.read_bytes() == b"earlier plot" and sorted(tmp_path.iterdir()) == [report]


# The selection and the statistics, with a stand-in for the training whose scores the test chooses.

def _stand_in(scores):
    """A ``run_training`` returning ``scores(options) -> (validation, test)`` accuracies; records the runs."""
    calls = []

    def run_training(options: TrainOptions, base_test_exact_match: float | None = None) -> dict:
        calls.append(options)
        validation, test = scores(options)
        parameters = 100 * options.ranks if options.budget is None else 50 * len(options.budget)
        return {"validation": {"accuracy": validation, "loss": 1.0}, "test": {"accuracy": test},
                "adapter": {"factorization": "tucker", "ranks": options.ranks}, "adapter_parameters": parameters,
                "trainable_parameters": parameters + 10, "wall_time_s": 0.1}

    return run_training, calls


def _fake_sweep(tiny, tmp_path, monkeypatch, scores, *extra):  # noqa: F811
    run_training, calls = _stand_in(scores)
    monkeypatch.setattr(tenslora.app.sweep.run, "run_training", run_training)
    out = tmp_path / "sweep"
    assert _sweep(tiny, out, "--lora-rank", "2", "--conditions", "isoparameter", *extra) == 0
    return out, calls


def test_the_learning_rate_is_chosen_on_validation_and_reported_on_test(tiny, tmp_path, monkeypatch):  # noqa: F811
    """Validation prefers 0.01 for qkv_depth and 0.1 for LoRA; test prefers the other: each row reports
    the test score at its own validation choice."""
    def scores(options):
        lora = options.construction == "lora"
        better = (options.lr == 0.1) == lora
        return (0.8 if better else 0.6), (0.5 if better else 0.9) + 0.01 * options.seed

    out, calls = _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--lrs", "0.01,0.1", "--seeds", "0,1,2")
    assert len(calls) == 2 * 2 * 3
    chosen = {(row["construction"], float(row["lr"])) for row in _rows(out) if row["selected"] == "True"}
    assert chosen == {("lora", 0.1), ("qkv_depth", 0.01)}
    assert "| 0.1 of 0.01, 0.1 | 3 | 0.5100 ± 0.0100 [0.4852, 0.5348] |" in _table_line(out, "| lora | lora |")
    assert "| 0.01 of 0.01, 0.1 | 3 | 0.5100 ± 0.0100 [" in _table_line(out, "| isoparameter | qkv_depth |")


@pytest.mark.parametrize("validation, chosen", [
    # 0.1 is best on seed 0 and on the best seed, 0.01 on the mean over the seeds: the mean decides
    ({0.1: (0.9, 0.5, 0.5), 0.01: (0.7, 0.7, 0.7)}, 0.01),
    ({0.1: (0.7, 0.7, 0.7), 0.01: (0.7, 0.7, 0.7)}, 0.01),  # a tie goes to the smaller rate
    ({0.1: (0.7, 0.8, 0.7), 0.01: (0.7, 0.7, 0.7)}, 0.1),
])
def test_without_the_economy_the_rate_is_chosen_on_the_mean_over_seeds(validation, chosen, tiny, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    out, _ = _fake_sweep(tiny, tmp_path, monkeypatch, lambda options: (validation[options.lr][options.seed], 0.7),
                         "--lrs", "0.01,0.1", "--seeds", "0,1,2")
    assert {float(row["lr"]) for row in _rows(out) if row["selected"] == "True"} == {chosen}


def test_a_seed_that_diverges_at_the_chosen_rate_leaves_the_row_with_the_others(tiny, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """Seed 0 chooses 0.01; seed 1, run there only (the economy), diverges: the row reports seeds 0 and 2."""
    def scores(options):
        if options.seed == 1:
            raise TrainingDiverged("Training diverged at step 3", 3)
        return (0.8 if options.lr == 0.01 else 0.6), 0.6 + 0.01 * options.seed

    out, _ = _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--lrs", "0.01,0.1", "--seeds", "0,1,2",
                         "--select-on-seed", "0")
    assert "| 0.01 of 0.01, 0.1 | 2 | 0.6100 ± 0.0141 [" in _table_line(out, "| lora | lora |")


def test_the_economy_runs_the_other_seeds_at_the_rate_seed_0_selects(tiny, tmp_path, monkeypatch):  # noqa: F811
    def scores(options):  # seed 0 prefers 0.1, every other seed 0.01: the choice is seed 0's
        return (0.8 if (options.lr == 0.1) == (options.seed == 0) else 0.6), 0.7

    out, calls = _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--lrs", "0.01,0.1", "--seeds", "0,1,2",
                             "--select-on-seed", "0")
    assert sorted((options.construction, options.seed, options.lr) for options in calls) == sorted(
        [(construction, 0, lr) for construction in ("lora", "qkv_depth") for lr in (0.01, 0.1)]
        + [(construction, seed, 0.1) for construction in ("lora", "qkv_depth") for seed in (1, 2)])
    assert {float(row["lr"]) for row in _rows(out) if row["selected"] == "True"} == {0.1}


@pytest.mark.parametrize("gap, seeds, verdict", [
    (0.02, "0,1,2", "Intervals that exclude zero: qkv_depth at lora:2 (accuracy +0.02"),
    (0.0, "0,1,2", "No interval excludes zero"),
    (0.02, "0", "One paired seed, so no interval yet: qkv_depth at lora:2."),
])
def test_differences_with_lora_are_paired_by_seed(gap, seeds, verdict, tiny, tmp_path, monkeypatch):  # noqa: F811
    """The seeds move both methods by up to 10 points, the construction is ``gap`` above LoRA give or take
    0.1 point: paired by seed, a gap of 2 points is clear; none is not; one seed tells nothing yet."""
    def scores(options):
        shift = 0.1 * options.seed + (0.001 * (-1) ** options.seed + gap if options.construction != "lora" else 0)
        return 0.7, 0.6 + shift

    out, _ = _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--seeds", seeds)
    report = (out / "results.md").read_text()
    assert verdict in report
    assert ("No interval excludes zero" in report) == (verdict == "No interval excludes zero")
    paired = [int(seed) for seed in seeds.split(",")]
    mean = gap + 0.001 * sum((-1) ** seed for seed in paired) / len(paired)
    assert _table_line(out, f"| qkv_depth | lora:2 | {len(paired)} |").startswith(
        f"| qkv_depth | lora:2 | {len(paired)} | {mean:+.4f}")


@pytest.mark.parametrize("best, tried, chosen", [
    (0.04, [0.005, 0.01, 0.02, 0.04, 0.08], 0.04),  # up twice to the best, once more to see it fall
    (0.0025, [0.00125, 0.0025, 0.005, 0.01], 0.0025),  # down
    (1.0, [0.005, 0.01, 0.02, 0.04, 0.08], 0.08),  # still rising after three more rates: the widening stops
])
def test_widen_tries_past_the_edge_of_the_grid_until_the_choice_is_inside(best, tried, chosen, tiny, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """The validation score peaks at ``best``; with the economy only seed 0 widens, seed 1 runs at the choice."""
    def scores(options):
        return 1 - abs(math.log2(options.lr / best)) / 100, 0.7

    out, calls = _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--lrs", "0.005,0.01", "--seeds", "0,1",
                             "--select-on-seed", "0", "--widen")
    for construction in ("lora", "qkv_depth"):
        rates = {seed: sorted(round(options.lr, 8) for options in calls
                              if options.construction == construction and options.seed == seed) for seed in (0, 1)}
        assert rates == {0: tried, 1: [chosen]}
    assert {round(float(row["lr"]), 8) for row in _rows(out) if row["selected"] == "True"} == {chosen}


def test_a_resumed_sweep_counts_the_rates_an_earlier_widening_added(tiny, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Widened from 0.005, 0.01 down to 0.00125 in a first invocation, the same command again goes over the
    grid's rates and seed 1's run at the choice (read back, or here run by a stand-in), and its progress counts
    the two rates widening added too: the whole study."""
    def scores(options):
        return 1 - abs(math.log2(options.lr / 0.0025)) / 100, 0.7

    flags = ("--lrs", "0.005,0.01", "--seeds", "0,1", "--select-on-seed", "0", "--widen")
    _fake_sweep(tiny, tmp_path, monkeypatch, scores, *flags)
    capsys.readouterr()
    _, calls = _fake_sweep(tiny, tmp_path, monkeypatch, scores, *flags)
    runs = 2 * (4 + 1)  # LoRA and qkv_depth, each at 4 rates with seed 0 and at its choice with seed 1
    assert len(calls) == 2 * (2 + 1)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert progress[-1].startswith(f"[{runs}/{runs}] ")


def test_a_rate_at_which_a_method_diverges_loses_the_choice_and_is_not_trained_again(tiny, tmp_path,  # noqa: F811
                                                                                      monkeypatch):
    """qkv_depth diverges at 0.1, where its validation score would otherwise be the best: the sweep goes on,
    chooses 0.01 for it, reports the divergence, and the same sweep again does not train that run again."""
    def scores(options):
        if options.construction == "qkv_depth" and options.lr == 0.1:
            raise TrainingDiverged("Training diverged at step 7", 7)
        return (0.8 if options.lr == 0.1 else 0.6), 0.7

    out, calls = _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--lrs", "0.01,0.1", "--seeds", "0")
    diverged = "qkv_depth-isoparameter-r2-lr0.1-seed0"
    assert len(calls) == 4
    rows = {row["name"]: row for row in _rows(out)}
    assert rows[diverged]["diverged_at_step"] == "7" and rows[diverged]["test_accuracy"] == ""
    assert {(row["construction"], row["lr"]) for row in rows.values() if row["selected"] == "True"} == {
        ("lora", "0.1"), ("qkv_depth", "0.01")}
    assert "| 0.01 of 0.01, 0.1 | 1 | 0.7000 |" in _table_line(out, "| isoparameter | qkv_depth |")
    assert f"- {diverged}: diverged at step 7" in (out / "results.md").read_text()

    again, calls_again = _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--lrs", "0.01,0.1", "--seeds", "0")
    assert again == out and diverged not in {Path(options.output_dir).name for options in calls_again}
    assert len(calls_again) == 3 and _rows(out) == list(rows.values())


def test_budgets_out_of_reach_or_repeating_ranks_are_skipped_with_a_note(tiny, tmp_path, monkeypatch,  # noqa: F811
                                                                          capsys):
    out, calls = _fake_sweep(tiny, tmp_path, monkeypatch, lambda options: (0.7, 0.7), "--seeds", "0",
                             "--budgets", "100,60,10")
    assert sorted(options.budget or "-" for options in calls) == ["-", "100", "lora:2"]
    notes = ["qkv_depth at budget 60: skipped, the same ranks (in=1,out=1,qkv=1,depth=1) as at budget 100.",
             "qkv_depth at budget 10: skipped. No ranks of the 'qkv_depth' construction with tucker come near a "
             "budget of 10 parameters (closest: 70)."]
    printed, report = capsys.readouterr().out, (out / "results.md").read_text()
    assert all(note in printed and f"- {note}" in report for note in notes)


def test_the_frontier_plots_each_method_at_its_parameters_with_the_spread_over_seeds(tiny, tmp_path,  # noqa: F811
                                                                                    monkeypatch):
    """One line per method over its budgets (log x), each point the mean test score over seeds at the chosen
    rate, its error bar the standard deviation."""
    import matplotlib.pyplot

    figures = []
    monkeypatch.setattr(matplotlib.pyplot, "close", figures.append)  # keep the figure the report draws

    def scores(options):
        return 0.7, (0.6 if options.construction == "lora" else 0.5) + 0.1 * options.seed

    _fake_sweep(tiny, tmp_path, monkeypatch, scores, "--seeds", "0,1,2", "--budgets", "100")
    axes = figures[-1].axes[0]
    assert axes.get_xscale() == "log"
    lines = {container.get_label(): container for container in axes.containers}
    assert sorted(lines) == ["LoRA (ranks)", "qkv_depth (isoparameter)"]
    for label, x, y in [("LoRA (ranks)", [200], [0.7]), ("qkv_depth (isoparameter)", [150, 300], [0.6, 0.6])]:
        line, _, (bars,) = lines[label].lines
        assert list(line.get_xdata()) == x and line.get_ydata() == pytest.approx(y)
        assert [segment[1][1] - segment[0][1] for segment in bars.get_segments()] == pytest.approx([0.2] * len(x))


@pytest.mark.parametrize("at_100, answer", [
    # within a point of LoRA r=2 on validation, though 10 points below it on test: chosen, and its test score shown
    ((0.795, 0.70), "the smallest adapter within 0.01 of it on validation is qkv_depth at 100 (150 parameters, "
                    "1.33× fewer): validation 0.7950, test {}."),
    # level with LoRA on test, but not within a point on validation: not chosen (test would choose it)
    ((0.785, 0.80), "no smaller adapter is within 0.01 of it on validation."),
])
def test_the_smallest_adapter_within_one_point_of_lora_is_chosen_on_validation(at_100, answer, tiny,  # noqa: F811
                                                                               tmp_path, monkeypatch):
    """LoRA r=2 (200 parameters in the stand-in) scores 0.80 on validation and test, r=1 (100) 0.70, qkv_depth at
    LoRA's counts (300) 0.70: only qkv_depth at 100 parameters (150) can match r=2 with fewer parameters. Two seeds,
    whose test scores differ by 0.01: each row's test score comes with its interval."""
    def scores(options):
        if options.construction == "lora":
            validation, test = (0.8, 0.8) if options.ranks == 2 else (0.7, 0.7)
        else:
            validation, test = at_100 if options.budget == "100" else (0.7, 0.7)
        return validation, test + 0.01 * options.seed

    run_training, _ = _stand_in(scores)
    monkeypatch.setattr(tenslora.app.sweep.run, "run_training", run_training)
    out = tmp_path / "sweep"
    assert _sweep(tiny, out, "--lora-ranks", "1,2", "--budgets", "100", "--conditions", "isoparameter",
                  "--lr", "0.01", "--seeds", "0,1") == 0
    report = (out / "results.md").read_text()
    lora = format_estimate(t_interval([0.80, 0.81]))
    assert f"- accuracy: LoRA at lora:2 (200 parameters): validation 0.8000, test {lora}; " in report
    assert answer.format(format_estimate(t_interval([at_100[1], at_100[1] + 0.01]))) in report


@pytest.mark.parametrize("metric", ["matthews_correlation", "f1"])
def test_the_rate_is_chosen_on_the_task_s_own_metric(metric):
    """CoLA (Matthews correlation) and MRPC (F1) report accuracy first, which a majority-class guess inflates:
    accuracy prefers 0.01, the task's own metric 0.1, and 0.1 is chosen."""
    runs = [{"name": f"lora-r2-lr{lr:g}-seed0", "construction": "lora", "condition": "lora", "budget": "lora:2",
             "lr": lr, "seed": 0, "ranks": "2", "adapter_parameters": 200, "trainable_parameters": 210,
             "validation_accuracy": accuracy, f"validation_{metric}": own, "test_accuracy": 0.7, f"test_{metric}": 0.3}
            for lr, accuracy, own in ((0.01, 0.9, 0.1), (0.1, 0.7, 0.5))]
    assert select_learning_rates(runs) == {("lora", "lora", "lora:2"): 0.1}
    assert f"the best mean validation {metric} over the seeds" in markdown_report(with_selection(runs))


def test_a_causal_lm_sweep_of_plain_texts_is_refused_before_anything_is_written(tmp_path):
    """Plain texts give a causal LM a loss only (lower is better): nothing a sweep can select on."""
    tiny_llm.save_model_folder(tmp_path / "llama")
    (tmp_path / "data.jsonl").write_text("".join(f'{{"text": "{text}"}}\n' for text in tiny_llm.sentences(20)))
    options = TrainOptions(task="causal-lm", train_file=str(tmp_path / "data.jsonl"), model=str(tmp_path / "llama"))
    with pytest.raises(ValueError, match="exact match of its greedy answers"):
        run_sweep(options, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_a_causal_lm_sweep_selects_and_reports_on_exact_match(tmp_path, monkeypatch):
    """LoRA against a construction on prompt/completion data: every run records the exact match of its answers on
    validation and test, and the rate of each row is chosen on the validation one. The base model, the same for
    every run, is scored by the first run only and reported once."""
    tiny_llm.save_model_folder(tmp_path / "llama")
    pairs = zip(tiny_llm.sentences(40, 1, 4), tiny_llm.sentences(40, 2, 2), strict=True)
    (tmp_path / "pairs.jsonl").write_text("".join(f'{{"prompt": "{prompt}", "completion": " {completion}"}}\n'
                                                  for prompt, completion in pairs))
    generated = []
    exact_match = tenslora.app.train.exact_match
    monkeypatch.setattr(tenslora.app.train, "exact_match", lambda model, tokenizer, rows, split, **kwargs: (
        generated.append(split), exact_match(model, tokenizer, rows, split, **kwargs))[1])
    options = TrainOptions(task="causal-lm", train_file=str(tmp_path / "pairs.jsonl"), model=str(tmp_path / "llama"),
                           roles="q,v", max_steps=2, batch_size=8, max_length=16, bf16=False)
    rows = run_sweep(options, tmp_path / "sweep", lora_ranks=(1,), constructions=("qkv_depth",),
                     conditions=("isoparameter",), seeds=(0,), lrs=(1e-2, 2e-2))
    assert len(rows) == 4 and all(0 <= row["validation_exact_match"] <= 1 and 0 <= row["test_exact_match"] <= 1
                                  for row in rows)
    assert generated == ["validation", "test", "test", *["validation", "test"] * 3]  # the base's test: once
    base = json.loads((tmp_path / "sweep" / "base.json").read_text())["base_test_exact_match"]
    assert {json.loads(path.read_text())["base_test_exact_match"]
            for path in (tmp_path / "sweep" / "runs").glob("*/metrics.json")} == {base}
    report = (tmp_path / "sweep" / "results.md").read_text()
    assert "the best mean validation exact_match over the seeds" in report
    assert f"The base model (adapter off) has a test exact match of {base:.4f} on the same examples." in report


@pytest.mark.parametrize("content", ['{"base_test_exact_match": 7}', '{"base_test_exact_match": "none"}', "{"])
def test_a_damaged_base_score_is_refused_naming_the_file(tiny, tmp_path, monkeypatch, capsys, content):  # noqa: F811
    """The sweep's record of the base model's score is read back before a run: damaged, it stops the sweep with one
    line naming it (a run would record the wrong base)."""
    out, _ = _fake_sweep(tiny, tmp_path, monkeypatch, lambda options: (0.7, 0.7), "--seeds", "0")
    (out / "base.json").write_text(content)
    assert _sweep(tiny, out, "--lora-rank", "2", "--conditions", "isoparameter", "--seeds", "1") == 2
    line = _error_line(capsys)
    assert f"'{out / 'base.json'}'" in line and ("between 0 and 1" in line or "JSON" in line)
    assert (out / "base.json").read_text() == content


def test_a_causal_lm_sweep_shares_the_cores_out_among_its_jobs(tmp_path, monkeypatch):
    """Without --threads each of the --jobs runs gets its share of the cores (a causal LM's default is every
    core: two jobs of two threads each on two cores would fight over them)."""
    tiny_llm.save_model_folder(tmp_path / "llama")
    pairs = zip(tiny_llm.sentences(40, 1, 4), tiny_llm.sentences(40, 2, 2), strict=True)
    (tmp_path / "pairs.jsonl").write_text("".join(f'{{"prompt": "{prompt}", "completion": " {completion}"}}\n'
                                                  for prompt, completion in pairs))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    planned = []

    class Planned(Exception):
        pass

    def execute(runs, jobs, on_result):
        planned.extend((run.options.threads, jobs) for run in runs)
        raise Planned

    monkeypatch.setattr(tenslora.app.sweep.run, "execute", execute)
    options = TrainOptions(task="causal-lm", train_file=str(tmp_path / "pairs.jsonl"), model=str(tmp_path / "llama"),
                           roles="q,v", max_steps=2, batch_size=8, max_length=16, bf16=False)
    with pytest.raises(Planned):
        run_sweep(options, tmp_path / "sweep", lora_ranks=(1,), constructions=("qkv_depth",),
                  conditions=("isoparameter",), seeds=(0,), jobs=2)
    assert planned and set(planned) == {(2, 2)}
    with pytest.raises(Planned):
        run_sweep(dataclasses.replace(options, threads=3), tmp_path / "sweep", lora_ranks=(1,),
                  constructions=("qkv_depth",), conditions=("isoparameter",), seeds=(0,), jobs=2)
    assert set(planned[len(planned) // 2:]) == {(3, 2)}
