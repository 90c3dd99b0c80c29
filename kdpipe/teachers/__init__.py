"""Teachers: model building, checkpoints and digests, the Ray Data batch predictor."""
