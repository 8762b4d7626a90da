"""Development helpers outside the runtime package: tiny test checkpoints, generated docs."""
