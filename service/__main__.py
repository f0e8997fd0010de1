"""python -m service: serve the artifact directory, settings from RAC_* environment variables (see
service/serve.py); exits non-zero when the server refused to start."""

from __future__ import annotations

import sys

from service.serve import serve
from service.settings import Settings


def main() -> None:
    sys.exit(serve(Settings()))


if __name__ == "__main__":
    main()
