"""The ONNX image encoder in onnxruntime: (B, 3, S, S) float32 pixels -> (B, d) float32 embeddings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]


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
        self.providers: list[str] = self.session.get_providers()
        log.info("encoder %s on %s, output dim %d", path.name, self.providers[0], self.dim)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) float32 -> (B, d) float32."""
        (out,) = self.session.run([self.output_name], {self.input_name: pixels})
        return np.asarray(out, dtype=np.float32)
