"""The served memory: loading and checking a version, live swaps, paging, integrity, shards."""
