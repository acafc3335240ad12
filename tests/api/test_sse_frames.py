"""SSE frames encoded once per read (aqsh.api.loghub.Frames): byte for byte what
aiohttp_sse's ``EventSourceResponse.send`` would have written per follower, and what a
follower gets from a shared encoding depends only on its own position."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from aqsh.api.loghub import KEEP, Frames, encode_event, stream_id
from aqsh.engine.keys import log_key
from tests.api.conftest import ServiceFactory, sse_events
from tests.support import wait_until


def test_frames_are_byte_exact_for_multi_line_unicode_and_cr_lines() -> None:
    entries = [
        ("5-1", {b"line": "naïve ✓ 日本".encode()}),
        ("5-2", {b"line": b"first\nsecond\r\nthird\rfourth", b"stream": b"stderr"}),
        ("5-3", {b"line": b"bad \xff byte"}),
        ("5-4", {b"line": b""}),
    ]
    frames = Frames(entries)
    share = frames.share(stream_id("5-0"))
    assert share is not None
    assert share.data == (
        "id: 5-1\r\ndata: naïve ✓ 日本\r\n\r\n".encode()
        + b"id: 5-2\r\ndata: first\r\ndata: second\r\ndata: third\r\ndata: fourth\r\n\r\n"
        + "id: 5-3\r\ndata: bad \ufffd byte\r\n\r\n".encode()
        + b"id: 5-4\r\ndata: \r\n\r\n")
    marked = frames.share(stream_id("5-0"), marked=True)
    assert marked is not None
    assert marked.data == share.data.replace(b"id: 5-2\r\n", b"id: 5-2\r\nevent: stderr\r\n")
    assert share.ids == ["5-1", "5-2", "5-3", "5-4"]
    assert share.last == stream_id("5-4")
    assert share.ending is None  # lines came: no eof pending
    assert frames.share(stream_id("5-0")) is share  # one encoding for every follower there
    assert share.chunk() == b"%x\r\n" % len(share.data) + share.data + b"\r\n"
    assert encode_event("0", id="5-9", event="eof") == b"id: 5-9\r\nevent: eof\r\ndata: 0\r\n\r\n"
    assert encode_event("x\ny", event="error", retry=5000) == (
        b"event: error\r\ndata: x\r\ndata: y\r\nretry: 5000\r\n\r\n")


def test_a_share_depends_only_on_its_followers_position() -> None:
    """Gaps (entries the length cap trimmed) inside the read are encoded once; the gap before
    a follower's first entry is its own. Eof markers set ``ending``; start markers clear it."""
    entries = [
        ("7-3", {b"line": b"a"}),
        ("7-6", {b"line": b"b"}),  # 7-4 and 7-5 were trimmed
        ("7-7", {b"eof": b"1", b"exit_code": b"3"}),
    ]
    frames = Frames(entries)
    gap2 = b'event: gap\r\ndata: {"lost":2}\r\n\r\n'
    a, b = b"id: 7-3\r\ndata: a\r\n\r\n", b"id: 7-6\r\ndata: b\r\n\r\n"
    at_start = frames.share(stream_id("7-2"))
    assert at_start is not None
    assert at_start.data == a + gap2 + b
    assert at_start.ending == ("7-7", "3")
    behind = frames.share(stream_id("7-0"))  # it missed 7-1 and 7-2 as well
    assert behind is not None
    assert behind.data == gap2 + a + gap2 + b
    mid = frames.share(stream_id("7-4"))  # saw 7-4 before the trim: one lost before 7-6
    assert mid is not None
    assert mid.data == b'event: gap\r\ndata: {"lost":1}\r\n\r\n' + b
    only_eof = frames.share(stream_id("7-6"))
    assert only_eof is not None
    assert only_eof.data == b""
    assert only_eof.ending == ("7-7", "3")
    assert frames.share(stream_id("7-7")) is None  # nothing twice
    restarted = Frames([("8-1", {b"start": b"1"})]).share(stream_id("7-7"))
    assert restarted is not None
    assert restarted.data == b""
    assert restarted.ending is None
    quiet = Frames([("8-2", {b"other": b"x"})]).share(stream_id("8-1"))
    assert quiet is not None
    assert quiet.ending is KEEP


async def test_a_start_marker_alone_does_not_end_the_stream(
    make_service: ServiceFactory, redis: aioredis.Redis
) -> None:
    """The hub brings an attempt's start marker on its own (the script has not printed yet): a
    share with no frame, which must write nothing (an empty HTTP chunk is the end of a chunked
    body: followers that joined before a task started used to get no lines at all)."""
    service = await make_service()
    hub = service.state.log_hub
    assert hub is not None
    _, body, _ = await service.request("POST", "/tasks/lines?process_in=60s", json={"count": 1})
    key = log_key(body["id"])
    follower = asyncio.create_task(sse_events(service, body["id"], limit=2))
    await wait_until(lambda: key in hub._followers, message="follower joined the hub")
    reads = hub.reads
    await redis.xadd(key, {"start": "1"}, id="1-1")
    await wait_until(lambda: hub.reads > reads, message="the hub read the start marker")
    await redis.xadd(key, {"line": "x"}, id="1-2")
    await redis.xadd(key, {"line": "y"}, id="1-3")
    events = await asyncio.wait_for(follower, 30)
    assert events == [{"id": "1-2", "data": "x"}, {"id": "1-3", "data": "y"}]


async def test_resume_from_an_id_inside_a_batch(make_service: ServiceFactory) -> None:
    """Last-Event-ID in the middle of what one read brought: exactly the rest, once."""
    service = await make_service()
    _, body, _ = await service.request("POST", "/tasks/lines", json={"count": 30})
    events = await sse_events(service, body["id"])
    assert [e["data"] for e in events] == [f"line {n}" for n in range(30)] + ["0"]
    rest = await sse_events(service, body["id"], last_event_id=events[11]["id"])
    assert [e["data"] for e in rest] == [f"line {n}" for n in range(12, 30)] + ["0"]
    assert [e["id"] for e in rest] == [e["id"] for e in events[12:]]
