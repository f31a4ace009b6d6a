"""Training: TrainState, pure train/eval steps, optimizers, checkpoints and the `train` job."""
