"""How the compiled loop's two threads keep in step (numba_steps.py): a spin barrier on an
atomic counter, which a thread leaves early where the other has given up the call. Compiled
into the loop, so this file is in the loop's cache key, as the kernels' files are.
"""

import ctypes
import sys

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from xpnet.backends.numba_kernels import kernel


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


# A wait at the barrier spins this many rounds (0.09 ms on a 2-core machine) before it yields
# the core each round: with a core each, a wait is microseconds; yielding after a microsecond lost
# a third of the speed at batch 128, and never yielding would starve a thread left without a core.
SPIN_ROUNDS = 1_000_000
# sync[0] counts the barrier's arrivals; sync[1] holds GAVE_UP once a thread has left the call.
ARRIVALS, STATE, GAVE_UP = 0, 1, 1


@kernel
def barrier(sync, threads, generation, yield_cpu):
    """Wait until each of `threads` threads has called this `generation` times; False, at once,
    if a thread has given the call up (sync[STATE])."""
    atomic_add(sync, ARRIVALS, 1)
    rounds = 0
    while atomic_load(sync, ARRIVALS) < threads * generation:
        if atomic_load(sync, STATE) == GAVE_UP:
            return False
        rounds += 1
        if rounds > SPIN_ROUNDS:
            yield_cpu()
    return True
