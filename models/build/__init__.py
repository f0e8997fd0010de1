"""`rac build`, `rac evaluate`, `rac choices`: the artifact directory and the paper's tables."""
