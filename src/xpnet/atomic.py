"""Writes that matter go to a temporary name beside the target and are renamed into place,
so a reader (or a crash) never meets half a file under the real name. And what a command
will write is checked before it starts, so minutes of work are never lost to a typo."""

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from xpnet.errors import UsageError, XpnetError

NODE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(path):
    """What path names when it is not a regular file: 'a character device', 'a FIFO', ..."""
    mode = path.stat().st_mode
    return next((kind for test, kind in NODE_KINDS if test(mode)), "not a regular file")


def file_target(path, name=None):
    """The file a write to path replaces: path with its symbolic links followed (a link stays a
    link, and what it points to is written). Raises XpnetError, naming path as `name` says (a
    flag, or the path itself), where that is something other than a regular file or nothing:
    renaming a new file over /dev/null or a FIFO would replace it."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        raise XpnetError(f"{name or path} is {_kind(target)}, not a file; give the path of a file to write")
    return target


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside the file path names (same suffix); on success it replaces
    that file. A symbolic link is followed; a path naming a device, FIFO or directory is refused."""
    target = file_target(path)
    temporary = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        yield temporary
        os.replace(temporary, target)
    except OSError as exc:
        raise XpnetError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        remove_quietly(temporary)


def remove_quietly(path):
    """Remove path if it is there. A failure to (a read-only mount) is left unsaid: a cleanup must
    never hide the error it cleans up after."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def write_text(path, text):
    with atomic_path(path) as temporary:
        temporary.write_text(text)


def check_writable(path, flag):
    """Raise UsageError now, naming the flag, when path could not be written later: a missing
    or unwritable directory, or a directory where a file should go. It writes and removes a
    probe file, since permission bits alone say nothing to root or about read-only mounts."""
    if not os.fspath(path):  # Path('') would be '.', the current directory
        raise UsageError(f"{flag} '' names no file; give a file name, or leave {flag} out")
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name in it, e.g. {path / f'out{path.suffix}'}")
    try:
        target = file_target(path, f"{flag} {path}")
    except XpnetError as exc:
        raise UsageError(str(exc)) from None
    directory = path.parent if target.parent == Path(os.path.realpath(path.parent)) else target.parent
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{flag} {path}: {directory} is not a directory; choose another path")
    if not directory.is_dir():
        raise UsageError(f"{flag} {path}: the directory {directory} does not exist; create it first or choose another")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UsageError(
            f"{flag} {path}: cannot write in {directory} ({exc.strerror}); choose a writable directory"
        ) from None
