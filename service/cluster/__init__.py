"""The service on a Ray cluster: the ingress and one deployment per memory shard (the `ray` extra)."""
