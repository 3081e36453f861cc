"""Training: forward step and loss, model chunks under DDP, (later) loop, stages, checkpoints."""
