"""Container deployment: the image requirement lists (requirements.py) and the stack check (check.py)."""
