"""Checkpoints on disk: where they are (local folder or Hub cache), their config, their shards."""
