"""The training loop, the same on every backend.

Data flow: the normalised training set moves to the backend once; each epoch a permutation
from the host generator moves once (drawn while the device runs the epoch before); each step
gathers its batch where the data lives, runs forward, loss, backward and update, and stores
the batch's loss in a device-side array that is read back once per call of ``run_steps``
(once per epoch under ``fit``). So the GPU never waits on the host inside an epoch, every
backend with the same seed starts from the same weights and sees the same batches, and a NaN
can still be traced to the step where it first appeared. The state after any whole step
(``state``, ``save``) resumes exactly: it holds the generator's state from the start of the
unfinished epoch and how many of its steps are done.
"""

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy

from xpnet.backends import get_backend
from xpnet.backends.base import Declined
from xpnet.backends.philox import Draw
from xpnet.backends.steps import CHUNKS_PER_EPOCH, TrainingData
from xpnet.data.mnist import Splits
from xpnet.errors import ConfigError, DataError, XpnetError
from xpnet.nn.checkpoint import Checkpoint
from xpnet.nn.config import TrainConfig, resumed_config, seed_lr
from xpnet.nn.fit import TrainingInterrupted, fit_trainer
from xpnet.nn.layers import Buffers
from xpnet.nn.loss import SoftmaxCrossEntropy
from xpnet.nn.memory import check_memory
from xpnet.nn.model import MLP, pixel_statistics
from xpnet.nn.optim import make_optimizer
from xpnet.threads import ThreadPolicy, blas_controller

# A host's compiled chunks grow to this long (Trainer._grow_chunks): each return to Python
# between them costs more than its code (the steps leave the caches cold); grown, an epoch at
# batch 128 to 2048 ran 1-5% faster on a 2-core machine (bench/history.md, "One step declared once").
CHUNK_SECONDS = 0.02
# ... up to a sixth of an epoch: auto checks the load only with more than five chunks to come.
FEWEST_CHUNKS = 6
# What `from xpnet.nn.train import ...` has always found here.
__all__ = ["Diverged", "EpochStats", "History", "TrainConfig", "Trainer", "TrainingInterrupted", "seed_lr"]


@dataclass
class EpochStats:
    """One epoch's record: its mean training loss, validation accuracy, time and throughput."""

    epoch: int
    loss: float
    val_accuracy: float
    seconds: float
    samples_per_second: float


@dataclass
class History:
    """What fit returns: each epoch's EpochStats and, once training ends, the test accuracy."""

    epochs: list = field(default_factory=list)
    test_accuracy: float = math.nan


class Diverged(XpnetError):
    """A step's loss was NaN or infinite; the message names the epoch and step."""


def _as_config(config):
    """config as a TrainConfig: None is the seed recipe, a dict its settings by name."""
    if config is None:
        return TrainConfig()
    if isinstance(config, dict):
        return TrainConfig.from_record(config)
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"config must be a TrainConfig or a dict of its settings, got {type(config).__name__}")
    return config


def _check_data(data, checkpoint):
    """data is splits a run can train on, and the dataset the checkpoint (if any) was trained on."""
    if not isinstance(data, Splits):
        raise DataError(
            f"data must be the splits xpnet.load_dataset() returns (xpnet.Splits), got {type(data).__name__}"
        )
    empty = [name for name in ("train", "validation", "test") if len(getattr(data, name)) == 0]
    if empty:
        splits = f"the {' and '.join(empty)} splits hold" if len(empty) > 1 else f"the {empty[0]} split holds"
        raise DataError(f"{splits} no images: pass data with images in every split")
    if checkpoint is not None and checkpoint.dataset and data.name and checkpoint.dataset != data.name:
        raise ConfigError(
            f"the checkpoint was trained on {checkpoint.dataset}, not {data.name}: "
            f"continue it on xpnet.load_dataset({checkpoint.dataset!r})"
        )


class Trainer:
    """Owns the model, the loss, the optimiser and the device-resident data of one run.

    backend is a Backend or its name; data the splits of ``xpnet.load_dataset``; config a
    TrainConfig, or a dict of its settings by name (the seed recipe when None). checkpoint, from
    ``load_checkpoint``, continues that run with its own settings and on its dataset; only the
    number of epochs is taken from config (a setting it changes from the default that differs
    from the checkpoint's is a ConfigError).

    compiled: where the backend has a compiled path that lowers this run (Numba's compiled loop,
    CuPy's CUDA graphs), it takes many steps in one call; with compiled=False every step runs the
    reference loop, the layers calling the backend's ops (use it to inspect the layers'
    gradients after a step: Numba's loop folds plain SGD's update into the gradient's product
    and keeps no gradient). None (the default) takes the compiled path where there is one;
    True does too, and warns once where the backend declines the run.

    threads is how many threads each epoch may use (BLAS's, or from 128 rows those of Numba's
    compiled loop, each with one BLAS thread): None (BLAS's own, a thread per core), a count, or
    "auto" to give it the cores other processes leave, measured as the epoch runs
    (src/xpnet/threads.py; the CLI's default; under load it gives up bit-for-bit reproducibility
    for that, but for Numba's split steps on two cores).
    """

    def __init__(self, backend, data, config=None, checkpoint=None, compiled=None, threads=None):
        if backend is None or isinstance(backend, str):
            backend = get_backend(backend)
        config = _as_config(config)
        _check_data(data, checkpoint)
        if checkpoint is not None:
            config = resumed_config(config, checkpoint.train_config())
        self.backend, self.config = backend, config
        self.dataset = data.name  # recorded in checkpoints, so a resume reads the same data
        self.rng = numpy.random.default_rng(config.seed)
        n_classes = int(max(data.train.labels.max(), data.test.labels.max())) + 1
        sizes = [data.train.images[0].size, *config.hidden, n_classes]
        check_memory(backend, sizes, config, sum(len(s) for s in (data.train, data.validation, data.test)))
        mean, std = pixel_statistics(data.train.images)
        self.model = MLP(
            backend,
            sizes,
            dtype=config.dtype,
            mean=mean,
            std=std,
            rng=self.rng,
            activation=config.activation,
            dropout=config.dropout,
        )
        self.loss = SoftmaxCrossEntropy(backend)
        self.train_x, self.train_y = self._to_device(data.train)
        self.val_x, self.val_y = self._to_device(data.validation)
        self.test_x, self.test_y = self._to_device(data.test)
        self.steps_per_epoch = -(-len(self.train_y) // config.batch_size)
        self.optimizer = make_optimizer(backend, self.model.parameters(), config, self.steps_per_epoch)
        self.step_losses = backend.empty((self.steps_per_epoch,), self.model.dtype)
        # With --augment every epoch trains on its own deformed copy of the training images. For a
        # compiled path it is made where they live at the epoch's start (_start_epoch) and written
        # in place, so the path gathers from it as from any rows; the reference loop deforms each
        # batch's rows as it gathers them (batch), the same images, since an image's draws are
        # its own. Outside an image a deformation reads a blank pixel.
        self.deformation = config.deformation()
        self.background = float(self.model.normalize(numpy.zeros((1, sizes[0])))[0, 0])
        self.epoch_x = self._every_row = None  # the epoch's deformed images, where a compiled path takes them
        if self.deformation is None:
            training = TrainingData(self.train_x, self.train_y, data.train.images)
        else:
            self.epoch_x = backend.empty(self.train_x.shape, self.train_x.dtype)
            self._every_row = backend.asarray(numpy.arange(len(self.train_x)))
            training = TrainingData(self.epoch_x, self.train_y, None)
        self.compiled_steps = self._compile_steps(compiled, training)
        if self.compiled_steps is None:
            self.epoch_x = self._every_row = None
        # How far the compiled steps run between returns to Python (so the progress bar moves and
        # Ctrl-C is answered), and the unit of the thread probes: a twentieth of an epoch to begin
        # with (a whole one for CUDA graphs), grown on the host where that takes less than
        # CHUNK_SECONDS (_grow_chunks).
        self.chunk_steps = (
            max(1, self.steps_per_epoch // CHUNKS_PER_EPOCH)
            if self.compiled_steps is None
            else self.compiled_steps.chunk_steps(self.steps_per_epoch)
        )
        # Only host BLAS needs the limit: a GPU backend uses none. Made once, since finding the
        # libraries each time would cost 1-2 ms an epoch (src/xpnet/threads.py), and made last, after
        # the backend has loaded what it loads (Numba brings SciPy's OpenBLAS).
        controller = blas_controller() if backend.xp is numpy else None
        steps_blas = None if self.compiled_steps is None else self.compiled_steps.blas_threads
        self.thread_policy = ThreadPolicy(threads, controller, steps_blas)
        self._batch = Buffers(backend)
        self.history = History()
        self.epoch = 0  # whole epochs done
        self.epoch_step = 0  # steps done of the next one
        self._epoch_losses, self._epoch_seconds = [], 0.0
        self._order, self._epoch_rng_state = None, None
        self._next_order = None  # (generator state, order) of the next epoch, drawn ahead
        if checkpoint is not None:
            self.restore(checkpoint)

    def _to_device(self, split):
        return (
            self.backend.asarray(self.model.normalize(split.images)),
            self.backend.asarray(split.labels, numpy.int64),
        )

    def _compile_steps(self, compiled, data):
        """The backend's compiled steps for this run, or None for the reference loop: where asked
        not to, or where the backend declines (saying why, once, when the caller asked for it)."""
        if compiled is False:
            return None
        steps = self.backend.compile_steps(self.model, self.optimizer, data, self.config.batch_size)
        if not isinstance(steps, Declined):
            return steps
        if compiled:
            warnings.warn(f"{steps.reason}; the reference loop runs every step instead", RuntimeWarning, stacklevel=3)
        return None

    @property
    def threads(self):
        """The thread setting: None, a count, or "auto"."""
        return self.thread_policy.threads

    @property
    def blas_threads(self):
        """The thread count in use (auto's latest measure)."""
        return self.thread_policy.count

    def threads_in_use(self):
        """The count to report with an epoch: None where there is no host BLAS or no setting."""
        policy = self.thread_policy
        return None if policy.threads is None or policy.controller is None else policy.count

    # -- state ------------------------------------------------------------------------------
    def state(self):
        """Everything needed to continue this run exactly from here, copied to the host."""
        to_host = self.backend.to_numpy
        return Checkpoint(
            params=[to_host(p.value) for p in self.model.parameters()],
            **self.model.architecture(),
            config=self.config.to_record(),
            epoch=self.epoch,
            epoch_step=self.epoch_step,
            epoch_losses=[float(loss) for chunk in self._epoch_losses for loss in chunk],
            optimizer=self.optimizer.name,
            optimizer_steps=self.optimizer.steps_taken,
            optimizer_state={name: [to_host(a) for a in arrays] for name, arrays in self.optimizer.state.items()},
            rng_state=self._epoch_rng_state if self._order is not None else self._next_rng_state(),
            history=[dataclasses.asdict(e) for e in self.history.epochs],
            dataset=self.dataset,
        )

    def save(self, path):
        """Write the run's state as a checkpoint that `xpnet train --resume` or Trainer continues."""
        self.state().save(path)

    def restore(self, checkpoint):
        """Continue from a checkpoint of this run (its weights, optimiser, generator, history)."""
        if checkpoint.sizes != self.model.sizes or checkpoint.activation != self.model.activation:
            raise DataError(
                f"the checkpoint's network is {'-'.join(map(str, checkpoint.sizes))} ({checkpoint.activation}) but "
                f"this data needs {'-'.join(map(str, self.model.sizes))} ({self.model.activation}); resume with "
                "the dataset it was trained on"
            )
        state = self.optimizer.state
        if checkpoint.optimizer != self.optimizer.name or set(checkpoint.optimizer_state) != set(state):
            raise DataError(
                f"the checkpoint's optimiser is {checkpoint.optimizer} with {sorted(checkpoint.optimizer_state)}, "
                f"where its settings make {self.optimizer.name} with {sorted(state)}"
            )
        self.model.load_params(checkpoint.params)
        self._next_order = None
        for name, arrays in state.items():
            for array, saved in zip(arrays, checkpoint.optimizer_state[name]):
                array[...] = self.backend.asarray(saved)
        self.optimizer.steps_taken = checkpoint.optimizer_steps
        self.rng.bit_generator.state = checkpoint.rng_state
        self.history.epochs = [EpochStats(**e) for e in checkpoint.history]
        self.epoch = checkpoint.epoch
        step = checkpoint.epoch_step
        if step >= self.steps_per_epoch or (step and len(checkpoint.epoch_losses) != step):
            raise DataError(
                f"the checkpoint's epoch_step {step} (with {len(checkpoint.epoch_losses)} epoch_losses) is no "
                f"step within an epoch of {self.steps_per_epoch} steps on this data: the file is damaged, or from "
                "other data"
            )
        if checkpoint.epoch_step:  # redraw the unfinished epoch's order from its generator state
            self._start_epoch()
            self.epoch_step = checkpoint.epoch_step
            self._epoch_losses = [numpy.array(checkpoint.epoch_losses)]

    # -- training ---------------------------------------------------------------------------
    def step(self, x, y, draw=None):
        """One step on a batch (forward, loss, backward, update); returns its mean loss as a 0-d
        backend array. draw is where dropout draws its masks, a philox.Draw (None: no dropout);
        the trainer's own steps pass draw_at(k) for step k of the current epoch."""
        loss = self.loss.forward(self.model.forward(x, draw), y)
        self.model.backward(self.loss.backward())
        self.optimizer.step()
        return loss

    def _start_epoch(self):
        self._epoch_rng_state, self._order = self._next_order or self._draw_order()
        self._next_order = None
        self._epoch_losses, self._epoch_seconds = [], 0.0
        if self.epoch_x is not None:  # timed as part of the epoch
            start, every_row = time.perf_counter(), self._every_row
            seed, epoch, background = self.config.seed, self.epoch, self.background
            self.backend.deform_rows(self.train_x, every_row, self.deformation, seed, epoch, background, self.epoch_x)
            self.backend.synchronize()
            self._epoch_seconds = time.perf_counter() - start

    def _draw_order(self):
        """(the generator's state before the draw, an epoch's row order on the device)."""
        state = self.rng.bit_generator.state
        return state, self.backend.asarray(self.rng.permutation(len(self.train_y)))

    def _next_rng_state(self):
        """The generator's state at the start of the next epoch, drawn ahead or not."""
        return self.rng.bit_generator.state if self._next_order is None else self._next_order[0]

    def draw_at(self, k):
        """The philox.Draw of step k of the current epoch, where the model has dropout (else None):
        a function of the seed, the epoch and k alone, so a resumed run draws what it would have."""
        return Draw(self.config.seed, self.epoch, k) if self.model.dropout else None

    def rows(self, k):
        """The training rows step k of the current epoch gathers (a view of its order, on the device)."""
        if self._order is None:
            self._start_epoch()
        return self._order[k * self.config.batch_size :][: self.config.batch_size]

    def batch(self, k):
        """(x, y) of step k of the current epoch, gathered on the device into reused buffers; with
        --augment the epoch's deformed images (Backend.deform_rows, each as drawn for it)."""
        rows = self.rows(k)
        x = self._batch.get("x", (len(rows), self.train_x.shape[1]), self.train_x.dtype)
        y = self._batch.get("y", (len(rows),), self.train_y.dtype)
        if self.deformation is not None and self.epoch_x is None:  # the reference loop's: these rows only
            draws = (self.deformation, self.config.seed, self.epoch, self.background)
            self.backend.deform_rows(self.train_x, rows, *draws, out=x)
        else:
            self.backend.take_rows(self.train_x if self.epoch_x is None else self.epoch_x, rows, out=x)
        return x, self.backend.take_rows(self.train_y, rows, out=y)

    def run_steps(self, n=None, progress=None):
        """Take the next n SGD steps of the current epoch (all that remain of it when None) and
        return their losses, as host floats read from the device once. The epoch's last step
        completes it: its stats (mean loss, validation accuracy, time) go into the history.
        Raises Diverged naming the first step whose loss was not finite. progress.update()
        is called after each step (a tqdm bar, say)."""
        left = self.steps_per_epoch - self.epoch_step
        n = left if n is None else n
        if not 1 <= n <= left:
            raise ConfigError(f"run_steps takes 1 to {left} steps (what is left of epoch {self.epoch + 1}), got {n}")
        # Overflow is caught below and reported with its step; NumPy's own warnings would only
        # repeat it, once per op, as noise.
        with numpy.errstate(over="ignore", invalid="ignore"):
            return self._run_steps(self.epoch_step, n, progress)

    def _run_steps(self, first, n, progress):
        if self._order is None:
            self._start_epoch()
        self.backend.synchronize()
        start = time.perf_counter()
        (self._run_reference if self.compiled_steps is None else self._run_compiled)(first, n, progress)
        if first + n == self.steps_per_epoch and self._next_order is None:
            # While a GPU runs the queued steps the host would wait: it draws and uploads the next
            # epoch's order meanwhile (0.8 ms of a 9.7 ms epoch at batch 512 on an H200).
            self._next_order = self._draw_order()
        losses = self.backend.to_numpy(self.step_losses[first : first + n]).astype(numpy.float64)
        self.backend.synchronize()
        self._epoch_seconds += time.perf_counter() - start
        bad = numpy.flatnonzero(~numpy.isfinite(losses))
        if len(bad):
            config = self.config
            blame = [f"--lr than {config.lr:g}"]
            blame += [f"--momentum than {config.momentum:g}"] if config.momentum else []
            blame += [f"--weight-decay than {config.weight_decay:g}"] if config.weight_decay else []
            raise Diverged(
                f"training diverged in epoch {self.epoch + 1} at step {first + bad[0] + 1} of {self.steps_per_epoch} "
                f"(loss {losses[bad[0]]}); try a smaller {', or a smaller '.join(blame)}"
            )
        self._epoch_losses.append(losses)
        self.epoch_step += n
        if self.epoch_step == self.steps_per_epoch:
            self._complete_epoch()
        return losses

    def _run_reference(self, first, n, progress):
        """The steps one by one, through the layers and the backend's ops."""
        for k in range(first, first + n):
            # Array to array: `step_losses[k] = loss` may pass through a host float, a device read.
            self.step_losses[k : k + 1] = self.step(*self.batch(k), self.draw_at(k))
            if progress is not None:
                progress.update()

    def _run_compiled(self, first, n, progress):
        """The steps in chunks of chunk_steps: Python, and so Ctrl-C, runs only between calls."""
        optimizer = self.optimizer
        lrs = numpy.array([optimizer.lr_at(optimizer.steps_taken + s) for s in range(n)], numpy.float64)
        offset = 0
        while offset < n:
            size = min(self.chunk_steps, n - offset)
            rates = lrs[offset : offset + size]
            start = time.perf_counter()
            self.compiled_steps.run(self._order, first + offset, size, rates, self.step_losses, self.blas_threads)
            self._grow_chunks(size, time.perf_counter() - start)
            optimizer.steps_taken += size
            offset += size
            if progress is not None:
                progress.update(size)

    def _grow_chunks(self, size, seconds):
        """Longer chunks where `size` compiled steps on the host took less than CHUNK_SECONDS: as
        many steps as fit in it at that pace, a sixth of an epoch at most. Never shorter, and
        not where the compiled steps fix their chunks (CUDA graphs, one captured per length)."""
        if self.compiled_steps.chunks_may_grow:
            most = max(1, self.steps_per_epoch // FEWEST_CHUNKS)
            fit = most if seconds <= 0 else int(size * CHUNK_SECONDS / seconds)
            self.chunk_steps = max(self.chunk_steps, min(most, fit))

    def _complete_epoch(self):
        n = len(self.train_y)
        losses = numpy.concatenate(self._epoch_losses)
        batch_sizes = numpy.minimum(self.config.batch_size, n - self.config.batch_size * numpy.arange(len(losses)))
        self.epoch += 1
        self.epoch_step, self._order = 0, None
        seconds = self._epoch_seconds
        stats = EpochStats(
            self.epoch, float(losses @ batch_sizes) / n, self.accuracy(self.val_x, self.val_y), seconds, n / seconds
        )
        self.history.epochs.append(stats)

    def train_epoch(self, progress=None):
        """The rest of the current epoch (all of it, from its start) with the threads the
        trainer's policy gives; returns its mean loss."""
        self.thread_policy.run_epoch(
            lambda n: self.run_steps(n, progress),
            lambda: self.steps_per_epoch - self.epoch_step,
            lambda: self.chunk_steps,
        )
        return self.history.epochs[-1].loss

    def accuracy(self, x, y, batch_size=None):
        """The fraction of rows of device data x whose label y the model predicts (one read),
        batch_size rows at a time (the backend's eval_rows when None), or, batch_size None, by
        the compiled steps' count where they have one (Numba's split steps: on their two threads)."""
        counted = None
        if batch_size is None and self.compiled_steps is not None:
            counted = self.compiled_steps.count_correct(x, y, self.blas_threads)
        if counted is not None:
            return counted / len(y)
        batch_size = batch_size or self.backend.eval_rows
        correct = 0
        for start in range(0, len(y), batch_size):
            logits = self.model.forward(x[start : start + batch_size])
            correct = correct + self.backend.count_correct(logits, y[start : start + batch_size])
        return int(self.backend.to_numpy(correct)) / len(y)

    def test_accuracy(self):
        """The accuracy on the test split, under the thread policy's limit."""
        with self.thread_policy.limit():
            return self.accuracy(self.test_x, self.test_y)

    def prepare(self):
        """Compile whatever the backend and the compiled steps compile, before any timed epoch."""
        self.backend.prepare(self.config.dtype)
        if self.compiled_steps is not None:
            self.compiled_steps.prepare(self.step_losses)
        if self.deformation is not None:  # its kernel compiles at its first call: one image's here
            first = self.backend.asarray(numpy.zeros(1, numpy.int64))
            self.backend.deform_rows(self.train_x, first, self.deformation, 0, 0, self.background)
            self.backend.synchronize()

    def fit(self, log=print, progress=False, after_epoch=None):
        """Train up to config.epochs and return the history, with the test accuracy.
        log(line) gets each epoch's summary; after_epoch(trainer) runs after each
        (checkpointing). Ctrl-C raises TrainingInterrupted with the state after the last whole
        epoch (the state fit started from, before the first)."""
        return fit_trainer(self, log, progress, after_epoch)
