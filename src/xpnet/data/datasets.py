"""The datasets xpnet knows: where to fetch each file, and the SHA-256 that decides whether a
file is right. The rule is the hash of the *decompressed* content, so a file recompressed
elsewhere (the Debian package's, or ../shared/mnist's train-images) is still accepted; the
published .gz hash, where known, only spares decompressing a file that matches it byte for byte.
"""

from dataclasses import dataclass

from xpnet.errors import DataError

# The four IDX files of every dataset here, in this order: training images and labels, test images and labels.
FILE_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@dataclass(frozen=True)
class DatasetFile:
    name: str  # e.g. "train-images-idx3-ubyte"; fetched and stored as name + ".gz"
    sha256: str  # of the decompressed content
    gz_sha256: str = ""  # of the published .gz, where known


@dataclass(frozen=True)
class Dataset:
    name: str
    mirrors: tuple  # base URLs, tried in order
    files: tuple  # four DatasetFile, in the order of FILE_NAMES
    system_dirs: tuple = ()  # directories a system package may have installed it in
    classes: int = 10  # labels are 0 .. classes - 1


DATASETS = {
    "mnist": Dataset(
        "mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        files=(
            DatasetFile(
                FILE_NAMES[0],
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            DatasetFile(
                FILE_NAMES[1],
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            DatasetFile(
                FILE_NAMES[2],
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            DatasetFile(
                FILE_NAMES[3],
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
    ),
    "fashion-mnist": Dataset(
        "fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=(
            DatasetFile(FILE_NAMES[0], "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
            DatasetFile(FILE_NAMES[1], "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
            DatasetFile(FILE_NAMES[2], "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
            DatasetFile(FILE_NAMES[3], "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),  # Debian's dataset-fashion-mnist
    ),
}


def get_dataset(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]
