"""How the compiled loop's two threads keep in step (xpnet/backends/numba_steps.py): atomic
operations on an int64 array, a spin barrier, and the word through which a waiting thread is
handed more steps. Compiled into the loop, so numba_steps puts a digest of this file into the
loop's cache key (_loop_over), as it does for the kernels of numba_backend.py.
"""

import ctypes
import sys

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from xpnet.backends.numba_backend import kernel


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value as one atomic step (sequentially consistent: a full fence)."""

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", _element_pointer(context, builder, signature, args), args[2], "seq_cst")

    return types.int64(array, index, value), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index], read afresh from memory on every call (an acquire load)."""

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_element_pointer(context, builder, signature, args), "acquire", 8)

    return types.int64(array, index), codegen


@intrinsic
def compare_and_swap(typingctx, array, index, expected, value):
    """Whether array[index] held expected, and then value in its place, as one atomic step."""

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, signature, args)
        old, new = (context.cast(builder, args[i], signature.args[i], types.int64) for i in (2, 3))
        return builder.extract_value(builder.cmpxchg(pointer, old, new, "seq_cst", "seq_cst"), 1)

    return types.boolean(array, index, expected, value), codegen


def _element_pointer(context, builder, signature, args):
    array = context.make_array(signature.args[0])(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, signature.args[0], array, [args[1]])


def sched_yield():
    """How a waiting thread gives up its core, typed for ctypes: libc's sched_yield, or Windows'
    SwitchToThread (there is no libc to open there)."""
    if sys.platform == "win32":
        routine = ctypes.WinDLL("kernel32").SwitchToThread
    else:
        routine = ctypes.CDLL(None).sched_yield
    routine.argtypes, routine.restype = [], ctypes.c_int
    return routine


# A wait at the barrier spins this many rounds (0.09 ms on the 2-core machine) before it yields
# the core each round: with a core each, a wait is microseconds; yielding after a microsecond lost
# a third of the speed at batch 128, and never yielding would starve a thread left without a core.
SPIN_ROUNDS = 1_000_000


@kernel
def barrier(sync, threads, generation, yield_cpu):
    """Wait until each of `threads` threads has called this `generation` times (sync[0] counts
    the calls)."""
    atomic_add(sync, 0, 1)
    rounds = 0
    while atomic_load(sync, 0) < threads * generation:
        rounds += 1
        if rounds > SPIN_ROUNDS:
            yield_cpu()


# sync[1] once the second thread has gone back to Python: no more steps may be posted to it.
LEFT = -1
# How long the second thread waits for more steps: SPIN_ROUNDS reads (0.1 ms on the 2-core
# machine: the trainer's Python between two calls, 50 us, fits in it), then as many reads with
# the core yielded after each (4 ms where nothing else wants the core; where something does,
# it runs meanwhile), for a pause of the caller's (a garbage collection, say).
WAIT_ROUNDS = 10_000


@kernel
def posted_after(sync, end, yield_cpu):
    """The end of the steps posted after `end` (sync[1], moved on by move_end), as the second
    thread waits for them; LEFT, marked in sync[1], if none came."""
    for rounds in range(SPIN_ROUNDS + WAIT_ROUNDS):
        posted = atomic_load(sync, 1)
        if posted != end:
            return posted
        if rounds >= SPIN_ROUNDS:
            yield_cpu()
    if compare_and_swap(sync, 1, end, LEFT):
        return LEFT
    return atomic_load(sync, 1)


@kernel
def move_end(sync, end, new_end):
    """Whether sync[1] held end, now new_end: the steps to new_end posted to the second thread
    waiting after step end - 1 (posted_after), or LEFT to send it away; False once it has left."""
    return compare_and_swap(sync, 1, end, new_end)
