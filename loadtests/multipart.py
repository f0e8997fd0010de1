"""multipart/form-data bodies built once, ahead of time, so that load generators spend nothing on them."""

from __future__ import annotations

BOUNDARY = "racload7f3a"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def encode(parts: list[tuple[str, bytes]]) -> bytes:
    """[(field name, PNG bytes)] -> a multipart body whose files are named x.png, typed image/png."""
    out = b""
    for name, data in parts:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="x.png"\r\n'
        out += head.encode() + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()
