"""The IDX file format of MNIST, gzip-compressed or raw.

Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension; the payload follows. Images are 0x00000803 (2051: ubyte, 3
dimensions), labels 0x00000801 (2049: ubyte, 1 dimension).
"""

import contextlib
import gzip
import hashlib
import math
import os
import struct
import zlib

import numpy

from xpnet.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UBYTE = 0x08


CHUNK = 1 << 20
# Far above any dataset xpnet trains on (MNIST's largest file holds 47 MB), far below what
# would exhaust this kind of machine: a header declaring more is refused before reading on.
MAX_PAYLOAD = 1 << 31


@contextlib.contextmanager
def opened(path):
    """The file's content as a stream, decompressed when it is named .gz; every fault of
    opening or reading it (a bad gzip stream included) is a DataError naming the file."""
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the file is empty; delete it and download again")
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as stream:
            yield stream
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory, not an IDX file") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc}); delete it and download again") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def read_idx(path, expected_magic):
    """An IDX file as a uint8 array. The header is read first and checked (magic number,
    dimensions), then exactly the payload it declares, and one byte more must not exist: so
    memory stays bounded by the declared size whatever the file inflates to."""
    with opened(path) as stream:
        header = stream.read(4)
        if len(header) < 4:
            raise DataError(
                f"{path}: too short for an IDX header ({len(header)} bytes); the file is empty or truncated"
            )
        (magic,) = struct.unpack(">I", header)
        if magic != expected_magic:
            raise DataError(
                f"{path}: wrong magic number {magic} (expected {expected_magic}); not an IDX "
                f"{'image' if expected_magic == IMAGES_MAGIC else 'label'} file"
            )
        ndim = magic & 0xFF
        dims = stream.read(4 * ndim)
        if len(dims) < 4 * ndim:
            raise DataError(f"{path}: IDX header truncated ({4 + len(dims)} of {4 + 4 * ndim} bytes)")
        shape = struct.unpack(f">{ndim}I", dims)
        size = math.prod(shape)  # a Python int: dimensions of 2^31 each cannot overflow it
        if size > MAX_PAYLOAD:
            raise DataError(
                f"{path}: its header declares {'x'.join(map(str, shape))} = {size:,} bytes, more than the "
                f"{MAX_PAYLOAD:,} xpnet reads; the header is corrupt"
            )
        payload = numpy.empty(size, numpy.uint8)
        received = 0
        while received < size and (n := stream.readinto(memoryview(payload)[received : received + CHUNK])):
            received += n
        if received < size:
            raise DataError(
                f"{path}: payload of {received} bytes is shorter than its dimensions "
                f"{'x'.join(map(str, shape))} declare ({size} bytes); the file is truncated"
            )
        if stream.read(1):
            raise DataError(
                f"{path}: more bytes than its dimensions {'x'.join(map(str, shape))} declare; the file is corrupt"
            )
    return payload.reshape(shape)


def content_sha256(path):
    """SHA-256 of the file's (decompressed) content, read in chunks: memory stays bounded."""
    digest = hashlib.sha256()
    with opened(path) as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def encode_idx(array):
    """The IDX bytes of a uint8 array (what read_idx reads)."""
    array = numpy.ascontiguousarray(array, dtype=numpy.uint8)
    header = struct.pack(">BBBB", 0, 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path, array):
    """Write array as IDX, gzip-compressed when path ends in .gz (for tests and tools)."""
    content = encode_idx(array)
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(content)
