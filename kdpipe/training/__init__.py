"""Training: losses, the join of inputs with labels, the loop, the trainer, export, plots."""
