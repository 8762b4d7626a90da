"""Checkpoints: resolution (Hub, cache, local), streaming load under a plan, own quantisation."""
