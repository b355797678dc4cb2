"""The IDX file format of MNIST, gzip-compressed or raw.

Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one
big-endian uint32 per dimension; the payload follows. Images are 0x00000803 (2051: ubyte, 3
dimensions), labels 0x00000801 (2049: ubyte, 1 dimension).
"""

import gzip
import os
import struct
import zlib

import numpy

from xpnet.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_UBYTE = 0x08


def read_bytes(path):
    """The file's content, decompressed when it is named .gz."""
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: the file is empty; delete it and download again")
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a valid gzip file ({exc}); delete it and download again") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def parse_idx(content, path, expected_magic):
    """An IDX byte string as a uint8 array, checking magic, dimensions and payload length."""
    if len(content) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(content)} bytes); the file is empty or truncated")
    (magic,) = struct.unpack(">I", content[:4])
    if magic != expected_magic:
        raise DataError(
            f"{path}: wrong magic number {magic} (expected {expected_magic}); not an IDX "
            f"{'image' if expected_magic == IMAGES_MAGIC else 'label'} file"
        )
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(content) < header_size:
        raise DataError(f"{path}: IDX header truncated ({len(content)} of {header_size} bytes)")
    shape = struct.unpack(f">{ndim}I", content[4:header_size])
    expected = header_size + int(numpy.prod(shape))
    if len(content) != expected:
        raise DataError(
            f"{path}: payload length {len(content) - header_size} bytes does not match "
            f"dimensions {'x'.join(map(str, shape))} ({expected - header_size} bytes); the file is truncated or corrupt"
        )
    return numpy.frombuffer(content, dtype=numpy.uint8, offset=header_size).reshape(shape)


def read_idx(path, expected_magic):
    return parse_idx(read_bytes(path), path, expected_magic)


def encode_idx(array):
    """The IDX bytes of a uint8 array (the inverse of parse_idx)."""
    array = numpy.ascontiguousarray(array, dtype=numpy.uint8)
    header = struct.pack(">BBBB", 0, 0, _UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_idx(path, array):
    """Write array as IDX, gzip-compressed when path ends in .gz (for tests and tools)."""
    content = encode_idx(array)
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(content)
