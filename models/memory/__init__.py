"""The memory offline: making it, versions (add, remove, publish, list), scale memories, shards."""
