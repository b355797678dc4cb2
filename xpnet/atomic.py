"""Writes that matter go to a temporary name beside the target and are renamed into place,
so a reader (or a crash) never meets half a file under the real name. And what a command
will write is checked before it starts, so minutes of work are never lost to a typo."""

import contextlib
import os
import tempfile
from pathlib import Path

from xpnet.errors import UsageError, XpnetError


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path in path's directory (same suffix); on success it replaces path."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except OSError as exc:
        raise XpnetError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path, text):
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def check_writable(path, flag):
    """Raise UsageError now, naming the flag, when path could not be written later: a missing
    or unwritable directory, or a directory where a file should go. It writes and removes a
    probe file, since permission bits alone say nothing to root or about read-only mounts."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name in it, e.g. {path / f'out{path.suffix}'}")
    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"{flag} {path}: the directory {directory} does not exist; create it first or choose another")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write in {directory} ({exc.strerror}); choose a writable directory"
        ) from None
