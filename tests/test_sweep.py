"""`tenslora sweep` on a tiny model and task: the plan, resuming, accumulating, the three reports, errors."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from tenslora.cli import main
from tenslora.options import TrainOptions
from tenslora.runs import atomic_destination
from tenslora.sweep import plan
from test_cli import FLAGS, _error_line
from test_train import tiny  # noqa: F401  (the session fixture of tiny models and data)


def _sweep(tiny, sweep_dir, *extra) -> int:  # noqa: F811
    return main(["sweep", str(sweep_dir), "--task", "glue-mrpc", "--data-dir", str(tiny / "mrpc"),
                 "--model", str(tiny / "bert"), "--lora-rank", "2", "--constructions", "qkv_depth", *FLAGS, *extra])


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def sweep_dir(tiny, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    assert _sweep(tiny, out, "--seeds", "0,1") == 0
    return out


def test_plan_is_lora_then_each_condition_seed_major():
    runs = plan(TrainOptions(), Path("s"), 8, ["qkv", "att"], ["isorank", "isoparameter"], [0, 1])
    assert [run.name for run in runs[:5]] == ["lora-r8-seed0", "qkv-isorank-r8-seed0", "qkv-isoparameter-r8-seed0",
                                              "att-isorank-r8-seed0", "att-isoparameter-r8-seed0"]
    assert len(runs) == 10 and {run.seed for run in runs[5:]} == {1}
    by_name = {run.name: run.options for run in runs}
    assert by_name["lora-r8-seed1"].construction == "lora" and by_name["lora-r8-seed1"].seed == 1
    assert by_name["qkv-isoparameter-r8-seed0"].budget == "lora:8" and by_name["qkv-isorank-r8-seed0"].budget is None
    assert by_name["att-isorank-r8-seed1"].output_dir == str(Path("s") / "runs" / "att-isorank-r8-seed1")


def test_sweep_writes_one_row_a_run_and_the_reports(sweep_dir):
    rows = _rows(sweep_dir)
    assert sorted((row["condition"], row["seed"]) for row in rows) == sorted(
        (condition, seed) for condition in ("lora", "isorank", "isoparameter") for seed in "01")
    lora = {int(row["adapter_parameters"]) for row in rows if row["condition"] == "lora"}
    matched = {int(row["adapter_parameters"]) for row in rows if row["condition"] == "isoparameter"}
    isorank = {row["ranks"] for row in rows if row["condition"] == "isorank"}
    assert len(lora) == len(matched) == 1 and 0.5 <= matched.pop() / lora.pop() <= 2.0
    assert isorank == {"in=2,out=2,qkv=2,depth=2"}  # the ranks in effect, one per mode
    for row in rows:
        assert (sweep_dir / "runs" / row["name"] / "adapter_model.safetensors").is_file()
        assert int(row["trainable_parameters"]) > int(row["adapter_parameters"]) > 0
    table = (sweep_dir / "results.md").read_text().splitlines()
    assert table[0].startswith("| condition | construction | ranks | adapter parameters | trainable parameters")
    assert "f1" in table[0] and len(table) == 2 + 3 and table[2].startswith("| lora | lora |")
    accuracies = [float(row["test_accuracy"]) for row in rows if row["condition"] == "isoparameter"]
    expected = f"{statistics.mean(accuracies):.4f} ± {statistics.stdev(accuracies):.4f}"
    assert any(line.startswith("| isoparameter | qkv_depth |") and expected in line for line in table)
    assert (sweep_dir / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_again_reads_finished_runs_and_adds_new_ones(tiny, sweep_dir, capsys):  # noqa: F811
    adapter = sweep_dir / "runs" / "lora-r2-seed0" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns
    assert _sweep(tiny, sweep_dir, "--seeds", "0,2", "--conditions", "isoparameter", "--jobs", "2") == 0
    assert adapter.stat().st_mtime_ns == written  # read back, not trained again
    names = [row["name"] for row in _rows(sweep_dir)]
    assert len(names) == len(set(names)) == 6 + 2  # the first sweep's six runs and seed 2's two
    assert {"lora-r2-seed2", "qkv_depth-isoparameter-r2-seed2", "qkv_depth-isorank-r2-seed1"} <= set(names)
    assert "8 runs" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--conditions", "isobudget"], "Unknown condition(s) ['isobudget']"),
    (["--constructions", "qkv_depht"], "Unknown construction(s) ['qkv_depht']"),
    (["--seeds", "zero"], "--seeds takes comma-separated integers"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_sweep_options_are_one_line_and_exit_code_2(flags, message, tiny, tmp_path, capsys):  # noqa: F811
    assert main(["sweep", str(tmp_path / "sweep"), "--task", "glue-mrpc", "--data-dir", str(tiny / "mrpc"),
                 *flags]) == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "sweep").exists()


def test_a_failing_run_stops_the_sweep_with_its_error(tiny, tmp_path, capsys):  # noqa: F811
    """LoRA rank 1000's count is out of qkv_depth's reach on a 32-wide model: that run fails in its worker."""
    assert _sweep(tiny, tmp_path / "sweep", "--lora-rank", "1000", "--conditions", "isoparameter", "--seeds", "0,1",
                  "--jobs", "2") == 2
    assert "budget" in _error_line(capsys)



def test_sweep_with_other_options_into_the_same_folder_is_refused(tiny, sweep_dir, capsys):  # noqa: F811
    before = (sweep_dir / "results.csv").read_bytes()
    assert _sweep(tiny, sweep_dir, "--seeds", "0", "--lr", "0.5") == 2
    assert "holds a different run" in _error_line(capsys)
    assert (sweep_dir / "results.csv").read_bytes() == before


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path):
    report = tmp_path / "results.png"
    report.write_bytes(b"earlier plot")
    with pytest.raises(RuntimeError), atomic_destination(report) as staging:
        staging.write_bytes(b"half a plot")
        raise RuntimeError("the writer failed")
    assert report.read_bytes() == b"earlier plot" and sorted(tmp_path.iterdir()) == [report]
