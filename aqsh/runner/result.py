"""``$AQSH_RESULT_FILE`` → the task result ``{"exit_code", "data"?, "error"?}``.

``data`` is omitted when the script wrote no file and is ``""`` for an empty file. Bytes that
are not UTF-8 are decoded with U+FFFD replacement characters: results are JSON text for humans
and APIs, and replacement keeps them valid without hiding that something odd was written.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat

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
    path: str, *, max_bytes: int = MAX_RESULT_BYTES, dir_fd: int | None = None
) -> tuple[str | None, str | None]:
    """(data, error): data None when no file was written; error set when it is unusable.

    The script owns its work directory, so the file is hostile input: ``O_NOFOLLOW`` refuses a
    symlink (``ln -s /etc/shadow`` would otherwise publish the worker's files as the result),
    ``O_NONBLOCK`` keeps a FIFO from blocking the open, and ``fstat`` on the opened descriptor —
    not the path, which the script could swap — decides that it is a regular file of an
    acceptable size; a file with other hard links is refused too (a link to a file the script
    could not read itself, where the kernel's protected_hardlinks is off). ``dir_fd``: the work
    directory, opened before the script ran, with ``path`` relative to it — so a script that
    swaps its directory for a symlink cannot redirect the read either. It blocks on disk reads
    all the same: call it off the event loop (``read_result_file_async``)."""
    try:
        # Not a regular file: say so without opening it (a device).
        seen = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None, None
    if stat.S_ISLNK(seen.st_mode):
        return None, "result file is a symbolic link; write a regular file"
    if not stat.S_ISREG(seen.st_mode):
        return None, f"result file is a {_kind(seen.st_mode)}, not a regular file"
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "result file is a symbolic link; write a regular file"
        return None, f"result file cannot be opened: {exc.strerror or type(exc).__name__}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, f"result file is a {_kind(st.st_mode)}, not a regular file"
        if st.st_nlink > 1:
            return None, "result file has other hard links; write a file of its own"
        if st.st_size > max_bytes:
            return None, f"result file is {st.st_size} bytes, over the {max_bytes} byte limit"
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:  # a file still growing is cut off at the limit
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        return None, f"result file cannot be read: {exc.strerror or type(exc).__name__}"
    finally:
        os.close(fd)
    if size > max_bytes:
        return None, f"result file is over the {max_bytes} byte limit"
    return b"".join(chunks).decode("utf-8", errors="replace"), None


async def read_result_file_async(
    path: str, *, max_bytes: int = MAX_RESULT_BYTES, dir_fd: int | None = None
) -> tuple[str | None, str | None]:
    """``read_result_file`` in a thread: a slow disk (or a file system a script made slow)
    stalls that thread, never the event loop with its heartbeats and other tasks.

    Most scripts write no result, and for them the answer is one ``lstat`` of a name in the
    work directory the worker holds open (metadata the kernel has cached, as for the
    ``mkdir``/``rename`` that prepared the directory on the event loop): that is done here,
    without the hop to a thread and back, which costs a short script's run more wall time and
    worker CPU than the rest of reading its outcome. Anything that exists goes to the thread."""
    try:
        os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None, None
    except OSError:
        pass  # read_result_file says what is wrong with it
    return await asyncio.to_thread(read_result_file, path, max_bytes=max_bytes, dir_fd=dir_fd)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
