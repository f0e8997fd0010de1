"""The fast split of a multipart/form-data body against python-multipart's parser, the reference: the same
parts (name, filename, bytes) for every body it takes, and no answer (the parser decides) for any other; the
fast reader of a header's parameters against python-multipart's, for every value."""

from __future__ import annotations

import asyncio
import itertools
import random

import httpx
import pytest
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from service.api.upload import DISPOSITION, Part, options, parse, read_body, split
from service.errors import RequestError
from tests.synthetic import png


def _fields(parts: list[Part]) -> list[tuple[str, str | None, bytes]]:
    return [(p.name, p.filename, bytes(p.data)) for p in parts]


def encoded(files: list[tuple[str, tuple[str, bytes, str]]], data: dict[str, str]) -> tuple[bytes, bytes]:
    """A body as httpx (like requests and browsers) encodes a form: (body, boundary)."""
    request = httpx.Request("POST", "http://x", files=files, data=data)
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    return request.read(), boundary


def test_forms_as_clients_send_them_split_into_the_parsers_parts() -> None:
    rng = random.Random(7)
    images = [png(i) for i in range(4)] + [b"", b"\r\n--x\r\n", bytes(rng.randrange(256) for _ in range(5000))]
    names = ["x.png", 'we"ird.png', "b\u00e9b\u00e9.png", "a;b=c.png"]
    for n in range(40):
        files = [("images" if n % 2 else "image", (rng.choice(names), rng.choice(images), "image/png"))]
        files *= 1 + n % 3
        body, boundary = encoded(files, {"labels": "cat", "template": "a photo of a {}."} if n % 4 == 0 else {})
        fast = split(body, boundary)
        assert fast is not None, body[:200]
        assert _fields(fast) == _fields(parse(body, boundary))


def test_part_headers_are_read_as_the_parser_reads_them() -> None:
    """Part headers in many spellings (the usual ones read by one match, the rest line by line): the same name
    and filename as the parser's, wherever split() takes the body."""
    rng = random.Random(11)
    dispositions = [
        b'form-data; name="image"; filename="x.png"',
        b'Form-Data; NAME="image"; FileName="x.png"',
        b'form-data; name="images"',
        b'form-data; name="a;b"; filename="c.png"',
        b'form-data;name="image";filename="x.png"',
        b'attachment; name="image"',
        b'form-data; name="image" ',
        b"form-data; name=image; filename=x.png",
    ]
    names = [b"Content-Disposition", b"content-disposition", b"CONTENT-DISPOSITION", b"Content-Disposition "]
    others = [b"", b"\r\nContent-Type: image/png", b"\r\ncontent-type:image/png", b"\r\nX-Other: 1", b"\r\nno colon"]
    taken = 0
    for _ in range(400):
        head = rng.choice(names) + rng.choice([b": ", b":", b":  "]) + rng.choice(dispositions)
        head = rng.choice([head + rng.choice(others), rng.choice(others)[2:] + b"\r\n" + head])
        body = b"--B\r\n" + head + b"\r\n\r\nabc\r\n--B--\r\n"
        fast = split(body, b"B")
        if fast is not None:
            taken += 1
            assert _fields(fast) == _fields(parse(body, b"B")), body
    assert taken > 100


@pytest.mark.parametrize(
    "body",
    [
        b'preamble\r\n--B\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\nabc\r\n--B--\r\n',
        b'--B  \r\nContent-Disposition: form-data; name="image"\r\n\r\nabc\r\n--B--',  # padding after a delimiter
        b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nabc\r\n--B \r\nX: y\r\n\r\ndef\r\n--B--',
        b'--B\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc\r\n--B--\r\nepilogue',
    ],
)
def test_other_shapes_are_left_to_the_parser(body: bytes) -> None:
    """Legal or not, these are not what clients send: the parser takes them or names what is wrong."""
    assert split(body, b"B") is None
    try:
        parse(body, b"B")
    except RequestError as e:
        assert e.status == 400


@pytest.mark.parametrize(
    "body",
    [
        b'--B\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',  # cut short
        b'--B\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc\r\n--B-',
        b"--B\r\nno colon here\r\n\r\nabc\r\n--B--",
    ],
)
def test_malformed_forms_are_refused_by_the_parser(body: bytes) -> None:
    assert split(body, b"B") is None
    with pytest.raises(RequestError) as refused:
        parse(body, b"B")
    assert refused.value.status == 400


def test_header_parameters_read_as_python_multipart_reads_them() -> None:
    usual = [
        "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
        'form-data; name="image"; filename="x.png"',
        "Multipart/Form-Data;boundary=abc=def",
        'multipart/form-data; boundary="quoted"',
        "multipart/form-data ; boundary=x ",
        "multipart/form-data; boundary=a b",
        "multipart/form-data; charset=utf-8; boundary=x",
        "image/png",
        " IMAGE/PNG \t",
        "",
    ]
    odd = ['form-data; name="a;b"', 'form-data; filename="C:\\x\\y.png"', "form-data; filename*=utf-8''x", "x;;y"]
    rng = random.Random(3)
    pieces = ["a", "B", "=", ";", '"', " ", "\t", "\\", "*", "\u00e9", ":", "name", "filename", "boundary", "form-data"]
    fuzz = ["".join(rng.choice(pieces) for _ in range(rng.randrange(14))) for _ in range(20_000)]
    dispositions = [f'form-data; name="{a}"' + (f'; filename="{b}"' if b else "") for a, b in itertools.pairwise(fuzz)]
    forms = ["multipart/form-data; " + value for value in fuzz[:2000]]
    for value in usual + odd + fuzz + dispositions + forms:
        assert options(value) == parse_options_header(value), value
        raw = value.encode("latin-1")
        assert options(raw) == parse_options_header(raw), value
        if (found := DISPOSITION.fullmatch(raw)) is not None:  # split()'s reading of a usual part header
            params = parse_options_header(raw)[1]
            assert found.groups() == (params[b"name"], params.get(b"filename")), value


def _request(messages: list[dict[str, object]], length: int | None = None) -> Request:
    """A request whose body comes as `messages`, with a Content-Length of `length` where given."""
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    queue = iter(messages)

    async def receive() -> dict[str, object]:
        return next(queue)

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


def test_a_body_is_read_in_its_chunks_and_refused_past_the_limit_or_when_the_client_leaves() -> None:
    chunks: list[dict[str, object]] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd"},
    ]
    assert asyncio.run(read_body(_request(chunks), 4)) == b"abcd"
    assert asyncio.run(read_body(_request([{"type": "http.request", "body": b""}]), 4)) == b""
    refusals = [
        (_request(chunks), 3, 413),  # no Content-Length: refused once what arrived passes the limit
        (_request(chunks, length=4), 3, 413),  # declared over the limit: refused before reading
        (_request([chunks[0], {"type": "http.disconnect"}]), 4, 400),
    ]
    for request, limit, status in refusals:
        with pytest.raises(RequestError) as refused:
            asyncio.run(read_body(request, limit))
        assert refused.value.status == status
