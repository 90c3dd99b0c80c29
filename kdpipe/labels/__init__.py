"""Soft labels: the math, the unit codecs, the cache layout and commit protocol, upkeep."""
