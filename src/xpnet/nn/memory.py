"""Whether a run's arrays fit in memory, checked before any of them is allocated."""

import numpy

from xpnet.errors import ConfigError


def available_memory():
    """Bytes of memory the system could give this process now (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(backend, sizes, config, n_images):
    """Refuse, before allocating any of it, a run whose arrays cannot fit in the host's memory:
    weights, gradients and velocities, the normalised images (and a deformed copy of the training
    images with --augment), a batch's activations, and the
    float64 draw of the largest weight matrix at initialisation. (A GPU's memory is its own.)"""
    available = available_memory()
    if backend.xp is not numpy or available is None:
        return
    itemsize = numpy.dtype(config.dtype).itemsize
    weights = sum(n_in * n_out + n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    copies = 3 if config.momentum else 2
    batch = min(config.batch_size, n_images)
    images = 3 if config.augment != "none" else 2  # deformations train on an epoch's deformed copy
    needed = itemsize * (copies * weights + images * n_images * sizes[0] + 4 * batch * sum(sizes))
    needed += 8 * max(n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    if needed > available:
        raise ConfigError(
            f"{'-'.join(map(str, sizes))} at batch {config.batch_size} in {config.dtype} needs about "
            f"{needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB of memory available; "
            "choose smaller --hidden or --batch-size"
        )
