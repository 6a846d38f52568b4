"""Files that must be written whole and read only when private: one implementation.

Key files, the contacts file and the PKI files share these rules:

* **written atomically with an exact mode**: a temporary file in the same
  directory is created with ``O_CREAT|O_EXCL`` and the mode (set again with
  ``fchmod``, so no umask widens or narrows it), written, fsynced, then moved
  into place and the directory fsynced. Without ``replace`` it is hard-linked
  into place, which fails if the name is taken, even when another process
  raced us to it: an existing file is never touched.
* **read only when private**: a file that group or others may access, that is
  not a regular file, or that is larger than the caller's bound is refused,
  judged on the descriptor that is read (no check-then-open race).

Errors are ``OSError`` (``FileExistsError``, ``FileNotFoundError``, ...) and
``ValueError`` for a file that breaks the rules; callers translate them into
their own error at their edge.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename or link in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, *, mode: int, replace: bool) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``; see the module docstring."""
    directory = path.parent
    temp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(temp, path)
        else:
            os.link(temp, path)  # FileExistsError if the name is taken
        fsync_directory(directory)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def read_private(path: Path, *, max_bytes: int, what: str) -> bytes:
    """The bytes of a private regular file of at most ``max_bytes``.

    ``ValueError`` naming ``what`` when the file is not regular, is accessible
    by group or others, or is too large; ``OSError`` when it cannot be read.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        info = os.fstat(fd)  # the file checked is the file read
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"the {what} is not a regular file")
        if info.st_mode & 0o077:
            raise ValueError(
                f"the {what} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
            )
        if info.st_size > max_bytes:
            raise ValueError(f"too large for a {what} ({info.st_size} bytes)")
        return os.read(fd, max_bytes + 1)
    finally:
        os.close(fd)


def check_private(path: Path, *, what: str) -> None:
    """Refuse a file that group or others may access, for files read by path.

    For a file a library opens itself (OpenSSL's ``load_cert_chain``), where
    :func:`read_private` cannot judge the descriptor that is read. The same
    ``ValueError`` text as :func:`read_private`; ``OSError`` when it cannot be
    examined.
    """
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode) and mode & 0o077:
        raise ValueError(
            f"the {what} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
