"""The benchmarks (`kdpipe bench ...`): figures measured side by side in one run."""
