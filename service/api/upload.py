"""Request bodies: read with a byte limit enforced while reading, split multipart/form-data into parts.

A body is read chunk by chunk as it arrives, so an oversized upload is refused (413) before it is all in
memory, and no part is spooled to a temporary file. Once in, a form as clients send it is split at its
delimiters (microseconds, a fifth of what python-multipart's parser costs for a one-image form); anything
else (a preamble, padding after a delimiter, headers it cannot read, a form cut short) goes to
python-multipart, which parses it or names what is wrong. tests/test_upload.py checks both give the same parts.
Headers' parameters (a Content-Type's boundary, a part's name and filename) are read the same way: as clients
send them here, python-multipart's reader for anything else (a backslash, an extended parameter, a quoted `;`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from service.api.intake import content_length, header
from service.errors import RequestError

RAW_TYPES = (b"image/png", b"image/jpeg", b"image/webp")
# A part's Content-Disposition as browsers, curl and httpx write it, read as options() would read it.
DISPOSITION = re.compile(rb'form-data; name="([^"\\;]*)"(?:; filename="([^"\\;]*)")?')
# A form's Content-Type as clients send it (an unquoted boundary of printable ASCII without `"`, `*`, `;` or a
# backslash), read as options() would read it.
FORM = re.compile(rb"multipart/form-data[ \t]*;[ \t]*boundary=([!#-)+-:<-\[\]-~]+)[ \t]*", re.IGNORECASE)
# A part's headers as clients send them (its Content-Disposition as DISPOSITION reads it, then perhaps its
# Content-Type), read as split()'s reading of each header line would read them.
USUAL_HEAD = re.compile(
    rb'Content-Disposition: form-data; name="([^"\\;]*)"(?:; filename="([^"\\;]*)")?(?:\r\nContent-Type: [^\r\n]*)?',
    re.IGNORECASE,
)


@dataclass
class Part:
    name: str
    filename: str | None = None
    data: bytes | bytearray = field(default_factory=bytearray)  # bytes as split() cuts them: no copy


async def read_images(request: Request, field_name: str, limit: int, max_files: int) -> list[bytes]:
    """The images of one request: the parts named `field_name` of a multipart form, or the whole body when
    it is sent raw as image/png, image/jpeg or image/webp. A body over `limit` bytes is refused (413) as
    read_body says, once its type is known to be one of these."""
    kind, params = options(content_type(request))
    if kind in RAW_TYPES:
        return [await read_body(request, limit)]
    if kind != b"multipart/form-data":
        shown = kind.decode("latin-1") or "none"
        raise RequestError(
            415,
            f"content type {shown}: send multipart/form-data with the image in field "
            f"'{field_name}', or the raw image as image/png, image/jpeg or image/webp",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary")
    parts = await _parse(request, boundary, limit)
    files = [p for p in parts if p.name == field_name]
    if not files:
        raise RequestError(422, f"no file in form field '{field_name}'")
    if any(p.filename is None for p in files):  # a text field, not a file: what a form's File field refuses
        raise RequestError(422, f"form field '{field_name}' holds text, not a file: send the image as a file part")
    images = [bytes(p.data) for p in files]
    if len(images) > max_files:
        raise RequestError(413, f"{len(images)} images in one request; the limit is {max_files}")
    return images


async def read_form(request: Request, limit: int) -> list[Part]:
    """Every part of a multipart/form-data body (files and plain fields alike), read under `limit` bytes."""
    kind, params = options(content_type(request))
    if kind != b"multipart/form-data":
        raise RequestError(415, f"content type {kind.decode('latin-1') or 'none'}: send multipart/form-data")
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary")
    return await _parse(request, boundary, limit)


def content_type(request: Request) -> bytes:
    """The request's Content-Type as it came (b"" for none)."""
    return header(request.scope, b"content-type") or b""


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `limit` bytes (its Content-Length, or what has
    arrived), never all read first."""
    declared = content_length(request.scope)
    if declared is not None and declared > limit:
        raise RequestError(413, f"request body is {declared} bytes; the limit is {limit}")
    chunks, size, receive = [], 0, request.receive  # its messages as they come: no generator around them
    while True:
        message = await receive()
        if message["type"] != "http.request":  # nobody is left to answer; no traceback in the log either
            raise RequestError(400, "client disconnected before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _parse(request: Request, boundary: bytes, limit: int) -> list[Part]:
    body = await read_body(request, limit)
    return split(body, boundary) or parse(body, boundary)


def options(value: str | bytes | None) -> tuple[bytes, dict[bytes, bytes]]:
    """A header's value and its parameters, as python-multipart's parse_options_header gives them (the value
    lower-cased, a quoted parameter unquoted), read directly where the header is as clients send it: ASCII,
    every parameter `name=value` or `name="value"`, no backslash, no `*`, no `;` within quotes. Anything else
    goes to python-multipart's reader."""
    if not value:
        return b"", {}
    raw = value.encode("latin-1") if isinstance(value, str) else value
    if (form := FORM.fullmatch(raw)) is not None:  # most requests: one match instead of the steps below
        return b"multipart/form-data", {b"boundary": form[1]}
    if not raw.isascii():  # python-multipart lower-cases latin-1 letters too
        return parse_options_header(raw)
    kind, found, rest = raw.partition(b";")
    if not found:
        return raw.lower().strip(b" \t"), {}
    params: dict[bytes, bytes] = {}
    if b"\\" not in raw and b"*" not in raw:
        for segment in rest.split(b";"):
            name, equals, given = segment.partition(b"=")
            name, given = name.strip(b" \t"), given.strip(b" \t")
            quoted = given[:1] == given[-1:] == b'"' and len(given) >= 2
            if not equals or not name or b'"' in name or given.count(b'"') != (2 if quoted else 0):
                break  # no `=`, no name, or a quote not around a whole value: python-multipart reads it
            params[name.lower()] = given[1:-1] if quoted else given
        else:
            if b"=" not in kind and b'"' not in kind:
                return kind.lower().strip(b" \t"), params
    return parse_options_header(raw)


def disposition(value: bytes) -> tuple[str, str | None]:
    """A part's name and filename (None: a plain field) from its Content-Disposition."""
    if (usual := DISPOSITION.fullmatch(value)) is not None:
        name, filename = usual.groups()
    else:
        _, opts = options(value)
        name, filename = opts.get(b"name", b""), opts.get(b"filename")
    return _decoded(name, filename)


def _decoded(name: bytes, filename: bytes | None) -> tuple[str, str | None]:
    return name.decode("utf-8", "replace"), filename.decode("utf-8", "replace") if filename is not None else None


def split(body: bytes, boundary: bytes) -> list[Part] | None:
    """The parts of a whole multipart/form-data body as clients send it, split at its delimiters; None for
    any other shape (parse() then decides)."""
    delimiter = b"--" + boundary
    inner = b"\r\n" + delimiter
    end = body.rfind(inner + b"--")
    if not body.startswith(delimiter + b"\r\n") or end < 0 or body[end + len(inner) + 2 :] not in (b"", b"\r\n"):
        return None
    parts = []
    for chunk in body[len(delimiter) + 2 : end].split(inner + b"\r\n"):
        head, found, data = chunk.partition(b"\r\n\r\n")
        if not found or inner in data:  # no header end, or a delimiter line with padding: not the usual shape
            return None
        names = _decoded(*usual.groups()) if (usual := USUAL_HEAD.fullmatch(head)) is not None else _names(head)
        if names is None:
            return None
        parts.append(Part(*names, data))
    return parts


def _names(head: bytes) -> tuple[str, str | None] | None:
    """A part's name and filename from its header lines, read one by one; None where one is not a header."""
    name, filename = "", None
    for line in head.split(b"\r\n"):
        field, colon, value = line.partition(b":")
        if not colon or not field or field != field.strip():
            return None
        if field.lower() == b"content-disposition":
            name, filename = disposition(value.strip())
    return name, filename


def parse(body: bytes, boundary: bytes) -> list[Part]:
    """The parts of a whole multipart/form-data body, by python-multipart's parser (RequestError 400 for a
    malformed one)."""
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
            parts[-1].name, parts[-1].filename = disposition(bytes(header["value"]))
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
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise RequestError(400, f"malformed multipart body: {e}") from None
    if parser.state != MultipartState.END:  # a part cut short must not pass for a whole (smaller) file
        raise RequestError(400, "malformed multipart body: it ends before its closing boundary")
    return parts
