"""``$AQSH_RESULT_FILE`` → the task result ``{"exit_code", "data"?, "error"?}``.

``data`` is omitted when the script wrote no file and is ``""`` for an empty file. Bytes that
are not UTF-8 are decoded with U+FFFD replacement characters: results are JSON text for humans
and APIs, and replacement keeps them valid without hiding that something odd was written.
"""

from __future__ import annotations

import os

import msgspec

MAX_RESULT_BYTES = 1024 * 1024


class ScriptResult(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    exit_code: int
    data: str | msgspec.UnsetType = msgspec.UNSET
    error: str | msgspec.UnsetType = msgspec.UNSET


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ScriptResult)


def encode_result(result: ScriptResult) -> bytes:
    return _encoder.encode(result)


def decode_result(raw: bytes) -> ScriptResult:
    return _decoder.decode(raw)


def read_result_file(
    path: str, *, max_bytes: int = MAX_RESULT_BYTES
) -> tuple[str | None, str | None]:
    """(data, error): data None when no file was written; error set when it is unusable."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None, None
    if size > max_bytes:
        return None, f"result file is {size} bytes, over the {max_bytes} byte limit"
    with open(path, "rb") as handle:
        raw = handle.read(max_bytes + 1)
    if len(raw) > max_bytes:
        return None, f"result file is over the {max_bytes} byte limit"
    return raw.decode("utf-8", errors="replace"), None
