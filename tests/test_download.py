"""Downloads against a real HTTP server on 127.0.0.1 serving small generated IDX files."""

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy
import pytest

from xpnet.data import datasets
from xpnet.data.datasets import Dataset, DatasetFile
from xpnet.data.download import download_file, ensure_dataset, prepare_data_dir, sha256_hex
from xpnet.data.idx import encode_idx
from xpnet.errors import DataError

rng = numpy.random.default_rng(0)
CONTENT = {
    "train-images-idx3-ubyte": encode_idx(rng.integers(0, 256, (30, 28, 28), dtype=numpy.uint8)),
    "train-labels-idx1-ubyte": encode_idx(rng.integers(0, 10, 30, dtype=numpy.uint8)),
    "t10k-images-idx3-ubyte": encode_idx(rng.integers(0, 256, (5, 28, 28), dtype=numpy.uint8)),
    "t10k-labels-idx1-ubyte": encode_idx(rng.integers(0, 10, 5, dtype=numpy.uint8)),
}
GZ = {name: gzip.compress(content, mtime=0) for name, content in CONTENT.items()}
FILES = tuple(DatasetFile(name, sha256_hex(CONTENT[name]), sha256_hex(GZ[name])) for name in CONTENT)
TRAIN_IMAGES = FILES[0]


def flip_one_byte(content):
    return content[:-1] + bytes([content[-1] ^ 1])


class Handler(http.server.BaseHTTPRequestHandler):
    """/<behaviour>/<file>.gz: ok, missing, truncated, corrupt, recompressed, stall, slow, drip."""

    def do_GET(self):
        behaviour, filename = self.path.strip("/").split("/")
        name = filename.removesuffix(".gz")
        body = GZ.get(name)
        if body is None or behaviour == "missing":
            self.send_error(404)
            return
        if behaviour == "corrupt":
            body = gzip.compress(flip_one_byte(CONTENT[name]), mtime=0)
        if behaviour == "recompressed":
            body = gzip.compress(CONTENT[name], compresslevel=1, mtime=12345)
        if behaviour == "stall":
            time.sleep(5)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if behaviour == "truncated":
            self.wfile.write(body[: len(body) // 2])
            return
        if behaviour == "drip":  # a byte every 0.2 s: each receive well inside any timeout
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        if behaviour == "slow":  # about 3 s per file, in small pieces
            for start in range(0, len(body), len(body) // 30 + 1):
                self.wfile.write(body[start : start + len(body) // 30 + 1])
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def refused_url():
    """An address on which nothing listens: connecting is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/ok"


def tiny(*mirrors):
    return Dataset("tiny", mirrors=mirrors, files=FILES)


def assert_complete(directory):
    for name, content in CONTENT.items():
        assert gzip.decompress((directory / f"{name}.gz").read_bytes()) == content
    assert not list(directory.glob(".*.part.gz")), "a temporary file was left behind"


def test_clean_download(server, tmp_path):
    assert ensure_dataset(tiny(f"{server}/ok"), tmp_path, verify_existing=True) == tmp_path
    assert_complete(tmp_path)


@pytest.mark.parametrize("first", ["missing", "truncated", "corrupt", "refused"])
def test_a_failing_first_mirror_falls_through_to_the_second(server, tmp_path, first):
    first_url = refused_url() if first == "refused" else f"{server}/{first}"
    ensure_dataset(tiny(first_url, f"{server}/ok"), tmp_path, verify_existing=True)
    assert_complete(tmp_path)


def test_every_mirror_wrong_is_one_error_naming_each_and_leaves_nothing(server, tmp_path):
    with pytest.raises(DataError) as info:
        download_file(
            TRAIN_IMAGES, tmp_path, [f"{server}/corrupt", f"{server}/truncated", f"{server}/missing", refused_url()]
        )
    message = str(info.value)
    assert "checksum of its content does not match" in message and "truncated" in message
    assert "HTTP 404" in message and "refused" in message.lower()
    assert list(tmp_path.iterdir()) == []


def test_a_stalled_server_is_bounded_by_the_timeout(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match="timed out"):
        download_file(TRAIN_IMAGES, tmp_path, [f"{server}/stall"], timeout=0.5)
    assert time.monotonic() - start < 3


def test_a_server_dripping_bytes_meets_the_deadline_and_the_next_mirror_serves(server, tmp_path):
    start = time.monotonic()
    with pytest.raises(DataError, match=f"{server}/drip/{TRAIN_IMAGES.name}.gz: too slow: .* bytes in 2 s"):
        download_file(TRAIN_IMAGES, tmp_path, [f"{server}/drip"], timeout=5, deadline=2)
    assert time.monotonic() - start < 3 and list(tmp_path.iterdir()) == []
    path = download_file(TRAIN_IMAGES, tmp_path, [f"{server}/drip", f"{server}/ok"], timeout=5, deadline=2)
    assert gzip.decompress(path.read_bytes()) == CONTENT[TRAIN_IMAGES.name]


def test_a_directory_that_cannot_be_written_is_one_error_the_cleanup_does_not_hide(server, tmp_path, monkeypatch):
    """A read-only mount, as the download sees it: creating the temporary file fails with EROFS,
    and so would removing it."""
    import errno

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("builtins.open", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(DataError, match=f"cannot write to {tmp_path} \\(Read-only file system\\); pass --data-dir"):
        download_file(TRAIN_IMAGES, tmp_path, [f"{server}/ok"])


def test_recompressed_file_is_accepted_and_a_flipped_byte_rejected(server, tmp_path):
    path = download_file(TRAIN_IMAGES, tmp_path, [f"{server}/recompressed"])
    assert path.read_bytes() != GZ[TRAIN_IMAGES.name]  # not the published .gz bytes
    assert gzip.decompress(path.read_bytes()) == CONTENT[TRAIN_IMAGES.name]
    with pytest.raises(DataError, match="checksum"):
        download_file(TRAIN_IMAGES, tmp_path / "other", [f"{server}/corrupt"])


DOWNLOAD_SCRIPT = """
import json, sys
from xpnet.data.datasets import Dataset, DatasetFile
from xpnet.data.download import ensure_dataset
files = tuple(DatasetFile(*f) for f in json.loads(sys.argv[1]))
ensure_dataset(Dataset("tiny", mirrors=(sys.argv[2],), files=files), sys.argv[3], verify_existing=True)
"""


def start_download(mirror, directory):
    files = json.dumps([[f.name, f.sha256, f.gz_sha256] for f in FILES])
    return subprocess.Popen(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, files, mirror, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_download_killed_midway_leaves_no_file_and_the_next_run_completes(server, tmp_path):
    process = start_download(f"{server}/slow", tmp_path)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".*.part.gz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    process.kill()
    process.wait()
    assert list(tmp_path.glob(".*.part.gz")), "the kill should have caught a download in flight"
    assert not (tmp_path / f"{TRAIN_IMAGES.name}.gz").exists()
    ensure_dataset(tiny(f"{server}/ok"), tmp_path, verify_existing=True)
    assert_complete(tmp_path)  # the killed run's temporary file is cleaned up too


def test_stale_parts_go_only_where_their_process_can_be_probed(tmp_path, monkeypatch):
    """A part whose process has exited is removed, one whose process runs is kept; on Windows,
    where os.kill(pid, 0) would terminate the process, none is probed and all are kept."""
    from xpnet.data import download

    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    parts = {pid: tmp_path / f".train.{pid}.part.gz" for pid in (int(exited.stdout), os.getpid())}
    for part in parts.values():
        part.touch()
    download._remove_stale_parts(tmp_path, "train")
    assert [pid for pid, part in parts.items() if part.exists()] == [os.getpid()]

    parts[int(exited.stdout)].touch()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail("os.kill on Windows terminates the process"))
    download._remove_stale_parts(tmp_path, "train")
    assert all(part.exists() for part in parts.values())


@pytest.mark.slow  # 10 s: two processes download the whole dataset
def test_two_processes_downloading_at_once_end_with_one_correct_copy(server, tmp_path):
    processes = [start_download(f"{server}/slow", tmp_path) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    assert_complete(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.gz" for name in CONTENT)


@pytest.fixture
def tiny_registered(server, monkeypatch, tmp_path):
    monkeypatch.setitem(datasets.DATASETS, "tiny", tiny(f"{server}/ok"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    return tmp_path / "cache" / "xpnet" / "tiny"


def test_first_use_downloads_into_the_per_user_cache(tiny_registered):
    assert prepare_data_dir(dataset="tiny") == tiny_registered
    assert_complete(tiny_registered)


def test_a_corrupt_file_in_the_cache_is_fetched_again(tiny_registered):
    prepare_data_dir(dataset="tiny")
    target = tiny_registered / f"{TRAIN_IMAGES.name}.gz"
    target.write_bytes(gzip.compress(flip_one_byte(CONTENT[TRAIN_IMAGES.name])))
    prepare_data_dir(dataset="tiny")
    assert_complete(tiny_registered)


def test_a_corrupt_file_offline_is_reported_with_its_path_and_the_fix(tiny_registered, monkeypatch):
    prepare_data_dir(dataset="tiny")
    target = tiny_registered / f"{TRAIN_IMAGES.name}.gz"
    target.write_bytes(b"not gzip at all")
    monkeypatch.setitem(datasets.DATASETS, "tiny", tiny(refused_url()))
    with pytest.raises(DataError, match=f"{target} is corrupt .* could not be fetched again .* delete it"):
        prepare_data_dir(dataset="tiny")
    assert target.read_bytes() == b"not gzip at all"  # nothing replaced it with worse


def test_an_unwritable_directory_is_a_clear_error(server, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot write to .*a-file/data"):
        download_file(TRAIN_IMAGES, blocker / "data", [f"{server}/ok"])


def test_a_named_directory_with_other_idx_data_is_used_as_it_is(tmp_path, monkeypatch):
    """--data-dir works for any directory holding the four files, without MNIST's checksums."""
    for name, content in CONTENT.items():
        (tmp_path / name).write_bytes(content)
    assert prepare_data_dir(str(tmp_path)) == tmp_path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "xpnet", *args], capture_output=True, text=True, timeout=300)


def test_data_verify_passes_on_the_real_files(mnist_dir):
    result = run_cli("data", "verify", "--data-dir", str(mnist_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok   ") == 4 and "holds the verified mnist files" in result.stdout


def test_data_verify_fails_on_other_files(tmp_path):
    for name, content in CONTENT.items():
        (tmp_path / name).write_bytes(content)
    result = run_cli("data", "verify", "--data-dir", str(tmp_path))
    assert result.returncode == 1 and result.stdout.count("FAIL") == 4


def test_data_info_prints_counts_shapes_and_paths(mnist_dir):
    result = run_cli("data", "info", "--data-dir", str(mnist_dir))
    assert result.returncode == 0, result.stderr
    assert "train       50000 images of 28x28, labels 0-9" in result.stdout
    assert "validation  10000 images" in result.stdout and "test        10000 images" in result.stdout
    assert f"{Path(mnist_dir) / 'train-images-idx3-ubyte.gz'}" in result.stdout


def test_a_system_package_copy_is_used_before_any_download(tmp_path):
    """As Debian's dataset-fashion-mnist installs it: found and used, nothing fetched."""
    system_dir = tmp_path / "usr-share-datasets"
    system_dir.mkdir()
    for name, content in CONTENT.items():
        (system_dir / f"{name}.gz").write_bytes(gzip.compress(content, compresslevel=9))  # recompressed
    dataset = Dataset("tiny", mirrors=(refused_url(),), files=FILES, system_dirs=(str(system_dir),))
    assert ensure_dataset(dataset, tmp_path / "cache", verify_existing=True) == system_dir
    assert not (tmp_path / "cache").exists()


def test_data_verify_looks_where_train_reads_a_system_package_copy(tmp_path, monkeypatch, capsys):
    """`data verify` and `train` resolve the same directory: a system package's copy included."""
    from xpnet.cli import main

    system_dir = tmp_path / "usr-share-datasets"
    system_dir.mkdir()
    for name, content in CONTENT.items():
        (system_dir / f"{name}.gz").write_bytes(gzip.compress(content))
    dataset = Dataset("tiny", mirrors=(refused_url(),), files=FILES, system_dirs=(str(system_dir),))
    monkeypatch.setitem(datasets.DATASETS, "fashion-mnist", dataset)  # a name the CLI accepts
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("XPNET_DATA_DIR", raising=False)
    assert main(["data", "verify", "--dataset", "fashion-mnist"]) == 0
    assert f"{system_dir} holds the verified fashion-mnist files" in capsys.readouterr().out


def test_a_data_directory_that_cannot_be_read_is_one_error(tmp_path, monkeypatch):
    """chmod 000 as an unprivileged user (root reads anyway): the first read is refused."""
    import errno

    from xpnet.data import download

    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(GZ["train-labels-idx1-ubyte"])

    def refused(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(download, "content_sha256", refused)
    with pytest.raises(DataError, match=f"cannot read {tmp_path} \\(Permission denied\\); check its permissions"):
        prepare_data_dir(tmp_path)
