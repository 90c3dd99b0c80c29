"""Inputs: the formats, input shards and fingerprints, decoding, the built-in digits."""
