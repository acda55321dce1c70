"""The study: a grid of runs over constructions, budgets, learning rates and seeds, and its report."""
