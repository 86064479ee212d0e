"""Files replaced whole: every file the package writes (checkpoints, logs rewritten
whole, result and report JSON, RecordIO sets, .bin sets) goes through this module.

A file is written under a temporary name in its own directory (``PATH.tmp``),
flushed and fsynced, renamed over ``PATH`` (atomic on POSIX file systems), and the
directory is fsynced so that the rename itself survives a power cut. So a kill, a
full disk or a failed write leaves the old ``PATH`` (or none) or the new one, never
half of one; a failed write removes its temporary (it would hold disk space that the
next write needs). A temporary left by a kill is removed before it is written again,
never written through: it may be a hard link to another file."""

from __future__ import annotations

import contextlib
import errno
import os

TMP_SUFFIX = ".tmp"


def temporary_path(path: str | os.PathLike) -> str:
    """The temporary name ``path`` is written under (``PATH.tmp``, in the same directory, so
    that the rename never crosses a file system)."""
    return os.fspath(path) + TMP_SUFFIX


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the renames and removals in ``directory`` durable (a no-op where directories
    cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(os.fspath(directory) or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on a directory: nothing more to do there
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def remove_quietly(path: str | os.PathLike) -> bool:
    """Remove ``path`` if it exists; whether it did."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


class _RecordingFile:
    """A file object that keeps the first OSError of its writes: torch.save turns a failed
    write of its zip writer into "enforce fail ... unexpected pos", which no longer says
    that the disk was full; :class:`AtomicFile` raises the OSError itself."""

    def __init__(self, file):
        self._file = file
        self.error: OSError | None = None

    def write(self, data):
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self):
        try:
            return self._file.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name):
        return getattr(self._file, name)


class AtomicFile:
    """One file being replaced whole: ``file`` to write to, then :meth:`sync`,
    :meth:`publish` (several files may be synced first and published together), or
    :meth:`discard` on failure.

    Parameters
    ----------
    path : str or os.PathLike
        The final name.
    mode : str
        "wb" or "w" (the file is always created new, under the temporary name).
    **open_kwargs
        For ``open`` (``newline``, ``encoding``).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", **open_kwargs):
        if mode not in ("w", "wb"):
            raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
        self.path = os.fspath(path)
        self.tmp = temporary_path(self.path)
        # A temporary left by a kill may be a hard link to another file: writing through
        # it would change that file. Remove it, then create the temporary exclusively.
        remove_quietly(self.tmp)
        self.file = _RecordingFile(open(self.tmp, mode.replace("w", "x"), **open_kwargs))
        self._synced = False

    def sync(self) -> None:
        """Flush and fsync the temporary, and close it."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        finally:
            self.file.close()
        self._synced = True

    def publish(self, sync_directory: bool = True) -> None:
        """Rename the synced temporary over the final name (and fsync the directory)."""
        if not self._synced:
            self.sync()
        os.replace(self.tmp, self.path)
        if sync_directory:
            fsync_directory(os.path.dirname(self.path))

    def discard(self) -> None:
        """Close and remove the temporary (after a failure): the final name is untouched."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            remove_quietly(self.tmp)

    def failure(self, exc: BaseException) -> BaseException:
        """The error to report for ``exc`` raised while writing: the OSError of the write
        itself (a full disk) when a writer (torch.save) hid it behind its own."""
        return self.file.error if self.file.error is not None and exc is not self.file.error else exc


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs):
    """Write ``path`` whole or not at all: yields a file object open on ``PATH.tmp``; on a
    clean exit it is fsynced and renamed over ``path`` and the directory fsynced; on an
    exception the temporary is removed, ``path`` is untouched, and the exception (the
    write's own OSError, e.g. ENOSPC, where torch.save hid it) propagates.

    Parameters
    ----------
    path : str or os.PathLike
        The file to replace.
    mode : str
        "wb" (default) or "w".
    **open_kwargs
        For ``open`` (``newline``, ``encoding``).

    Yields
    ------
    file object
    """
    target = AtomicFile(path, mode, **open_kwargs)
    try:
        yield target.file
        target.publish()
    except BaseException as exc:
        target.discard()
        failure = target.failure(exc)
        if failure is not exc:
            raise failure from exc
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text`` atomically (:func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


__all__ = ["AtomicFile", "atomic_write", "fsync_directory", "remove_quietly", "temporary_path", "write_bytes",
           "write_text"]
