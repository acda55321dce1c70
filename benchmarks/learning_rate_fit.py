"""How a sweep's chosen learning rates scale with adapter size: a least-squares line through
log(chosen rate) against log(adapter parameters), one point per row of the sweep (LoRA and constructions).

A slope of -0.5 means the best rate falls as the square root of the adapter's size. Prints the slope, the
rate the line gives at a few sizes, and how far (as a factor) each row's chosen rate lies from the line.

    python benchmarks/learning_rate_fit.py sweeps/smollm2-wordnet-chat
    python benchmarks/learning_rate_fit.py sweeps/wordnet-study
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tenslora.app.sweep.report import RESULTS_FILE, read_csv, selected_rows


def chosen_rates(sweep_dir: Path) -> dict[tuple[str, str, str], tuple[int, float]]:
    """Each row's adapter parameters and chosen rate (rows whose chosen rate never trained are left out)."""
    return {key: (runs[0]["adapter_parameters"], runs[0]["lr"])
            for key, runs in selected_rows(read_csv(sweep_dir / RESULTS_FILE)).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    rows = chosen_rates(args.sweep_dir)
    if len(rows) < 2:
        raise SystemExit(f"'{args.sweep_dir}' holds {len(rows)} row with a chosen rate; a fit needs two or more.")
    parameters = np.array([size for size, _ in rows.values()], dtype=float)
    rates = np.array([rate for _, rate in rows.values()])
    slope, intercept = np.polyfit(np.log(parameters), np.log(rates), 1)
    fitted = np.exp(intercept + slope * np.log(parameters))
    factors = np.maximum(rates / fitted, fitted / rates)
    print(f"{len(rows)} rows, {parameters.min():,.0f} to {parameters.max():,.0f} adapter parameters")
    print(f"slope {slope:.2f}: chosen rate ~ parameters^{slope:.2f}")
    for size in (1e3, 1e4, 1e5, 1e6):
        print(f"  line at {size:>11,.0f} parameters: {np.exp(intercept + slope * np.log(size)):.2e}")
    print(f"chosen rates within a factor {factors.max():.2f} of the line ({np.mean(factors <= 2):.0%} within 2)")
    for (construction, condition, budget), (size, rate), factor in sorted(
            zip(rows, rows.values(), factors, strict=True), key=lambda item: item[1][0]):
        print(f"  {construction:<14} {condition:<13} {budget:<8} {size:>11,} lr {rate:<8g} x{factor:.2f} from the line")


if __name__ == "__main__":
    main()
