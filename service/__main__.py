"""python -m service: serve the artifact directory with uvicorn, as many processes as RAC_WORKERS says.

Settings come from RAC_* environment variables (service/settings.py). With several processes, each loads the
artifacts itself (the index and the value store are memory-mapped, so their pages are shared) and the
Prometheus metrics are summed across processes through files in PROMETHEUS_MULTIPROC_DIR: a fresh directory
made here for each run and removed after it, so that no earlier run's counts are ever added in.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import uvicorn

from service.settings import Settings


def main() -> None:
    settings = Settings()
    workers = settings.processes
    os.environ["RAC_WORKERS"] = str(workers)  # each process sizes its encoder threads by it
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    made = None
    if workers > 1:
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="rac-metrics-")
    try:
        uvicorn.run(
            "service.app:factory",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=workers,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)


if __name__ == "__main__":
    main()
