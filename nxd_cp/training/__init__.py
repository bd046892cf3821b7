"""One training step around a CP model: loss, gradient reduction, optimizers, checkpoints and
memory accounting."""
