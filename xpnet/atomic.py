"""Writes that matter go to a temporary name beside the target and are renamed into place,
so a reader (or a crash) never meets half a file under the real name."""

import contextlib
import os
from pathlib import Path

from xpnet.errors import XpnetError


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
