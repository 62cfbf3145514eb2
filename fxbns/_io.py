"""File output and input: atomic writes, writability checks, quiet checkpoint reads.

A write goes to a temporary file beside the target, then is renamed over it: a failure leaves no
partial file and never replaces an existing output with a broken one.  The file gets the usual
permissions (``0o666`` less the umask, or those of the file it replaces).

>>> import os, tempfile
>>> d = tempfile.mkdtemp()
>>> atomic_write_text(os.path.join(d, "a.txt"), "hi")
>>> open(os.path.join(d, "a.txt")).read()
'hi'
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "check_writable", "quiet_torch_load",
           "load_error_message"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_for(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # an existing output keeps its permissions
    except OSError:
        return 0o666 & ~_umask()


def check_writable(path: str | os.PathLike) -> None:
    """Raise ``OSError`` with a sentence saying why ``path`` cannot be written (nothing is left behind).

    The folder must exist and a file must be creatable in it (tried, then removed: permission bits do not
    bind root, and some folders such as ``/proc`` refuse files whatever they say).

    Args:
        path: the output file.

    Returns:
        None.

    >>> check_writable("/proc/out.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    OSError: cannot write '/proc/out.json': folder '/proc' does not accept new files (...)
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OSError(f"cannot write {path!r}: it is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        probe = folder
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if probe and not os.path.isdir(probe):
            raise OSError(f"cannot write {path!r}: {probe!r} is a file, not a folder")
        raise OSError(f"cannot write {path!r}: folder {folder!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fxbns-probe-", dir=folder)
    except OSError as e:
        raise OSError(f"cannot write {path!r}: folder {folder!r} does not accept new files "
                      f"({e.strerror or type(e).__name__})") from None
    os.close(fd)
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in ``path``'s folder; on success it is renamed to ``path``.

    Args:
        path: the final file.

    Returns:
        A context manager yielding the temporary path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OSError(f"cannot write {path!r}: folder {folder!r} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OSError(f"cannot write {path!r}: folder {folder!r} does not accept new files "
                      f"({e.strerror or type(e).__name__})") from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically.

    Args:
        path: the final file.
        write: writes the content to the path it is given.

    Returns:
        None.
    """
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: the final file.
        text: the content.

    Returns:
        None.
    """
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, w)


def quiet_torch_load(path: str | os.PathLike, weights_only: bool = True) -> Any:
    """``torch.load(path, map_location="cpu")`` without torch's warnings (they would come before the
    one-line error that a failed read gets).

    Args:
        path: the file.
        weights_only: torch's ``weights_only`` (tensors and plain containers only).

    Returns:
        The loaded object.
    """
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(os.fspath(path), map_location="cpu", weights_only=weights_only)


def load_error_message(path: str | os.PathLike, e: BaseException) -> str:
    """A sentence saying why ``path`` could not be read by :func:`quiet_torch_load`.

    Args:
        path: the file.
        e: the exception ``torch.load`` raised.

    Returns:
        The message (no trailing period).

    >>> load_error_message("m.pt", EOFError())
    "cannot read 'm.pt': the file is empty or was cut short"
    """
    p = os.fspath(path)
    text = str(e)
    if isinstance(e, EOFError) or "Ran out of input" in text:
        why = "the file is empty or was cut short"
    elif isinstance(e, zipfile.BadZipFile) or "central directory" in text or "zip archive" in text:
        why = "its zip archive is incomplete or damaged (a truncated copy or an interrupted save?)"
    elif isinstance(e, IsADirectoryError):
        why = "it is a folder"
    elif isinstance(e, PermissionError):
        why = "permission denied"
    elif isinstance(e, OSError) and e.strerror:
        why = e.strerror.lower()
    else:
        why = "it is not a file written by torch.save, or it is corrupt"
    return f"cannot read {p!r}: {why}"
