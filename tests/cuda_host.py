"""CuPy's kernel API on the CPU, so that the CuPy backend's own CUDA code runs where no GPU is.

CupyBackend takes everything from its ``xp``: the array functions, ``RawModule`` and
``ElementwiseKernel``. ``EMULATED_CUPY`` is such an ``xp``: NumPy for the arrays, and those two
classes compiling the backend's CUDA C++ with the host's C++ compiler and running each launch
block by block. A module without ``__syncthreads`` runs each block's threads one after another,
which is exact where threads neither share memory nor wait for each other: no thread's result
depends on the others' order. A module with it runs a block's threads as coroutines (ucontext),
each up to its next barrier in turn, with ``__shared__`` memory common to the block: a thread
that reads another's slot without a barrier between reads what was there before (zeros at a
module's first launch, the last block's values after), and a barrier that some threads skip (an
early return) is reported, where the GPU would hang. Threads run in thread order, or in reverse
(RawModule's reverse_threads), so a read that races a write is caught in one order or the other.

A launch also checks what a GPU would not report: each argument's C type against the kernel's
parameter (a float64 array for a float*, a Python int for an int: CuPy would pass 8 bytes),
that arrays are contiguous (a kernel indexes them linearly), and that nothing is written
outside an argument (each array runs between guard bytes that must come back intact).

What it cannot show, and only a GPU run can: cuBLAS's products (NumPy's stand in), nvcc's
code (it fuses a*b+c into one rounding; g++ for x86-64 does not), CuPy's own marshalling and
broadcasting (mirrored here from its documentation), streams, device memory, and speed.
"""

import contextlib
import ctypes
import functools
import shutil
import subprocess
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import numpy

from xpnet.backends.cupy_backend import CupyBackend
from xpnet.backends.cupy_graphs import GraphSteps

CXX = shutil.which("g++") or shutil.which("c++")

# Declares what CUDA provides, and `launch`, which runs a kernel over every (block, thread).
SHIM = r"""
#include <cmath>
#include <cstdio>
#include <type_traits>
#include <utility>
#define __global__
#define __device__
struct dim3 { unsigned x, y, z; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
using std::exp;  // CUDA's float overloads, as in device code
using std::tanh;
using std::log;
using std::nan;

template <typename... A, std::size_t... I>
static void run_thread(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(args[I])...);  // args as cuLaunchKernel takes them: one pointer per argument
}

static char fault[256];  // why the last launch went wrong, "" if it did not
extern "C" const char* xpnet_fault() { return fault; }

#ifndef XPNET_BLOCKS
template <typename... A>
static void launch(void (*kernel)(A...), unsigned grid, unsigned block, void** args, int) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    fault[0] = 0;
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            run_thread(kernel, args, std::index_sequence_for<A...>{});
        }
    }
}
#else
// A block's threads as coroutines: each runs until its next __syncthreads() or its end, in
// thread order (or its reverse), and the next phase starts once every thread has; so a thread
// reads what the others wrote before the barrier, and, without it, what they had not yet written.
#include <functional>
#include <memory>
#include <ucontext.h>
#include <vector>
#define __shared__ static  // one copy, shared by the block's coroutines (blocks run one at a time)
struct Fiber { ucontext_t context; bool done; };
static ucontext_t scheduler;
static Fiber* running;
static std::function<void()> thread_body;
static void fiber_main() { thread_body(); running->done = true; }  // then uc_link: the scheduler
static void __syncthreads() { swapcontext(&running->context, &scheduler); }

template <typename... A>
static void launch(void (*kernel)(A...), unsigned grid, unsigned block, void** args, int reverse) {
    const std::size_t stack = 1 << 16;
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    fault[0] = 0;
    thread_body = [&] { run_thread(kernel, args, std::index_sequence_for<A...>{}); };
    static std::unique_ptr<char[]> stacks;  // kept between launches: allocated, not cleared, once
    static std::size_t stacks_size = 0;
    if (stacks_size < block * stack) stacks.reset(new char[stacks_size = block * stack]);
    std::vector<Fiber> fibers(block);
    for (unsigned b = 0; b < grid && !fault[0]; ++b) {
        blockIdx = {b, 0, 0};
        for (unsigned t = 0; t < block; ++t) {
            Fiber& fiber = fibers[t];
            fiber.done = false;
            getcontext(&fiber.context);
            fiber.context.uc_stack.ss_sp = &stacks[t * stack];
            fiber.context.uc_stack.ss_size = stack;
            fiber.context.uc_link = &scheduler;
            makecontext(&fiber.context, fiber_main, 0);
        }
        for (unsigned phase = 0;; ++phase) {
            unsigned waiting = 0, done = 0;
            for (unsigned n = 0; n < block; ++n) {
                unsigned t = reverse ? block - 1 - n : n;
                if (fibers[t].done) { ++done; continue; }
                running = &fibers[t];
                threadIdx = {t, 0, 0};
                swapcontext(&scheduler, &fibers[t].context);
                ++(fibers[t].done ? done : waiting);
            }
            if (waiting == 0) break;
            if (done) {  // on a GPU the waiting threads would hang, or go on with stale memory
                std::snprintf(fault, sizeof fault, "block %u: %u threads ended while %u waited at barrier %u",
                              b, done, waiting, phase + 1);
                for (unsigned t = 0; t < block; ++t) {  // finish the waiting ones: their stacks are freed next
                    while (!fibers[t].done) { running = &fibers[t]; swapcontext(&scheduler, &fibers[t].context); }
                }
                break;
            }
        }
    }
}
#endif

// A parameter as "[*][c]<kind><bytes>,": pointer, const pointee, kind f(loat) i(nteger) b(ool).
template <typename A>
static int describe(char* out) {
    using P = typename std::remove_pointer<A>::type;
    using V = typename std::remove_const<P>::type;
    char kind = std::is_same<V, bool>::value             ? 'b'
                : std::is_floating_point<V>::value       ? 'f'
                : std::is_integral<V>::value             ? 'i'
                                                         : '?';
    return std::sprintf(out, "%s%s%c%d,", std::is_pointer<A>::value ? "*" : "",
                        std::is_const<P>::value ? "c" : "", kind, (int)sizeof(V));
}

template <typename... A>
static const char* signature(void (*)(A...)) {
    static char text[1024];
    char* end = text;
    int in_order[] = {0, (end += describe<A>(end), 0)...};
    (void)in_order;
    *end = 0;
    return text;
}
"""

ENTRY = """
extern "C" void xpnet_launch_{k}(unsigned grid, unsigned block, void** args, int reverse) {{
    launch(&{expr}, grid, block, args, reverse);
}}
extern "C" const char* xpnet_signature_{k}() {{ return signature(&{expr}); }}
"""

KINDS = {"f": "f", "i": "i", "u": "i", "b": "b"}  # NumPy dtype kind -> the shim's kind
C_TYPES = {
    "float": numpy.float32,
    "double": numpy.float64,
    "bool": numpy.bool_,
    "int": numpy.int32,
    "long long": numpy.int64,
}
C_NAMES = {(KINDS[numpy.dtype(t).kind], numpy.dtype(t).itemsize): name for name, t in C_TYPES.items()}
# An ElementwiseKernel parameter's type, named as NumPy names it (CuPy's way), as a C type.
ELEMENTWISE_C_TYPES = {"bool": "bool", "int32": "int"}


@functools.cache
def _build_dir():
    return tempfile.TemporaryDirectory(prefix="xpnet-cuda-host-")  # removed when the process ends


@functools.cache
def _compile(source, std):
    directory = Path(_build_dir().name)
    stem = f"module{len(list(directory.glob('*.so')))}"
    (directory / f"{stem}.cpp").write_text(source)
    # -fno-gnu-unique: a template's static locals (__shared__ arrays here) stay each module's own,
    # not one copy for every module that instantiates the same kernel (a mutated copy included).
    command = [CXX, f"-std={std}", "-O2", "-fno-gnu-unique", "-shared", "-fPIC", f"{stem}.cpp", "-o", f"{stem}.so"]
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the host compiler refused the kernel source:\n{result.stderr}")
    return ctypes.CDLL(str(directory / f"{stem}.so"))


@dataclass(frozen=True)
class Param:
    pointer: bool
    const: bool
    kind: str
    size: int

    @classmethod
    def parse(cls, text):
        pointer, text = text.startswith("*"), text.lstrip("*")
        const, text = text.startswith("c"), text.lstrip("c")
        return cls(pointer, const, text[0], int(text[1:]))

    def accepts(self, arg):
        if self.pointer:
            is_right_kind = isinstance(arg, numpy.ndarray) and arg.flags.c_contiguous
        else:
            is_right_kind = isinstance(arg, numpy.generic)  # CuPy passes a Python int as 8 bytes
        return is_right_kind and KINDS.get(arg.dtype.kind) == self.kind and arg.dtype.itemsize == self.size

    def __str__(self):
        c_name = C_NAMES.get((self.kind, self.size), f"{self.kind}{self.size * 8}")
        return f"{'const ' if self.const else ''}{c_name}{'*' if self.pointer else ''}"


def describe(arg):
    if isinstance(arg, numpy.ndarray):
        return f"{'' if arg.flags.c_contiguous else 'non-contiguous '}{arg.dtype} array"
    return f"{arg.dtype} scalar" if isinstance(arg, numpy.generic) else f"Python {type(arg).__name__}"


class Guarded:
    """An array's bytes copied between guard bands, for a kernel to work on and be checked.

    An integer array's bands are 0xFF bytes: a stray read gets the index -1, which stays near the
    array instead of sending the next access anywhere in memory. A float array's bands are bytes
    of its own (`byte`, which the launch makes differ between arguments): a stray read gets a
    NaN or a huge finite number, and a value made from it and written into another array's band
    changes that band. A stray read is not itself caught, nor a stray write of a stray read of
    the same array."""

    def __init__(self, array, byte=0xFF):
        self.array = array
        self.guard = max(4096, -(-array.nbytes // 64) * 64)  # past any thread's stray index here
        self.pattern = numpy.full(2 * self.guard, byte if array.dtype.kind == "f" else 0xFF, numpy.uint8)
        self.buffer = numpy.concatenate([self.pattern[: self.guard], self._bytes(), self.pattern[self.guard :]])
        self.address = ctypes.c_void_p(self.buffer.ctypes.data + self.guard)
        self.written = False

    def finish(self, where):
        guards = numpy.concatenate([self.buffer[: self.guard], self.buffer[-self.guard :]])
        if not numpy.array_equal(guards, self.pattern):
            raise AssertionError(f"{where} wrote outside the argument's {self.array.nbytes} bytes")
        if self.written:
            self._bytes()[:] = self.buffer[self.guard : -self.guard]

    def _bytes(self):
        return numpy.asarray(self.array).reshape(-1).view(numpy.uint8)  # a plain view: no host reads counted


class RawKernel:
    """A kernel of a RawModule, called as CuPy's are: kernel(grid, block, args)."""

    def __init__(self, library, index, name, reverse_threads=False):
        self.name, self.reverse_threads = name, reverse_threads
        self._launch = getattr(library, f"xpnet_launch_{index}")
        self._launch.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        self._launch.restype = None
        self._fault = library.xpnet_fault
        self._fault.restype = ctypes.c_char_p
        signature = getattr(library, f"xpnet_signature_{index}")
        signature.restype = ctypes.c_char_p
        self.params = [Param.parse(p) for p in signature().decode().split(",") if p]

    def __call__(self, grid, block, args):
        (grid,), (block,) = grid, block  # xpnet launches 1-D grids only
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        slots, guarded = [], {}
        for position, (arg, param) in enumerate(zip(args, self.params), 1):
            where = f"argument {position} of {self.name}"
            if not param.accepts(arg):
                raise TypeError(f"{where}: {describe(arg)} passed for parameter type {param}")
            if not param.pointer:
                slots.append(numpy.array(arg))  # the value, at an address the kernel reads it from
                continue
            same = next((p for p, g in guarded.items() if g.array is arg), None)  # an argument passed twice
            if same is None:
                if any(numpy.shares_memory(arg, g.array) for g in guarded.values()):
                    raise NotImplementedError(f"{where} overlaps another argument without being it")
                same, guarded[position] = position, Guarded(arg, byte=0xFF - position)
            guarded[same].written |= not param.const
            slots.append(guarded[same].address)
        addresses = [ctypes.addressof(s) if isinstance(s, ctypes.c_void_p) else s.ctypes.data for s in slots]
        self._launch(grid, block, (ctypes.c_void_p * len(slots))(*addresses), int(self.reverse_threads))
        for position, g in guarded.items():
            g.finish(f"{self.name} (grid {grid} x block {block}), argument {position},")
        fault = self._fault().decode()
        if fault:
            raise AssertionError(f"{self.name} (grid {grid} x block {block}): {fault}")


class RawModule:
    """cupy.RawModule: the code compiled for the host, its kernels named by name_expressions.
    reverse_threads (not CuPy's) runs each phase of a block's threads from the last to the first:
    a thread that reads what a lower thread writes, with no barrier between, then reads it stale."""

    def __init__(self, code, options=(), name_expressions=(), reverse_threads=False):
        std = next((o.split("=", 1)[1] for o in options if o.startswith("--std=")), "c++17")  # NVRTC's default
        entries = "".join(ENTRY.format(k=k, expr=expr) for k, expr in enumerate(name_expressions))
        blocks = "#define XPNET_BLOCKS\n" if "__syncthreads" in code else ""  # its threads as coroutines
        self._library = _compile(blocks + SHIM + code + entries, std)
        self._index = {expr: k for k, expr in enumerate(name_expressions)}
        self.reverse_threads = reverse_threads

    def get_function(self, name):
        return RawKernel(self._library, self._index[name], name, self.reverse_threads)


def parse_params(params):
    """'T b, int32 activation' -> [('T', 'b'), ('int32', 'activation')]."""
    return [tuple(p.split()) for p in params.split(",")]


def elementwise_as_cuda(name, spec, c_type, preamble=""):
    """An ElementwiseKernel spec as a plain CUDA kernel over n elements, after its preamble,
    declaring its parameters as CuPy's generated code does: inputs const, outputs writable references."""
    inputs, outputs, body = spec
    arguments, declarations = [], []
    for const, params in (("const ", inputs), ("", outputs)):
        for type_name, var in parse_params(params):
            param_type = c_type if type_name == "T" else ELEMENTWISE_C_TYPES[type_name]
            arguments.append(f"{const}{param_type}* {var}_")
            declarations.append(f"{const}{param_type}& {var} = {var}_[i];")
    return preamble + (
        f"__global__ void {name}({', '.join(arguments)}, int n) {{\n"
        f"  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i >= n) return;\n"
        f"  typedef {c_type} T;\n  " + "\n  ".join(declarations) + f"\n  {body};  // CuPy adds the semicolon\n}}\n"
    )


@functools.cache
def _elementwise_kernel(name, spec, c_type, preamble):
    """The kernel for one ElementwiseKernel and one type T, compiled once."""
    return RawModule(elementwise_as_cuda(name, spec, c_type, preamble), name_expressions=[name]).get_function(name)


class ElementwiseKernel:
    """cupy.ElementwiseKernel for calls that pass every output, each already of the broadcast
    shape (as xpnet's do): T is bound by the arrays' dtype, inputs and scalars broadcast."""

    def __init__(self, in_params, out_params, operation, name, preamble=""):
        self.spec, self.name, self.preamble = (in_params, out_params, operation), name, preamble
        inputs = parse_params(in_params)
        self.params, self.n_inputs = inputs + parse_params(out_params), len(inputs)

    def __call__(self, *args):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: pass all {len(self.params)} arguments, outputs included")
        bound = {a.dtype for a, (t, _) in zip(args, self.params) if t == "T" and isinstance(a, numpy.ndarray)}
        if len(bound) != 1:
            raise TypeError(f"{self.name}: type T is bound to {sorted(map(str, bound))}")
        dtype = bound.pop()
        param_types = [dtype if t == "T" else numpy.dtype(t) for t, _ in self.params]
        shape = numpy.broadcast_shapes(*(numpy.shape(a) for a in args))
        outputs = args[self.n_inputs :]
        for out, out_type in zip(outputs, param_types[self.n_inputs :]):
            if not (isinstance(out, numpy.ndarray) and out.shape == shape and out.dtype == out_type):
                raise TypeError(f"{self.name}: each output must be a {out_type} array of shape {shape}")
        inputs = [
            numpy.ascontiguousarray(numpy.broadcast_to(numpy.asarray(a, t), shape))
            for a, t in zip(args[: self.n_inputs], param_types)
        ]
        # CuPy indexes every argument through its strides; the emulation's kernels index
        # linearly, so strided outputs are worked on in contiguous copies and written back.
        work = []
        for out in outputs:  # an output passed twice is one array, in one copy
            same = next((w for o, w in zip(outputs, work) if o is out), None)
            work.append(numpy.ascontiguousarray(out) if same is None else same)
        kernel = _elementwise_kernel(self.name, self.spec, C_NAMES[("f", dtype.itemsize)], self.preamble)
        size = int(numpy.prod(shape))
        block = 128
        kernel((-(-size // block),), (block,), [*inputs, *work, numpy.int32(size)])
        for out, written in zip(outputs, work):
            if written is not out:
                out[...] = written


def _counted(method_name):
    method = getattr(numpy.ndarray, method_name)

    def read_on_host(self, *args, **kwargs):
        DeviceArray.host_reads += 1
        return method(self, *args, **kwargs)

    return read_on_host


class DeviceArray(numpy.ndarray):
    """The arrays of EMULATED_CUPY: NumPy arrays that count each read of their values on the
    host (float(), int(), bool(), .item(), asnumpy), since on a GPU each is a copy from the
    device and a wait for all queued work."""

    host_reads = 0

    def set(self, values):
        """cupy.ndarray.set: a copy from the host into this array."""
        self[...] = values

    __float__, __int__, __bool__, __index__, item, tolist = map(
        _counted, ["__float__", "__int__", "__bool__", "__index__", "item", "tolist"]
    )


# The cupy functions that make arrays: theirs are DeviceArrays, and ops on those stay DeviceArrays.
CREATORS = {"array", "asarray", "ascontiguousarray", "empty", "empty_like", "zeros", "zeros_like", "ones", "arange"}


class EmulatedCupy:
    """The part of the cupy module that CupyBackend uses, over DeviceArrays."""

    RawModule = RawModule
    ElementwiseKernel = ElementwiseKernel

    class cuda:
        """Streams, devices and pools with nothing to do: each emulated launch has finished when
        it returns, and NumPy allocates every array."""

        class Stream:
            def __init__(self, non_blocking=False):
                pass

            def synchronize(self):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                return False

        class Device(Stream):
            pass

        class MemoryPool:
            def malloc(self, size):
                raise AssertionError("the emulation allocates with NumPy, never from a pool")

        @staticmethod
        @contextlib.contextmanager
        def using_allocator(allocator):
            yield

        @classmethod
        def get_current_stream(cls):
            return cls.Stream()

    @staticmethod
    def take(a, indices, axis=None, out=None):
        """cupy.take wraps indices outside the axis around (it has no mode): never out of bounds."""
        return numpy.take(a, indices, axis=axis, out=out, mode="wrap")

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        """The array itself where it is contiguous already (and of dtype), as CuPy gives it."""
        if isinstance(a, DeviceArray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        return numpy.ascontiguousarray(a, dtype=dtype).view(DeviceArray)

    @staticmethod
    def asnumpy(array):
        """A host copy, as CuPy's is."""
        DeviceArray.host_reads += 1
        return numpy.array(array, subok=False)

    def __getattr__(self, name):
        function = getattr(numpy, name)
        if name not in CREATORS:
            return function
        return lambda *args, **kwargs: function(*args, **kwargs).view(DeviceArray)


EMULATED_CUPY = EmulatedCupy()


class ReplayedGraphSteps(GraphSteps):
    """GraphSteps with capture emulated: the emulation runs each op as it is called, so it cannot
    record launches without running them; a "graph" replays the chunk's Python instead. Its
    plumbing (buffers, the rows and rates copied in before a replay, the losses copied out, the
    warm-up step it undoes) is the real one."""

    def _record(self, chunk):
        return types.SimpleNamespace(launch=chunk)

    def capturable_ops(self):
        return self.backend


class EmulatedCupyBackend(CupyBackend):
    """CupyBackend, unchanged, with the emulation as its xp, and its graphs replayed."""

    name = "cupy-emulated"
    _graph_steps = ReplayedGraphSteps

    @staticmethod
    def _address(array):
        """A host array's address: the kernels run here, so they write through it directly
        (past the guard bands, which check only the kernel's own arguments)."""
        return array.ctypes.data

    def __init__(self):
        super().__init__(EMULATED_CUPY)
