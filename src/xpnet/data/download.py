"""Fetching a dataset: mirrors in order, checksums that decide, writes that are atomic.

Each file downloads to a temporary name in the target directory, is verified, and only then
is renamed over the final name (os.replace is atomic), so an interrupted or failed download
never leaves a partial file under the final name, and two processes fetching at once each
rename a complete, verified copy. Every network call has a timeout.
"""

import hashlib
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from xpnet.atomic import remove_quietly
from xpnet.data.datasets import DATASETS, get_dataset
from xpnet.data.idx import content_sha256
from xpnet.data.mnist import ENV_VAR, find_file, missing_files, require_files, resolve_data_dir
from xpnet.errors import DataError

TIMEOUT = 30.0  # seconds for the connection and for each read
DEADLINE = 600.0  # seconds for a whole file, so a server trickling bytes cannot hold us forever
CHUNK = 1 << 16


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def check_file(path, expected):
    """None when path holds expected's content (.gz or raw), else the reason it does not."""
    path = Path(path)
    if expected.gz_sha256 and path.suffix == ".gz" and sha256_hex(path.read_bytes()) == expected.gz_sha256:
        return None  # byte-identical to the published .gz: no need to decompress
    try:
        digest = content_sha256(path)
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ")
    if digest != expected.sha256:
        return "checksum of its content does not match"
    return None


def _fetch(url, destination, timeout, deadline, label):
    """Stream url into the open file destination; raises OSError-family errors on failure, a
    TimeoutError once the whole file has taken over `deadline` seconds. Each read returns what
    has arrived (read1), so a server dripping bytes meets the deadline too: read(n) would wait
    for all n bytes, each receive inside its timeout, and never look at the clock."""
    start = time.monotonic()
    with urllib.request.urlopen(url, timeout=min(timeout, deadline)) as response:
        expected_size = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        quiet = not sys.stderr.isatty()
        with tqdm(total=expected_size, unit="B", unit_scale=True, desc=label, disable=quiet, leave=False) as bar:
            while chunk := response.read1(CHUNK):
                destination.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
                if time.monotonic() - start > deadline:
                    raise TimeoutError(f"too slow: {received:,} bytes in {deadline:.0f} s, the time a file is given")
    if expected_size is not None and received != expected_size:
        raise OSError(f"truncated: got {received} of {expected_size} bytes")


def _describe(exc):
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}"
    return str(exc) or type(exc).__name__


def _remove_stale_parts(directory, name):
    """Temporary files left by a download that was killed (its process is gone)."""
    for part in Path(directory).glob(f".{name}.*.part.gz"):
        try:
            pid = int(part.name.split(".")[-3])
        except ValueError:
            pid = None
        if pid is None or not _process_alive(pid):
            remove_quietly(part)


def _process_alive(pid):
    """Whether process pid may still run. On Windows, always: os.kill(pid, 0) there terminates the
    process instead of probing it, and a stale hidden file is better than that."""
    if sys.platform == "win32":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return True


def download_file(expected, directory, mirrors, timeout=TIMEOUT, deadline=DEADLINE):
    """Fetch expected.name + '.gz' into directory from the first mirror that serves it right."""
    directory = Path(directory)
    final = directory / f"{expected.name}.gz"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(directory, expected.name)
    except OSError as exc:
        raise DataError(f"cannot write to {directory} ({exc.strerror}); pass --data-dir a writable directory") from None
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{expected.name}.gz"
        # Hidden, named for its process (so a dead one's is recognised), ending in .gz so it
        # is read like the final file.
        temporary = directory / f".{expected.name}.{os.getpid()}.part.gz"
        try:
            destination = open(temporary, "wb")
        except OSError as exc:  # no permission, a read-only mount, a full disk: no mirror can help
            raise DataError(
                f"cannot write to {directory} ({exc.strerror}); pass --data-dir a writable directory"
            ) from None
        try:
            with destination:
                _fetch(url, destination, timeout, deadline, expected.name)
            reason = check_file(temporary, expected)
            if reason is None:
                os.replace(temporary, final)
                return final
            failures.append(f"{url}: {reason}")
        except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts and resets are OSErrors
            failures.append(f"{url}: {_describe(exc)}")
        finally:
            remove_quietly(temporary)
    raise DataError(f"could not download {expected.name}: " + "; ".join(failures))


def system_copy(dataset):
    """A system package's directory holding the dataset's four files, complete and right, or None."""
    for system_dir in dataset.system_dirs:
        found = [find_file(system_dir, f.name) for f in dataset.files]
        if all(found) and all(check_file(path, f) is None for path, f in zip(found, dataset.files)):
            return Path(system_dir)
    return None


def download_command(dataset_name):
    """The command that fetches a dataset, as a user would type it."""
    return "xpnet data download" + ("" if dataset_name == "mnist" else f" --dataset {dataset_name}")


class AnotherDataset(DataError):
    """A directory named for one dataset holds another: what to do instead, in one line. Where
    the dataset cannot change (a checkpoint records it), fixed_by says why, and --dataset is not
    offered."""

    def __init__(self, directory, found, wanted, from_environment, fixed_by=None):
        self.directory, self.found, self.wanted = directory, found, wanted
        self.from_environment, self.fixed_by = from_environment, fixed_by
        source = f" ({ENV_VAR})" if from_environment else ""
        instead = f", or unset {ENV_VAR} to use xpnet's own cache" if from_environment else ""
        last = f" ({fixed_by})" if fixed_by else f", or --dataset {found}"
        super().__init__(
            f"{directory}{source} holds {found}, not {wanted}: pass --data-dir a directory of "
            f"{wanted}'s files{instead}{last}"
        )

    def fixed(self, by):
        """The same fault where the dataset is fixed, by what fixed it."""
        return AnotherDataset(self.directory, self.found, self.wanted, self.from_environment, by)


def check_not_another_dataset(directory, dataset, from_environment=False):
    """A directory the user names may hold any IDX data, but not another dataset xpnet knows:
    MNIST and Fashion-MNIST share their file names, so only the content tells them apart.
    The training labels decide (60 kB to hash, not 50 MB). from_environment: the directory is
    $XPNET_DATA_DIR's, which the message then names."""
    try:
        labels = find_file(directory, dataset.files[1].name)
        if labels is None:
            return
        digest = content_sha256(labels)
    except OSError as exc:  # no permission to read it: say so here, before any reader trips on it
        raise DataError(f"cannot read {directory} ({exc.strerror}); check its permissions or pass --data-dir") from None
    for other in DATASETS.values():
        if other is not dataset and digest == other.files[1].sha256:
            raise AnotherDataset(directory, other.name, dataset.name, from_environment)


def data_location(data_dir=None, dataset="mnist"):
    """(directory, named): where dataset is read from, as prepare_data_dir decides it, without
    downloading: the directory the user named, else a system package's copy, else the cache."""
    directory, named = resolve_data_dir(data_dir, dataset)
    if not named:
        directory = system_copy(get_dataset(dataset)) or directory
    return directory, named


def ensure_dataset(dataset, directory, verify_existing, download=True):
    """The directory holding dataset's four verified files, downloading what is missing.

    verify_existing checks the files already there (xpnet does for its own cache, which it
    can repair; a directory the user names may hold any IDX data). A file that fails is
    fetched again and replaced only once a good copy is verified.
    """
    directory = Path(directory)
    system_dir = system_copy(dataset)
    if system_dir is not None:
        return system_dir
    for expected in dataset.files:
        present = find_file(directory, expected.name)
        reason = f"{directory / expected.name}(.gz) is missing"
        if present is not None:
            reason = check_file(present, expected) if verify_existing else None
            if reason is None:
                continue
            reason = f"{present} is corrupt ({reason})"
        if not download:
            raise DataError(f"{reason}; run `{download_command(dataset.name)}`")
        try:
            download_file(expected, directory, dataset.mirrors)
        except DataError as exc:
            if present is not None:
                raise DataError(
                    f"{reason} and could not be fetched again ({exc}); delete it and retry online, or pass --data-dir"
                ) from None
            raise DataError(
                f"{exc}. Offline? Put the four files in {directory}, or point --data-dir or {ENV_VAR} at a "
                "directory holding them"
            ) from None
    return directory


def prepare_data_dir(data_dir=None, dataset="mnist", download=True):
    """The directory to read dataset from, complete: --data-dir, else $XPNET_DATA_DIR, else
    the per-user cache. A directory the user names must exist (a typo should not start a
    download somewhere unexpected); what it lacks is downloaded into it. The cache is
    created as needed and its files are verified on every use."""
    spec = get_dataset(dataset)
    directory, named = resolve_data_dir(data_dir, dataset)
    if not named:
        return ensure_dataset(spec, directory, verify_existing=True, download=download)
    if not directory.is_dir():
        require_files(directory)  # raises the one-line "does not exist" error
    check_not_another_dataset(directory, spec, from_environment=not data_dir)
    if not missing_files(directory):
        return directory
    return ensure_dataset(spec, directory, verify_existing=False, download=download)
