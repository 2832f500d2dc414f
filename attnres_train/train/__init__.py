"""Training loop pieces: DeepSpeed engine setup, checkpoints, metrics, CLI."""
