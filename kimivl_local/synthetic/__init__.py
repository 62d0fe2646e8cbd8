"""Synthetic checkpoints in the official layout, for tests and benchmarks without the weights."""
