"""kdpipe: offline knowledge distillation with Ray Data and Ray Train."""

__version__ = "0.1.0"
