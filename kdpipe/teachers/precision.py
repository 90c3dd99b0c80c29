"""A teacher's compute precision: the choices a config may name and what "auto" means. Free of
torch, so configs validate without importing it."""

from __future__ import annotations

from kdpipe.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """"auto" is bf16 autocast where the teacher runs on a GPU and fp32 on a CPU."""
    if precision not in PRECISIONS:
        raise ConfigError(f"teacher precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if on_gpu else "fp32"
    return precision
