"""The TorchScript head: (z, sims, keys, values) -> class probabilities and attention over the neighbours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class Head:
    def __init__(self, path: Path, threads: int = 1):
        torch.set_num_threads(threads)
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.uses_keys = bool(self.module.uses_keys)
        self.uses_values = bool(self.module.uses_values)
        self.num_layers = int(self.module.num_layers)

    def __call__(
        self, z: np.ndarray, sims: np.ndarray, keys: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """z (B, d), sims (B, k) float32; keys (B, k, d|0), values (B, k, dv) float16 or float32 ->
        probabilities (B, C), and the last layer's attention (B, k) (zeros for heads that do not attend)."""
        with torch.inference_mode():
            logits, attn = self.module(
                torch.from_numpy(z),
                torch.from_numpy(sims),
                torch.from_numpy(keys).float(),
                torch.from_numpy(values).float(),
            )
            probs = torch.softmax(logits, dim=-1).numpy()
        last = attn[:, -1].numpy() if attn.shape[1] else np.zeros(sims.shape, np.float32)
        return probs, last
