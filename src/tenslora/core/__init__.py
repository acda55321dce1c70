"""The mathematics: modes, constructions, rank rules, budgets and factorized tensors. Torch only, never a model."""
