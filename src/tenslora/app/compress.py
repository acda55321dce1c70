"""``tenslora compress``: a trained run's Tucker / tensor-train adapter truncated to smaller ranks, written as a run.

The new folder is a run like the one it comes from (adapter, tokenizer or image processor, ``run.json``), so
``tenslora eval``, ``merge`` and ``export-lora`` take it; its ``metrics.json`` holds the compression (ranks and
parameters before and after, relative error of the updates) instead of training scores.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from ..files import new_folder, output_folder, write_json
from ..transfer.refit import check_compression_target, compress_adapter
from ..tuner.config import TensLoraConfig
from .modeling import load_trained_model
from .options import budget_parameters, parse_budget
from .runs import METRICS_FILE, RUN_FILE, disk_errors, reading_run
from .train import evaluate_run


def compress_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, ranks: Any = None,
                 energy: float | None = None, budget: str | None = None, evaluate: bool = False,
                 split: str = "test", trust_remote_code: bool = False) -> dict[str, Any]:
    """Compress the run's adapter (one of ``ranks``, ``energy`` or ``budget``: ``"lora:4"`` or a parameter count)
    into the new run folder ``out_dir`` (new or empty; it appears whole or not at all); return its ``metrics.json``.

    With ``evaluate`` both runs are scored on ``split`` (``evaluate_run``), recorded as ``before`` and ``after``:
    the run first, so that data it cannot be scored on is refused before anything is written, and the compressed
    one before its folder appears. ``trust_remote_code`` as in ``merge_run``.
    """
    check_compression_target(ranks, energy, budget)
    if budget is not None:
        parse_budget(budget)
    with reading_run(run_dir) as run:
        if "adapter" not in run:
            raise ValueError(f"The run in '{run_dir}' trained the classification head only: it has no adapter to "
                             "compress.")
        if ranks is not None:  # the rank spec's shape, before the model is loaded
            TensLoraConfig(construction=run["adapter"]["construction"],
                           factorization=run["adapter"]["factorization"], ranks=ranks)
        output_folder(out_dir)
        permission = {"trust_remote_code": trust_remote_code}
        before = _scores(run_dir, split, permission) if evaluate else None
        model, preprocessor = load_trained_model(str(run_dir), run, trust_remote_code=trust_remote_code)
    if budget is not None:
        budget = budget_parameters(budget, model.base_model.model.config, model.peft_config["default"])
    report = compress_adapter(model, ranks=ranks, energy=energy, budget=budget)
    summary: dict[str, Any] = {"compressed_from": str(run_dir), "asked": {"ranks": ranks, "energy": energy,
                                                                       "budget": budget}, **asdict(report)}
    compressed = {**run, "adapter": {**run["adapter"], "ranks": report.ranks_after},
                  "adapter_parameters": report.parameters_after,
                  "trainable_parameters": run["trainable_parameters"] - report.parameters_before
                  + report.parameters_after,
                  "compressed_from": str(run_dir)}
    with disk_errors(out_dir, resume=False), new_folder(out_dir) as staging:
        model.save_pretrained(staging)
        preprocessor.save_pretrained(staging)
        write_json(staging / RUN_FILE, compressed)
        write_json(staging / METRICS_FILE, summary)
        if evaluate:
            summary["evaluation"] = {"split": split, "before": before, "after": _scores(staging, split, permission)}
            write_json(staging / METRICS_FILE, summary)
    return summary


def _scores(run_dir: str | os.PathLike, split: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The run's scores on ``split`` of its own data, without the split's prefix."""
    prefix = f"{split}_"
    return {key[len(prefix):]: value for key, value in evaluate_run(str(run_dir), split, overrides).items()
            if key.startswith(prefix)}
