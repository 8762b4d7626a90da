"""What this machine has and which load plan fits it (from config.json alone)."""
