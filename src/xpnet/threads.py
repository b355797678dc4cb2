"""How many threads BLAS may use, chosen by measurement while training (--threads auto).

Two processes that each run OpenBLAS with a thread per core slow each other several times over,
their threads spinning for cores the other holds. Auto counts the cores other processes keep
busy (/proc/stat against this process's own CPU time) during the first steps of every epoch, and
again after a chunk that ran twice as slowly, and gives BLAS the rest, at least one (set with
threadpoolctl on every BLAS library loaded). Its cost: OpenBLAS rounds differently at different
thread counts, so runs it steered differently part ways in the last bits. Why, and what was
measured: docs/design.md, "Threads".
"""

import contextlib
import os
import time

from threadpoolctl import ThreadpoolController, threadpool_limits

from xpnet.errors import ConfigError

AUTO = "auto"
# Under threads "auto", a chunk of steps this many times slower per step than the first chunk
# after the last check of the load has the load re-checked. The check at each epoch's start
# does not see load that arrives later in the epoch: on a 16-core machine with the test suite
# starting beside it, a first epoch that kept its 8 threads ran 15x slower than the later ones.
RECHECK_SLOWDOWN = 2.0


def usable_cores():
    """The cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_threads(threads):
    """None (BLAS's own count), 'auto' or a count from 1 to the usable cores (an int or its text),
    as None, 'auto' or an int. More threads than cores is refused, not trimmed: OpenBLAS's
    threads busy-wait for each other, so one left without a core stalls every product (measured:
    3 threads on the 2-core machine trained 100 times slower than 2)."""
    if threads is None or threads == AUTO:
        return threads
    try:
        count = int(threads)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or str(threads).strip() != str(count):
        raise ConfigError(f"threads must be 'auto' or a whole number >= 1, got {threads!r}")
    cores = usable_cores()
    if count > cores:
        raise ConfigError(
            f"threads {count} is more than the {cores} cores this process may use, and BLAS threads "
            f"without a core stall every product; give 1 to {cores}, or auto"
        )
    return count


def blas_controller():
    """A handle on the BLAS libraries loaded now, for blas_threads: finding them is what a limit
    costs (1.2-1.9 ms with numba, torch and jax loaded, on the 2-core machine), and through a
    handle made once a limit takes 7 us. It does not see libraries loaded after it was made."""
    return ThreadpoolController()


@contextlib.contextmanager
def blas_threads(count, controller=None):
    """BLAS limited to count threads inside the block (None: no limit), through controller (from
    blas_controller) when given, else on every BLAS library loaded at the call."""
    if count is None:
        yield
    else:
        with (
            threadpool_limits(limits=count, user_api="blas")
            if controller is None
            else controller.limit(limits=count, user_api="blas")
        ):
            yield


def busy_cpu_seconds():
    """CPU seconds every process on the machine has spent busy so far, or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, stat.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    times = os.times()
    return times.user + times.system


def threads_left(run, chunk, most, current, seconds=0.1, limit=blas_threads):
    """Run chunks of steps (run(chunk), at most `most` of them) under limit(current), BLAS's
    limit for a count of `current` threads, for at least `seconds`, measuring the cores other
    processes kept busy meanwhile; returns (the threads to use: the usable cores nobody else
    used, at least 1; those other cores)."""
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    with limit(current):
        for _ in range(most):
            run(chunk)
            if time.perf_counter() - start >= seconds:
                break
    if busy is None:
        return current, 0.0
    wall = time.perf_counter() - start
    others = max(0.0, (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)) / wall
    cores = usable_cores()
    return max(1, min(cores, round(cores - others))), others


class ThreadPolicy:
    """A trainer's threads, epoch by epoch: threads is None (BLAS's own count), a count, or AUTO.
    controller is blas_controller()'s handle on the host's BLAS (None for a GPU backend: no
    limit is set); blas_threads maps the trainer's count to BLAS's limit (a compiled loop with
    threads of its own wants BLAS on one)."""

    def __init__(self, threads, controller, blas_threads=None):
        self.threads = check_threads(threads)
        self.count = usable_cores() if self.threads == AUTO else self.threads  # the count in use
        self.controller = controller
        self.blas_threads = blas_threads or (lambda count: count)

    def limit(self, count=None):
        """BLAS's limit for a block run at `count` threads (the count in use when None)."""
        if self.controller is None:
            return blas_threads(None)
        return blas_threads(self.blas_threads(self.count if count is None else count), self.controller)

    def run_epoch(self, run, steps_left, chunk_steps):
        """The rest of an epoch: run(n) takes its next n steps; steps_left() and chunk_steps() say
        how many are left and how many a chunk takes. Under AUTO with host BLAS, the load is checked
        (threads_left, whose chunks are training steps like the others) at the start and again
        after any chunk RECHECK_SLOWDOWN times slower per step than the first chunk after the last
        check, while more than five chunks are left; otherwise one limit holds for the epoch."""
        if self.threads != AUTO or self.controller is None:
            with self.limit():
                run(steps_left())
            return
        while True:
            left, chunk = steps_left(), chunk_steps()
            if left > 5 * chunk:
                # As long as 0.1 s, all but the last chunk at most: /proc/stat counts in 10 ms
                # ticks, and a quarter of a 100 ms epoch misread the load (one thread chosen,
                # alone, in two epochs of seven at batch 2048 on a 2-core machine).
                self.count, _ = threads_left(run, chunk, -(-left // chunk) - 1, self.count, limit=self.limit)
            # One limit for all the chunks until the next check: OpenBLAS set back to more threads
            # after each chunk cost the next one (measured: 17% of an epoch at batch 512).
            with self.limit():
                if self._run_while_steady(run, steps_left, chunk_steps):
                    return

    @staticmethod
    def _run_while_steady(run, steps_left, chunk_steps):
        """Chunks of steps until the epoch is done (True) or one runs RECHECK_SLOWDOWN times
        slower per step than the first (False)."""
        steady = None  # seconds a step in the first chunk
        while True:
            left = steps_left()
            n = min(chunk_steps(), left)
            start = time.perf_counter()
            run(n)
            if n == left:
                return True
            seconds = (time.perf_counter() - start) / n
            steady = seconds if steady is None else steady
            if seconds > RECHECK_SLOWDOWN * steady:
                return False
