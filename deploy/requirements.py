"""Write pyproject.toml's pinned dependency lists as requirement files, for the image's dependency layer.

python requirements.py cpu                               # in the Dockerfile, beside pyproject.toml: writes
python requirements.py gpu onnxruntime-gpu==1.31.1       # torch.txt, online.txt and build.txt there

So the dependencies install before the code is copied (a code change does not reinstall torch), from the one
place that pins them. The GPU variant swaps onnxruntime for onnxruntime-gpu (same module name: never both); its
pin is separate because onnxruntime-gpu releases reach PyPI later than onnxruntime's.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def lists(pyproject: Path, variant: str, gpu_runtime: str = "onnxruntime-gpu") -> dict[str, list[str]]:
    project = tomllib.loads(pyproject.read_text())["project"]
    online: list[str] = project["dependencies"]
    if variant == "gpu":
        online = [gpu_runtime if re.match(r"onnxruntime(?=[=<>~!\[ ;]|$)", r) else r for r in online]
    elif variant != "cpu":
        raise SystemExit(f"variant {variant!r}: expected cpu or gpu")
    return {
        "torch": [r for r in online if re.match(r"torch(?=[=<>~!\[ ;]|$)", r)],
        "online": online,
        "build": project["optional-dependencies"]["build"],
    }


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    gpu_runtime = sys.argv[2] if len(sys.argv) > 2 else "onnxruntime-gpu"
    for name, reqs in lists(Path("pyproject.toml"), variant, gpu_runtime).items():
        Path(f"{name}.txt").write_text("".join(r + "\n" for r in reqs))
        print(f"{name}.txt: {len(reqs)} requirements")


if __name__ == "__main__":
    main()
