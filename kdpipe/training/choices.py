"""The distillation choices a config may name; `kdpipe.training.losses` implements them. Free of
torch, so configs validate without importing it."""

from __future__ import annotations

ENSEMBLES = ("mean", "sum")  # how teachers combine: the mean of their distributions, or a sum of per-teacher terms
KINDS = ("kl", "soft_ce", "mse")  # distillation loss variants
WEIGHTINGS = ("fixed", "confidence", "correctness")  # per-sample teacher weighting
