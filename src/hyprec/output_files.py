"""Output files of the command line and of :func:`hyprec.ray.embed_dataset`.

Every output path is checked before any work starts (a model load or a calibration run can take minutes), and
results are written through a temporary file next to the target that replaces it only once complete. If writing
still fails at the end (the disk filled up, the directory went away), :func:`write_output` saves the result to a
rescue file in the system temporary directory and says where: computed results are never lost to a late I/O error.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from hyprec.errors import InvalidInputError, OutputWriteError


def _probe_directory(directory: Path, option: str, path: Path) -> None:
    """Create and remove a file in ``directory``: the one check that holds for permissions, read-only mounts and
    root alike (``os.access`` answers yes to root even on a read-only file system)."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".hyprec-write-check-")
    except OSError as exc:
        raise InvalidInputError(f"{option} {path}: cannot write in {directory} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Raise :class:`InvalidInputError` unless ``path`` can be written as an output file.

    Args:
        path: the file to write (it may exist; it is replaced).
        option: the option that named it, for the message (``--output``).
        suffixes: the accepted file suffixes (``(".npy", ".jsonl")``); empty accepts any.
    """
    if suffixes and path.suffix not in suffixes:
        raise InvalidInputError(f"{option} {path}: expected a {' or '.join(suffixes)} file")
    if path.is_dir():
        raise InvalidInputError(f"{option} {path}: is an existing directory; expected a file name")
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise InvalidInputError(f"{option} {path}: directory {parent} {what}")
    _probe_directory(parent, option, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise InvalidInputError(f"{option} {path}: the existing file is not writable")
    return path


def check_output_dir(path: Path, option: str) -> Path:
    """Raise :class:`InvalidInputError` unless ``path`` is, or can be created as, a writable directory (nothing is
    created here)."""
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{option} {path}: exists and is not a directory")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists decides whether mkdir can succeed
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInputError(f"{option} {path}: {existing} is not a directory")
    _probe_directory(existing, option, path)
    return path


@contextlib.contextmanager
def replaced_on_success(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix: writers such as ``np.save`` and matplotlib go by it);
    it replaces ``path`` when the block succeeds and is removed when it fails, so a failure never leaves a
    half-written file under the real name.

    Raises:
        OutputWriteError: the block completed but the rename failed; the complete file stays where the message says.
    """
    tmp = path.with_name(f".{path.stem}.partial-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputWriteError(f"cannot rename {tmp} to {path} ({exc}); the complete output is in {tmp}") from None


def write_output(path: Path, write: Callable[[Path], object], what: str) -> Path:
    """Write ``what`` with ``write(file)`` to ``path``; returns ``path``.

    Raises:
        OutputWriteError: writing failed; the result was written to a rescue file in the temporary directory,
            which the message names (or, if that failed too, both errors are named).
    """
    try:
        with replaced_on_success(path) as tmp:
            write(tmp)
        return path
    except OutputWriteError:  # written in full, under another name that the message gives
        raise
    except OSError as exc:
        error = exc
    try:
        fd, name = tempfile.mkstemp(prefix=f"hyprec-{path.stem}-", suffix=path.suffix)
        os.close(fd)
        write(Path(name))
    except OSError as exc:
        raise OutputWriteError(f"cannot write {what} to {path} ({error}), nor to a rescue file ({exc})") from None
    raise OutputWriteError(f"cannot write {what} to {path} ({error}); saved it to {name} instead")
