"""How every benchmark reports a repeated figure: the median, with min and max and each value."""

from __future__ import annotations

import statistics
from typing import Any


def summary(values: list[float]) -> dict[str, Any]:
    """{"median", "min", "max", "each"} of a benchmark's repeated measurements (at least one)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "each": list(values)}
