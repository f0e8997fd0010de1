"""Request bodies: read with a byte limit enforced while reading, split multipart/form-data into parts.

python-multipart's streaming parser is fed chunk by chunk as they arrive: an oversized upload is refused
(413) before it is all in memory, and no part is spooled to a temporary file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

RAW_TYPES = (b"image/png", b"image/jpeg", b"image/webp")


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Part:
    name: str
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


async def read_images(request: Request, field_name: str, limit: int, max_files: int) -> list[bytes]:
    """The images of one request: the parts named `field_name` of a multipart form, or the whole body when
    it is sent raw as image/png, image/jpeg or image/webp."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"request body is {declared} bytes; the limit is {limit}")
    if kind in RAW_TYPES:
        return [bytes(await _read(request, limit, None))]
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise UploadError(
            415,
            f"content type {shown}: send multipart/form-data with the image in field "
            f"'{field_name}', or the raw image as image/png, image/jpeg or image/webp",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    parts = await _parse(request, boundary, limit)
    images = [bytes(p.data) for p in parts if p.name == field_name]
    if not images:
        raise UploadError(422, f"no file in form field '{field_name}'")
    if len(images) > max_files:
        raise UploadError(413, f"{len(images)} images in one request; the limit is {max_files}")
    return images


async def read_form(request: Request, limit: int) -> list[Part]:
    """Every part of a multipart/form-data body (files and plain fields alike), read under `limit` bytes."""
    kind, params = parse_options_header(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadError(413, f"request body is {declared} bytes; the limit is {limit}")
    if kind != b"multipart/form-data":
        raise UploadError(415, f"content type {kind.decode('latin-1') or 'none'}: send multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    return await _parse(request, boundary, limit)


async def _read(request: Request, limit: int, parser: MultipartParser | None) -> bytearray:
    body, size = bytearray(), 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UploadError(413, f"request body is over the limit of {limit} bytes")
            if parser is None:
                body += chunk
            else:
                parser.write(chunk)
    except ClientDisconnect:  # nobody is left to answer; no traceback in the log either
        raise UploadError(400, "client disconnected before the body was complete") from None
    return body


async def _parse(request: Request, boundary: bytes, limit: int) -> list[Part]:
    parts: list[Part] = []
    header: dict[str, bytearray] = {"field": bytearray(), "value": bytearray()}

    def on_part_begin() -> None:
        parts.append(Part(name=""))

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        if header["field"].lower() == b"content-disposition":
            _, opts = parse_options_header(bytes(header["value"]))
            parts[-1].name = opts.get(b"name", b"").decode("utf-8", "replace")
            filename = opts.get(b"filename")
            parts[-1].filename = filename.decode("utf-8", "replace") if filename is not None else None
        header["field"], header["value"] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    }
    parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
    try:
        await _read(request, limit, parser)
        parser.finalize()
    except MultipartParseError as e:
        raise UploadError(400, f"malformed multipart body: {e}") from None
    if parser.state != MultipartState.END:  # a part cut short must not pass for a whole (smaller) file
        raise UploadError(400, "malformed multipart body: it ends before its closing boundary")
    return parts
