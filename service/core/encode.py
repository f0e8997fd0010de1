"""The ONNX image encoder in onnxruntime: (B, 3, S, S) float32 pixels -> (B, d) float32 embeddings.

Its first output is the search key. A fine-tuned build's graph has a second, `query`: the vector the head reads,
from fine-tuned last blocks over the same frozen trunk (models/finetune.py); elsewhere the key is the query."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
QUERY = "query"  # the name of a fine-tuned graph's second output


def cuda_present() -> bool:
    """A CUDA provider is only worth asking for where a GPU is really there: onnxruntime-gpu reports the
    provider as available on machines without one, then logs a loud error and falls back."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidiactl").exists()


def providers_for(device: Device) -> list[str]:
    if device == "cuda" or (device == "auto" and cuda_present()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Encoder:
    """One onnxruntime session over an encoder graph with a dynamic batch axis."""

    def __init__(self, path: Path, device: Device = "auto", intra_threads: int = 0, spin: bool = True):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_threads  # 0: one per core
        options.inter_op_num_threads = 1
        # Spinning threads wait for work by burning a core: fastest alone, a loss where the event loop and
        # the decoders need that core between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), options, providers=providers_for(device))
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        self.dim = int(out.shape[-1])
        query = [o for o in self.session.get_outputs()[1:] if o.name == QUERY]
        self.query_name = query[0].name if query else None  # None: the key is the query
        self.query_dim = int(query[0].shape[-1]) if query else self.dim
        self.providers: list[str] = self.session.get_providers()
        log.info("encoder %s on %s, output dim %d, query %s", path.name, self.providers[0], self.dim, self.query_name)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> the search key (B, d) float32."""
        (out,) = self.session.run([self.output_name], {self.input_name: pixels})
        return np.asarray(out, dtype=np.float32)

    def both(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) float32 -> search key (B, d) and the head's query (B, dq), in one run of the graph
        (the same array twice where the graph has no `query` output)."""
        if self.query_name is None:
            key = self(pixels)
            return key, key
        key, query = self.session.run([self.output_name, self.query_name], {self.input_name: pixels})
        return np.asarray(key, dtype=np.float32), np.asarray(query, dtype=np.float32)
