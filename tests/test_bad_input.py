"""Every command under bad input, by class: each case must exit with its code, say on one line of
stderr what is wrong and what to do, print no traceback, and leave every file on disk as it was.
Cases that must be refused before any work starts must also be refused within seconds."""

import gzip
import hashlib
import json
import os
import shlex
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy
import pytest

import xpnet
from xpnet.cli import UNWRITABLE_MESSAGE
from xpnet.data.datasets import FILE_NAMES
from xpnet.data.idx import write_idx
from xpnet.data.synthetic import synthetic_splits

FAST = 15.0  # seconds: start-up and imports included, far from any training run


def run_xpnet(args, cwd, env=None, prelude=""):
    code = f"import sys\n{prelude}\nfrom xpnet.cli import main\nsys.exit(main(sys.argv[1:]))"
    environment = {**os.environ, **(env or {})}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, env=environment, timeout=600
    )
    return result, time.perf_counter() - start


def tree_hashes(*roots):
    """SHA-256 of every file under the roots: what must not change."""
    hashes = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file():
                hashes[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A small training run's checkpoint, with momentum (so it holds velocities), to edit."""
    path = tmp_path_factory.mktemp("base") / "run.npz"
    config = xpnet.TrainConfig(epochs=1, hidden=(8,), batch_size=64, momentum=0.9)
    trainer = xpnet.Trainer("numpy", synthetic_splits(n_train=256), config)
    trainer.fit(log=lambda line: None)
    trainer.save(path)
    return path


def edited(base, directory, files):
    """A copy of the base checkpoint with metadata fields, the architecture's, the optimiser's,
    config settings and arrays replaced."""
    with numpy.load(base) as archive:
        contents = {key: archive[key] for key in archive.files}
    document = json.loads(contents.pop("metadata").tobytes())
    document.update(files.get("metadata", {}))
    for part in ("architecture", "optimizer", "config"):
        document[part] = {**document[part], **files.get(part, {})}
    contents.update(files.get("arrays", {}))
    contents["metadata"] = numpy.frombuffer(json.dumps(document).encode(), numpy.uint8)
    path = directory / "edited.npz"
    numpy.savez(path, **contents)
    return path


def write_dataset(directory, n_train=10_100, n_test=50, labels=None, test_images=None):
    directory.mkdir(exist_ok=True)
    splits = synthetic_splits(n_train=n_train, n_test=n_test)
    train_labels = splits.train.labels if labels is None else labels
    test = splits.test.images if test_images is None else test_images
    for name, array in zip(FILE_NAMES, (splits.train.images, train_labels, test, splits.test.labels[: len(test)])):
        write_idx(directory / f"{name}.gz", array)
    return directory


def overflowing_images(directory):
    """An image file whose header declares 2^31 x 2^31 x 4 images: 2^64 bytes."""
    write_dataset(directory)
    header = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 2**31, 2**31, 4)
    with gzip.open(directory / f"{FILE_NAMES[0]}.gz", "wb") as f:
        f.write(header + bytes(1000))
    return directory


def case(kind, name, command, code, *parts, before_work=True, **files):
    """command: xpnet's arguments, with {data} for --data-dir of a small dataset, {base} for a
    training run's checkpoint, and {edited}, {dataset}, {text}, {model} or {overflow} for the
    file that files (metadata=, config=, arrays=, dataset=) describe or that the name makes."""
    return pytest.param(command, code, parts, before_work, files, id=f"{kind}:{name}")


CASES = [
    # Work that would be lost after it is done: refused before it starts.
    case("outputs", "save-into-missing-dir", "train --save no/such/dir/m.npz {data}", 2, "--save no/such/dir/m.npz",
         "does not exist", "create it"),
    case("outputs", "save-into-unwritable-dir", "train --save /proc/m.npz {data}", 2, "cannot write in /proc",
         "writable directory"),
    case("outputs", "save-to-a-directory", "train --save . {data}", 2, "--save . is a directory", "give a file name"),
    case("outputs", "plot-into-missing-dir", "train --plot gone/curves.png {data}", 2, "--plot gone/curves.png",
         "does not exist"),
    case("outputs", "plot-of-an-unknown-format", "train --plot curves.txt {data}", 2,
         "--plot curves.txt: cannot write a .txt image; end the name in .png, .svg or .pdf"),
    case("outputs", "bench-plot-without-a-suffix", "bench --quick --plot throughput", 2,
         "--plot throughput: the name has no suffix"),
    case("outputs", "bench-json-into-missing-dir", "bench --quick --json /nonexistent/x.json", 2,
         "--json /nonexistent/x.json", "does not exist"),
    case("outputs", "evaluate-plot-to-a-directory", "evaluate --checkpoint {base} --plot . {data}", 2,
         "--plot . is a directory"),
    case("outputs", "save-under-a-file", "train --save /etc/passwd/m.npz {data}", 2,
         "--save /etc/passwd/m.npz: /etc/passwd is not a directory"),
    case("outputs", "save-and-plot-to-one-file", "train --save out.png --plot out.png {data}", 2,
         "--save and --plot both write out.png; give each its own file"),
    case("outputs", "bench-json-and-markdown-to-one-file", "bench --quick --json out.txt --markdown out.txt", 2,
         "--json and --markdown both write out.txt"),
    # Resuming: the run's own settings, and only a run.
    case("resume", "with-hidden", "train --resume {base} --hidden 100 {data}", 2,
         "--resume continues the run with its own settings", "drop --hidden"),
    case("resume", "with-lr-and-batch-size", "train --resume {base} --lr 0.1 --batch-size 64 {data}", 2,
         "drop --batch-size, --lr"),
    case("resume", "a-saved-model", "train --resume {model} {data}", 2, "holds a model but no training run"),
    case("resume", "epochs-already-done", "train --resume {base} --epochs 1 {data}", 2, "is already at epoch 1",
         "pass --epochs above it"),
    # Checkpoints edited or broken by hand.
    *[
        case("checkpoint", f"{key}={value!r}", "evaluate --checkpoint {edited} {data}", 2,
             "not a usable xpnet checkpoint", key, architecture={key: value})
        for key, value in [
            ("sizes", "abc"), ("sizes", [784]), ("sizes", [784, 0, 10]), ("sizes", [784, True, 10]),
            ("mean", "x"), ("std", 0), ("std", -1.0), ("dtype", "bogus"), ("dtype", "int8"), ("dtype", "float16"),
            ("activation", "swish"),
        ]
    ],
    *[
        case("checkpoint", f"{key}={value!r}", "evaluate --checkpoint {edited} {data}", 2,
             "not a usable xpnet checkpoint", key, metadata={key: value})
        for key, value in [
            ("epoch", "3"), ("epoch", -1), ("epoch_step", 1.5), ("rng_state", {"x": 1}),
            ("history", [1]), ("history", [{"epoch": 1}]), ("epoch_losses", ["nan"]), ("dataset", 7),
        ]
    ],
    case("checkpoint", "dataset-unknown", "train --resume {edited} --epochs 2", 2, "not a usable xpnet checkpoint",
         "dataset must be one this xpnet knows (mnist, fashion-mnist), got 'cifar-100'",
         metadata={"dataset": "cifar-100"}),
    case("checkpoint", "epoch-step-beyond-the-epoch", "train --resume {edited} --epochs 2 {data}", 2,
         "the checkpoint's epoch_step 1000000 (with 4 epoch_losses) is no step within an epoch of 32 steps",
         "the file is damaged", metadata={"epoch_step": 1_000_000}),
    case("checkpoint", "hidden-contradicting-sizes", "evaluate --checkpoint {edited} {data}", 2,
         "not a usable xpnet checkpoint", "config.hidden [100] contradicts the architecture's sizes [784, 8, 10]",
         config={"hidden": [100]}),
    case("checkpoint", "optimizer-steps=-5", "evaluate --checkpoint {edited} {data}", 2,
         "not a usable xpnet checkpoint", "optimizer_steps", optimizer={"steps": -5}),
    case("checkpoint", "optimizer-without-a-name", "evaluate --checkpoint {edited} {data}", 2,
         "not a usable xpnet checkpoint", "the optimiser must have a name", optimizer={"name": 7}),
    case("checkpoint", "optimizer-other-than-its-settings", "train --resume {edited} --epochs 2 {data}", 2,
         "the checkpoint's optimiser is adam with ['velocity'], where its settings make sgd with ['velocity']",
         optimizer={"name": "adam"}),
    *[
        case("checkpoint", f"config-{key}={value!r}", "train --resume {edited} {data}", 2,
             "not a usable xpnet checkpoint", message, config={key: value})
        for key, value, message in [
            ("batch_size", 0, "batch_size must be an integer >= 1"),
            ("lr", -1.0, "learning rate must be a finite number above 0"),
            ("schedule", "linear", "schedule must be one of 'constant', 'cosine', 'step', 'exponential', got 'linear'"),
            ("colour", "red", "unknown settings colour"),
            ("hidden", 200, "hidden must be a tuple of integers, got 200"),
            ("nesterov", "no", "nesterov must be True or False, got 'no'"),
        ]
    ],
    *[
        case("checkpoint", f"param.1-{label}", "evaluate --checkpoint {edited} {data}", 2,
             "not a usable xpnet checkpoint", message, arrays={"param.1": array})
        for label, array, message in [
            ("strings", numpy.array(["a"] * 8), "param.1 holds <U1"),
            ("integers", numpy.zeros(8, numpy.int64), "param.1 holds int64"),
            ("complex", numpy.zeros(8, numpy.complex64), "param.1 holds complex64"),
            ("nan", numpy.full(8, numpy.nan, numpy.float32), "param.1 holds NaN"),
            ("wrong-shape", numpy.zeros(9, numpy.float32), "param.1 has shape (9,)"),
        ]
    ],
    case("checkpoint", "not-an-npz", "evaluate --checkpoint {text} {data}", 2,
         "not a readable checkpoint (not an .npz archive"),
    # IDX files.
    case("idx", "dimensions-overflow", "train --data-dir {overflow}", 2, "declares 2147483648x2147483648x4",
         "the header is corrupt"),
    case("idx", "no-test-images", "train --data-dir {dataset}", 2, "holds no images",
         dataset={"test_images": numpy.zeros((0, 28, 28), numpy.uint8)}),
    case("idx", "data-dir-is-a-file", "train --data-dir {text}", 2, "is a file, not a directory"),
    # Flags.
    case("flags", "negative-seed", "train --seed -1 {data}", 2, "seed must be an integer >= 0"),
    case("flags", "hidden-too-large", "train --hidden 100000000 {data}", 2, "GiB of memory available",
         "choose smaller --hidden"),
    case("flags", "lr-rounds-to-zero", "train --lr 1e-300 {data}", 2, "below the smallest normal float32",
         "use a larger lr or float64"),
    case("flags", "momentum-above-1", "train --momentum 2 {data}", 2, "momentum must be in [0, 1)"),
    case("flags", "bench-batch-above-the-epoch", "bench --batch-sizes 1000000000", 2,
         "--batch-sizes 1000000000 is larger than the 50,000-sample epoch", "choose at most 50000"),
    case("flags", "bench-hidden-too-large", "bench --hidden 100000000", 2, "GiB of memory available"),
    case("flags", "zero-threads", "train --threads 0 {data}", 2, "threads must be 'auto' or a whole number >= 1"),
    case("flags", "threads-above-cores", "train --threads 4096 {data}", 2, "threads 4096 is more than the",
         "cores this process may use"),
    case("flags", "divergence-blames-momentum", "train --lr 1e30 --momentum 0.5 --epochs 1 {data}", 2,
         "training diverged in epoch 1", "smaller --lr than 1e+30, or a smaller --momentum", before_work=False),
    # Datasets.
    case("datasets", "label-200", "train --data-dir {dataset}", 2, "holds label 200", "labels are 0 to 9",
         dataset={"labels": numpy.full(10_100, 200, numpy.uint8)}),
    case("datasets", "verify-another-dataset", "data verify --dataset fashion-mnist {data}", 1,
         "are not fashion-mnist", "run `xpnet data download --dataset fashion-mnist` to fetch them"),
]  # fmt: skip


def model_only(directory):
    path = directory / "model.npz"
    xpnet.MLP(xpnet.get_backend("numpy"), [784, 8, 10]).save(path)
    return path


def text_file(directory):
    path = directory / "notes.txt"
    path.write_text("not a checkpoint, not a directory\n")
    return path


def materialise(command, tmp_path, base, data_dir, files):
    """The argument list of a case's command, its files made in tmp_path."""
    makers = {
        "{data}": lambda: ["--data-dir", str(data_dir)],
        "{base}": lambda: [str(base)],
        "{model}": lambda: [str(model_only(tmp_path))],
        "{text}": lambda: [str(text_file(tmp_path))],
        "{overflow}": lambda: [str(overflowing_images(tmp_path / "data"))],
        "{dataset}": lambda: [str(write_dataset(tmp_path / "data", **files.get("dataset", {})))],
        "{edited}": lambda: [str(edited(base, tmp_path, files))],
    }  # fmt: skip
    return [part for word in command.split() for part in (makers[word]() if word in makers else [word])]


@pytest.mark.parametrize("command, code, parts, before_work, files", CASES)
def test_bad_input_is_one_line_that_names_the_fault_and_changes_nothing(
    tmp_path, base_checkpoint, small_data_dir, command, code, parts, before_work, files
):
    args = materialise(command, tmp_path, base_checkpoint, small_data_dir, files)
    before = tree_hashes(tmp_path, small_data_dir, base_checkpoint.parent)
    result, seconds = run_xpnet(args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    assert "pickle" not in lines[0]  # never advise unpickling an untrusted file
    assert tree_hashes(tmp_path, small_data_dir, base_checkpoint.parent) == before
    if before_work:
        assert seconds < FAST, f"refused only after {seconds:.1f} s"


def refused_at_once(args, cwd):
    """The one stderr line of a command that must be refused (exit 2) before any work."""
    result, seconds = run_xpnet(args, cwd)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert seconds < FAST and "Epoch" not in result.stdout
    return lines[0]


@pytest.mark.parametrize("flag", ["--save", "--plot"])
def test_an_empty_output_path_is_refused(small_data_dir, tmp_path, flag):
    line = refused_at_once(["train", flag, "", "--data-dir", str(small_data_dir)], tmp_path)
    assert f"{flag} '' names no file" in line and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("node", ["fifo", "/dev/null"])
def test_a_device_or_fifo_is_never_replaced_by_a_file(small_data_dir, tmp_path, node):
    """Renaming a temporary file over /dev/null (as root) would make it a regular file."""
    if node == "fifo":
        node = tmp_path / "pipe"
        os.mkfifo(node)
    kind = "a FIFO" if node != "/dev/null" else "a character device"
    line = refused_at_once(["train", "--save", str(node), "--data-dir", str(small_data_dir)], tmp_path)
    assert f"--save {node} is {kind}, not a file" in line
    assert not Path(node).is_file() and Path(node).exists()
    with pytest.raises(xpnet.XpnetError, match=f"{node} is {kind}, not a file"):
        xpnet.MLP(xpnet.get_backend("numpy"), [784, 8, 10]).save(node)
    assert not Path(node).is_file()


def test_a_save_through_a_symbolic_link_writes_where_it_points(tmp_path):
    target, link = tmp_path / "real.npz", tmp_path / "link.npz"
    target.write_text("old")
    link.symlink_to(target)
    model = xpnet.MLP(xpnet.get_backend("numpy"), [784, 8, 10])
    model.save(link)
    assert link.is_symlink() and link.resolve() == target
    assert xpnet.load_model(target).sizes == [784, 8, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "real.npz"]


def test_the_data_directory_of_another_dataset_is_refused_from_the_environment(mnist_dir, tmp_path):
    result, seconds = run_xpnet(
        ["train", "--dataset", "fashion-mnist"], tmp_path, env={"XPNET_DATA_DIR": str(mnist_dir)}
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    message = f"{mnist_dir} (XPNET_DATA_DIR) holds mnist, not fashion-mnist: pass --data-dir a directory of"
    assert message in result.stderr and "or unset XPNET_DATA_DIR" in result.stderr and seconds < FAST


def test_resuming_another_datasets_run_from_the_environment_never_offers_a_refused_flag(
    mnist_dir, base_checkpoint, tmp_path
):
    """--resume refuses --dataset, so the advice for a Fashion-MNIST run names what fixed it instead."""
    checkpoint = edited(base_checkpoint, tmp_path, {"metadata": {"dataset": "fashion-mnist"}})
    before = tree_hashes(tmp_path)
    result, seconds = run_xpnet(
        ["train", "--resume", str(checkpoint), "--epochs", "2"], tmp_path, env={"XPNET_DATA_DIR": str(mnist_dir)}
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and seconds < FAST, result.stderr
    assert "holds mnist, not fashion-mnist" in lines[0] and "or unset XPNET_DATA_DIR" in lines[0]
    assert lines[0].endswith(f"({checkpoint} was trained on fashion-mnist)") and "--dataset" not in lines[0]
    assert tree_hashes(tmp_path) == before


def test_plot_without_matplotlib_is_refused_before_training(small_data_dir, tmp_path):
    result, seconds = run_xpnet(
        ["train", "--plot", "curves.png", "--data-dir", str(small_data_dir)],
        tmp_path,
        prelude="sys.modules['matplotlib'] = None",
    )
    assert result.returncode == 2 and "plotting needs matplotlib: pip install 'xpnet[plot]'" in result.stderr
    assert "Epoch" not in result.stdout and seconds < FAST and not (tmp_path / "curves.png").exists()


@pytest.mark.parametrize(
    "command", [["data", "info", "--data-dir"], ["train", "--epochs", "2", "--data-dir"], ["--help"]]
)
def test_a_reader_leaving_the_pipe_ends_the_command_quietly(small_data_dir, tmp_path, command):
    if command[-1] == "--data-dir":
        command = [*command, str(small_data_dir)]
    errors = tmp_path / "stderr.txt"
    shell = f"{shlex.join([sys.executable, '-m', 'xpnet', *command])} 2>{errors} | head -1; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert len(result.stdout.splitlines()) == 1
    assert errors.read_text() == ""  # no BrokenPipeError traceback
    assert result.returncode in (0, 141)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here to stand for a full disk")
@pytest.mark.parametrize("command", [["--help"], ["--version"], ["data", "info", "--data-dir"]])
def test_output_to_a_full_disk_is_one_line_and_a_failure(small_data_dir, command):
    if command[-1] == "--data-dir":
        command = [*command, str(small_data_dir)]
    with open("/dev/full", "w") as full:
        command = [sys.executable, "-m", "xpnet", *command]
        result = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    assert result.returncode == 1
    assert result.stderr == f"xpnet: error: {UNWRITABLE_MESSAGE.format(reason='No space left on device')}\n"


def test_ctrl_c_while_the_cli_still_imports_is_the_same_one_line():
    """Ctrl-C in the command's first fraction of a second lands in an import: made certain here by
    an import hook that raises it when xpnet.cli is looked up, as the `xpnet` script would meet it."""
    hook = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'xpnet.cli': raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from xpnet.__main__ import main\n"
        "sys.exit(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", hook, "train"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "xpnet: interrupted\n")


def test_an_interrupt_a_library_wrapped_is_the_same_one_line():
    """Ctrl-C inside a Python callback of C code comes back as a SystemError caused by it (seen
    with Numba): here the subcommand's import raises that, inside the CLI's handling."""
    hook = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'xpnet.commands.data':\n"
        "            raise SystemError('a callback returned a result with an exception set') from KeyboardInterrupt()\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from xpnet.__main__ import main\n"
        "sys.exit(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", hook, "data", "info"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "xpnet: interrupted\n")


def test_a_script_beside_the_clone_imports_the_package_not_the_clone(tmp_path):
    """The folder that holds a clone has a folder named xpnet in it, without __init__.py: a
    namespace package to Python, found first on a script's path. The src layout puts the real
    package on the path as a regular package, which wins."""
    clone = tmp_path / "xpnet"
    (clone / "tests").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    code = "import xpnet; print(xpnet.load_dataset.__name__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "load_dataset", result.stderr


def test_import_xpnet_loads_nothing_until_a_name_is_used():
    code = "import sys, xpnet; print('numpy' in sys.modules, xpnet.TrainConfig().epochs, 'numpy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "20", "True"]


def test_bare_xpnet_lists_its_commands_and_version_works():
    result = subprocess.run([sys.executable, "-m", "xpnet"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("train", "evaluate", "predict", "bench", "verify", "data"):
        assert f"    {command} " in result.stdout
    version = subprocess.run([sys.executable, "-m", "xpnet", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"xpnet {xpnet.__version__}"


def test_every_help_line_with_a_default_shows_it():
    result = subprocess.run([sys.executable, "-m", "xpnet", "train", "--help"], capture_output=True, text=True)
    text = " ".join(result.stdout.split())
    for flag, default in [
        ("--epochs", "20"),
        ("--batch-size", "512"),
        ("--seed", "0"),
        ("--hidden", "200"),
        ("--momentum", "0"),
        ("--dtype", "float32"),
        ("--schedule", "constant"),
    ]:
        assert f"(default: {default})" in text.split(flag, 2)[2].split(" --", 1)[0], flag


def test_evaluate_keeps_its_table_whole_in_a_pipe(base_checkpoint, small_data_dir, tmp_path):
    result, _ = run_xpnet(
        ["evaluate", "--checkpoint", str(base_checkpoint), "--data-dir", str(small_data_dir)], tmp_path
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 10 and all(line.rstrip().endswith("│") for line in rows)  # no row wrapped or cut


GZIP_BOMB_GIB = 1


def gzip_bomb(path):
    """A valid MNIST image header and payload, then 1 GiB of zeros: 1 MB on disk."""
    header = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 60_000, 28, 28)
    compressor = zlib.compressobj(9, wbits=31)
    zeros = bytes(1 << 24)
    with open(path, "wb") as f:
        f.write(compressor.compress(header + bytes(60_000 * 28 * 28)))
        for _ in range(GZIP_BOMB_GIB * 64):
            f.write(compressor.compress(zeros))
        f.write(compressor.flush())
    return path


MEASURE_PEAK = """
import resource, sys
from xpnet.data.idx import IMAGES_MAGIC, content_sha256, read_idx
from xpnet.errors import DataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_idx(sys.argv[1], IMAGES_MAGIC)
    print("read", end=" ")
except DataError as exc:
    print("refused:", exc, end=" ")
content_sha256(sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.slow  # 10 s: inflating and hashing a gigabyte
def test_a_gzip_bomb_is_refused_at_its_first_byte_too_many_in_bounded_memory(tmp_path):
    path = gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz")
    assert path.stat().st_size < 5 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    verdict, growth_mib = result.stdout.rsplit(" ", 1)
    assert "refused:" in verdict and "more bytes than its dimensions 60000x28x28 declare" in verdict
    # The declared payload is 45 MiB; the content inflates to over 1 GiB.
    assert int(growth_mib) < 150, f"peak memory grew by {growth_mib} MiB"
