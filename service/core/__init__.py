"""The request path: admission and micro-batching, decode, encode, the memory search, the head, the cache."""
