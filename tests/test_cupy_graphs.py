"""The CuPy backend's compiled path (src/xpnet/backends/cupy_graphs.py): chunks of training steps
captured as CUDA graphs and replayed.

On a GPU, the graphs against the op-by-op path. Everywhere, the path's plumbing on the CPU
emulation of CuPy, where a "graph" replays the chunk's Python (tests/cuda_host.py,
ReplayedGraphSteps).
"""

import ctypes
import types

import numpy
import pytest

from tests.cuda_host import CXX, EmulatedCupyBackend, ReplayedGraphSteps
from xpnet.backends import get_backend
from xpnet.backends.cupy_graphs import GRAPH_STEPS, OP_N, CublasGemm, GraphSteps
from xpnet.backends.steps import TrainingData
from xpnet.data.synthetic import synthetic_splits
from xpnet.errors import BackendUnavailable
from xpnet.nn.train import TrainConfig, Trainer

# Every option the step has: momentum (Nesterov), weight decay, a schedule whose rate changes each
# step. 200 rows at batch 48 are four whole steps and one of 8; in chunks of two steps, an epoch
# replays a chunk of two whole steps twice and the last step alone.
CONFIG = TrainConfig(
    batch_size=48, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine", dtype="float64"
)
CHUNK_SHAPES = {(48, 48), (8,)}


def train_two_epochs(backend, steps_class=None, fused_head=True):
    """A trainer after two epochs, its reference loop or steps_class's (with the fused head or
    cuBLAS's products and the loss kernel), and each epoch's losses."""
    trainer = Trainer(backend, synthetic_splits(n_train=200), CONFIG, compiled=False)
    if steps_class is not None:
        trainer.compiled_steps = graph_steps(steps_class, trainer)
        trainer.compiled_steps.fused_head = fused_head
        trainer.compiled_steps.prepare(trainer.step_losses)
    trainer.chunk_steps = 2
    losses = [trainer.run_steps() for _ in range(2)]
    return trainer, losses


def graph_steps(steps_class, trainer):
    """The trainer's steps as steps_class's graphs."""
    data = TrainingData(trainer.train_x, trainer.train_y, None)
    return steps_class(trainer.backend, trainer.model, trainer.optimizer, data, trainer.config.batch_size)


def state(trainer):
    """Host copies of the weights and the optimiser's velocities."""
    arrays = [p.value for p in trainer.model.parameters()] + trainer.optimizer.state["velocity"]
    return [trainer.backend.to_numpy(array) for array in arrays]


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
def test_replayed_chunks_train_exactly_as_the_reference_loop():
    """With cuBLAS's products (NumPy's here) the steps are the reference loop's ops: the same bits."""
    backend = EmulatedCupyBackend()
    reference, reference_losses = train_two_epochs(backend)
    graphs, losses = train_two_epochs(backend, ReplayedGraphSteps, fused_head=False)
    assert set(graphs.compiled_steps.graphs) == CHUNK_SHAPES
    numpy.testing.assert_array_equal(numpy.concatenate(losses), numpy.concatenate(reference_losses))
    for got, want in zip(state(graphs), state(reference)):
        numpy.testing.assert_array_equal(got, want)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
def test_replayed_chunks_with_the_fused_head_train_as_the_reference_loop():
    """The head's kernels add in another order than the products: float64 agrees far below 1e-9."""
    backend = EmulatedCupyBackend()
    reference, reference_losses = train_two_epochs(backend)
    graphs, losses = train_two_epochs(backend, ReplayedGraphSteps)
    assert graphs.compiled_steps.fused_head and set(graphs.compiled_steps.scratch) == {48, 8}
    numpy.testing.assert_allclose(numpy.concatenate(losses), numpy.concatenate(reference_losses), rtol=1e-9)
    for got, want in zip(state(graphs), state(reference)):
        numpy.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
def test_the_warm_up_before_a_capture_leaves_the_model_as_it_was():
    backend = EmulatedCupyBackend()
    trainer = Trainer(backend, synthetic_splits(n_train=200), CONFIG, compiled=False)
    steps = graph_steps(ReplayedGraphSteps, trainer)
    trainer.run_steps(1)  # a velocity that is not zero, which a warm-up step would change
    before = state(trainer)
    steps._make_room((48, 48))
    steps.lrs[:] = 0.5  # a warm-up at this rate would move the weights a long way
    steps._capture((48, 48))
    for got, want in zip(state(trainer), before):
        numpy.testing.assert_array_equal(got, want)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
def test_quick_graph_chunks_keep_their_length():
    """The trainer lengthens quick chunks on the host; each length here would be one more graph to
    capture (seconds on a GPU, and memory), so a 100-step epoch stays in chunks of its twentieth."""
    backend = EmulatedCupyBackend()
    trainer = Trainer(backend, synthetic_splits(n_train=4000), TrainConfig(batch_size=40), compiled=False)
    trainer.compiled_steps = graph_steps(ReplayedGraphSteps, trainer)
    trainer.compiled_steps.prepare(trainer.step_losses)
    trainer.run_steps()
    assert set(trainer.compiled_steps.graphs) == {(40,) * 5}


def real_cupy():
    try:
        return get_backend("cupy")
    except BackendUnavailable as exc:
        pytest.skip(f"cupy backend unavailable here: {exc}")


def test_graphs_train_as_the_op_by_op_path_on_a_gpu():
    """float64, so the two paths' products (cuBLAS through CuPy, and called directly) agree to far
    below the bound; a captured step is the same kernels on the same arrays."""
    backend = real_cupy()
    reference, reference_losses = train_two_epochs(backend)
    graphs, losses = train_two_epochs(backend, GraphSteps)
    assert graphs.compiled_steps.failure is None
    assert set(graphs.compiled_steps.graphs) == CHUNK_SHAPES
    numpy.testing.assert_allclose(numpy.concatenate(losses), numpy.concatenate(reference_losses), rtol=1e-9)
    for got, want in zip(state(graphs), state(reference)):
        numpy.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_the_trainer_takes_the_graph_path_on_a_gpu():
    backend = real_cupy()
    trainer = Trainer(backend, synthetic_splits(n_train=200), CONFIG)
    trainer.run_steps()
    assert isinstance(trainer.compiled_steps, GraphSteps) and trainer.compiled_steps.failure is None
    assert trainer.compiled_steps.graphs


class HostArray:
    """A NumPy array as CublasGemm sees a CuPy one: shape, dtype, flags, and data.ptr."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.flags = array, array.shape, array.dtype, array.flags
        self.data = types.SimpleNamespace(ptr=array.ctypes.data)


def column_major_dgemm(handle, op_a, op_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """BLAS's dgemm over raw pointers, column-major as cuBLAS is: C = op(A) @ op(B), alpha 1, beta 0."""

    def matrix(pointer, rows, cols, ld):
        flat = numpy.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_double)), shape=(cols * ld,))
        return flat.reshape(cols, ld)[:, :rows].T  # column j starts at j * ld

    a = matrix(a, *((m, k) if op_a == OP_N else (k, m)), lda)
    b = matrix(b, *((k, n) if op_b == OP_N else (n, k)), ldb)
    matrix(c, m, n, ldc)[...] = (a if op_a == OP_N else a.T) @ (b if op_b == OP_N else b.T)
    return 0


@pytest.mark.parametrize("case", ["x @ W.T", "grad_z.T @ x", "grad_z @ W"])
def test_gemm_shows_row_major_operands_to_column_major_cublas(case):
    """The three products of a layer, in the layouts the layers pass them (W.T and grad_z.T are
    transposed views), through the operand and leading-dimension choice of CublasGemm."""
    rng = numpy.random.default_rng(0)
    x, W, grad_z = rng.standard_normal((5, 7)), rng.standard_normal((3, 7)), rng.standard_normal((5, 3))
    a, b = {"x @ W.T": (x, W.T), "grad_z.T @ x": (grad_z.T, x), "grad_z @ W": (grad_z, W)}[case]
    gemm = object.__new__(CublasGemm)  # no cuBLAS: its routine is the column-major reference above
    gemm.handle, gemm.routines = None, {numpy.dtype(numpy.float64): (column_major_dgemm, None, None)}
    out = numpy.empty((a.shape[0], b.shape[1]))
    gemm(HostArray(a), HostArray(b), HostArray(out))
    numpy.testing.assert_allclose(out, a @ b, rtol=1e-12)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) here to run the CuPy backend's kernels on the CPU")
@pytest.mark.parametrize("n_train, batch_size, chunk", [(200, 48, 5), (5000, 4, GRAPH_STEPS)])
def test_an_epoch_is_one_graph_up_to_its_longest(n_train, batch_size, chunk):
    config = TrainConfig(batch_size=batch_size, dtype="float64")
    trainer = Trainer(EmulatedCupyBackend(), synthetic_splits(n_train=n_train), config)
    assert isinstance(trainer.compiled_steps, ReplayedGraphSteps)
    assert trainer.chunk_steps == chunk  # 5 steps: all of them; 1,250: the most a graph takes
