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
from dataclasses import dataclass, field

import numpy
from tqdm import tqdm

from xpnet.errors import ConfigError, DataError, XpnetError
from xpnet.nn.checkpoint import Checkpoint
from xpnet.nn.layers import Buffers
from xpnet.nn.loss import SoftmaxCrossEntropy
from xpnet.nn.memory import check_memory
from xpnet.nn.model import MLP, pixel_statistics
from xpnet.nn.optim import SGD, check_sgd_settings
from xpnet.threads import AUTO, blas_controller, blas_threads, check_threads, threads_left, usable_cores

# Under threads "auto", a chunk of steps this many times slower per step than the first chunk
# after the last check of the load has the load re-checked. The check at each epoch's start
# does not see load that arrives later in the epoch: on a 16-core machine with the test suite
# starting beside it, a first epoch that kept its 8 threads ran 15x slower than the later ones.
RECHECK_SLOWDOWN = 2.0
# A host's compiled chunks grow to this long (Trainer._grow_chunks): on the 2-core machine each
# return to Python between them cost 55-145 us at batch 2048, more than its code alone (the
# steps leave the caches cold), where a twentieth of an epoch is one 3.5 ms step; grown, an
# epoch at batch 128 to 2048 ran about 1% faster (interleaved pairs, bench/README.md).
CHUNK_SECONDS = 0.02
# ... up to a sixth of an epoch: auto checks the load only with more than five chunks to come.
FEWEST_CHUNKS = 6


def seed_lr(batch_size=512):
    """The seed recipe's lr of 1e-4 on the *summed* loss of a batch, as a rate on the mean loss:
    1e-4 * batch_size, 0.0512 at the seed's 512. (A fixed rate on the mean loss would diverge
    at batch 1.)"""
    return 1e-4 * batch_size


def duration_text(seconds):
    """'12.35 s', or three digits of milliseconds below a second ('270 ms', '8.38 ms'): a CPU
    epoch takes a tenth of a second, a GPU one a few milliseconds."""
    milliseconds = seconds * 1e3
    return f"{milliseconds:.3g} ms" if milliseconds < 999.5 else f"{seconds:.2f} s"


@dataclass
class TrainConfig:
    """One training run's settings; the defaults are the seed recipe. Checked when made."""

    epochs: int = 20
    batch_size: int = 512
    lr: float = seed_lr()
    hidden: tuple = (200,)
    seed: int = 0
    dtype: str = "float32"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"

    def __post_init__(self):
        self.hidden = tuple(self.hidden)
        for name in ("epochs", "batch_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, (int, numpy.integer)) or value < (0 if name == "seed" else 1):
                raise ConfigError(f"{name} must be an integer >= {0 if name == 'seed' else 1}, got {value!r}")
        if not self.hidden or not all(isinstance(h, (int, numpy.integer)) and h >= 1 for h in self.hidden):
            raise ConfigError(f"hidden must be one or more layer sizes >= 1, e.g. (200,), got {self.hidden!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        check_sgd_settings(self.lr, self.momentum, self.nesterov, self.weight_decay, self.schedule)
        smallest = numpy.finfo(self.dtype).tiny
        if self.lr < smallest:
            raise ConfigError(
                f"a learning rate of {self.lr:g} is below the smallest normal {self.dtype} ({smallest:.3g}): "
                "every update would round to 0; use a larger lr or float64"
            )


def resumed_config(config, saved):
    """The checkpoint's settings (saved) with config's epochs. A setting config changes from the
    default that differs from the checkpoint's is refused, as `xpnet train --resume` refuses a
    setting's flag: the run would otherwise go on with other settings than the ones asked for."""
    default = TrainConfig()
    clashes = [
        f"{name}={getattr(config, name)!r} (the checkpoint's: {getattr(saved, name)!r})"
        for name in (f.name for f in dataclasses.fields(TrainConfig) if f.name != "epochs")
        if getattr(default, name) != getattr(config, name) != getattr(saved, name)
    ]
    if clashes:
        raise ConfigError(
            f"a resumed run keeps its checkpoint's settings, but config sets {', '.join(clashes)}; "
            "pass TrainConfig(epochs=...) alone with a checkpoint"
        )
    return dataclasses.replace(saved, epochs=config.epochs)


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


class TrainingInterrupted(Exception):
    """Ctrl-C; carries the state after the last whole epoch, from which a resume is exact."""

    def __init__(self, checkpoint):
        super().__init__(f"interrupted after epoch {checkpoint.epoch}")
        self.checkpoint = checkpoint


class Trainer:
    """Owns the model, the loss, the optimiser and the device-resident data of one run.

    backend is a Backend or its name; data the splits of ``xpnet.load_dataset``; config a
    TrainConfig (the seed recipe when None). checkpoint, from ``load_checkpoint``, continues
    that run with its own settings; only the number of epochs is taken from config (a
    setting it changes from the default that differs from the checkpoint's is a ConfigError). With
    compiled (the default), a backend that can take many steps in one call does (Numba's
    compiled loop, CuPy's CUDA graphs); with compiled=False every step runs the reference loop,
    the layers calling the backend's ops (use it to inspect the layers' gradients after a step:
    without momentum Numba's loop folds the update into the gradient's product and keeps no
    gradient).
    threads is how many threads each epoch may use (BLAS's, or from 128 rows those of Numba's
    compiled loop, each with one BLAS thread): None (BLAS's own, a thread per core), a count, or
    "auto" to give it the cores other processes leave, measured as the epoch runs
    (xpnet/threads.py; the CLI's default; under load it gives up bit-for-bit reproducibility
    for that, but for Numba's split steps on two cores).
    """

    def __init__(self, backend, data, config=None, checkpoint=None, compiled=True, threads=None):
        from xpnet.backends import get_backend

        if backend is None or isinstance(backend, str):
            backend = get_backend(backend)
        config = config or TrainConfig()
        if checkpoint is not None:
            config = resumed_config(config, checkpoint.train_config(TrainConfig))
        self.backend, self.config = backend, config
        self.threads = check_threads(threads)
        self.blas_threads = usable_cores() if self.threads == AUTO else self.threads  # the limit in use
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
        )
        self.loss = SoftmaxCrossEntropy(backend)
        self.train_x, self.train_y = self._to_device(data.train)
        self.val_x, self.val_y = self._to_device(data.validation)
        self.test_x, self.test_y = self._to_device(data.test)
        self.steps_per_epoch = -(-len(self.train_y) // config.batch_size)
        # How far the compiled loop runs between returns to Python (so the progress bar moves
        # and Ctrl-C is answered), and the unit of the thread probes: a twentieth of an epoch,
        # grown on the host where that takes less than CHUNK_SECONDS (_grow_chunks).
        self.chunk_steps = max(1, self.steps_per_epoch // 20)
        self.optimizer = SGD(
            backend,
            self.model.parameters(),
            config.lr,
            config.momentum,
            config.nesterov,
            config.weight_decay,
            config.schedule,
            total_steps=self.steps_per_epoch * config.epochs,
        )
        self.step_losses = backend.empty((self.steps_per_epoch,), self.model.dtype)
        self.compiled_steps = None
        if compiled:
            self.compiled_steps = backend.compile_steps(
                self.model, self.optimizer, self.train_x, self.train_y, config.batch_size, data.train.images
            )
        # Only host BLAS needs the limit: a GPU backend uses none. Made once, since finding the
        # libraries each time would cost 1-2 ms an epoch (xpnet/threads.py), and made last, after
        # the backend has loaded what it loads (Numba brings SciPy's OpenBLAS).
        self._blas = blas_controller() if backend.xp is numpy else None
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

    # -- state ------------------------------------------------------------------------------
    def state(self):
        """Everything needed to continue this run exactly from here, copied to the host."""
        to_host = self.backend.to_numpy
        return Checkpoint(
            sizes=self.model.sizes,
            dtype=self.config.dtype,
            mean=self.model.mean,
            std=self.model.std,
            params=[to_host(p.value) for p in self.model.parameters()],
            config=dataclasses.asdict(self.config),
            epoch=self.epoch,
            epoch_step=self.epoch_step,
            epoch_losses=[float(loss) for chunk in self._epoch_losses for loss in chunk],
            optimizer_steps=self.optimizer.steps_taken,
            rng_state=self._epoch_rng_state if self._order is not None else self._next_rng_state(),
            history=[dataclasses.asdict(e) for e in self.history.epochs],
            velocities=[to_host(v) for v in self.optimizer.velocities if v is not None],
            dataset=self.dataset,
        )

    def save(self, path):
        """Write the run's state as a checkpoint that `xpnet train --resume` or Trainer continues."""
        self.state().save(path)

    def restore(self, checkpoint):
        """Continue from a checkpoint of this run (its weights, optimiser, generator, history)."""
        if checkpoint.sizes != self.model.sizes:
            raise DataError(
                f"the checkpoint's network is {'-'.join(map(str, checkpoint.sizes))} but this data needs "
                f"{'-'.join(map(str, self.model.sizes))}; resume with the dataset it was trained on"
            )
        checkpoint.load_into(self.model)
        self._next_order = None
        for velocity, saved in zip((v for v in self.optimizer.velocities if v is not None), checkpoint.velocities):
            velocity[...] = self.backend.asarray(saved)
        self.optimizer.steps_taken = checkpoint.optimizer_steps
        self.rng.bit_generator.state = checkpoint.rng_state
        self.history.epochs = [EpochStats(**e) for e in checkpoint.history]
        self.epoch = checkpoint.epoch
        if checkpoint.epoch_step:  # redraw the unfinished epoch's order from its generator state
            self._start_epoch()
            self.epoch_step = checkpoint.epoch_step
            self._epoch_losses = [numpy.array(checkpoint.epoch_losses)]

    # -- training ---------------------------------------------------------------------------
    def step(self, x, y):
        """One SGD step on a batch; returns its mean loss as a 0-d backend array."""
        loss = self.loss.forward(self.model.forward(x), y)
        self.model.backward(self.loss.backward())
        self.optimizer.step()
        return loss

    def _start_epoch(self):
        self._epoch_rng_state, self._order = self._next_order or self._draw_order()
        self._next_order = None
        self._epoch_losses, self._epoch_seconds = [], 0.0

    def _draw_order(self):
        """(the generator's state before the draw, an epoch's row order on the device)."""
        state = self.rng.bit_generator.state
        return state, self.backend.asarray(self.rng.permutation(len(self.train_y)))

    def _next_rng_state(self):
        """The generator's state at the start of the next epoch, drawn ahead or not."""
        return self.rng.bit_generator.state if self._next_order is None else self._next_order[0]

    def batch(self, k):
        """(x, y) of step k of the current epoch, gathered on the device into reused buffers."""
        if self._order is None:
            self._start_epoch()
        rows = self._order[k * self.config.batch_size :][: self.config.batch_size]
        x = self._batch.get("x", (len(rows), self.train_x.shape[1]), self.train_x.dtype)
        y = self._batch.get("y", (len(rows),), self.train_y.dtype)
        return self.backend.take_rows(self.train_x, rows, out=x), self.backend.take_rows(self.train_y, rows, out=y)

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
            self.step_losses[k : k + 1] = self.step(*self.batch(k))
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
        if self.threads == AUTO and self._blas is not None:
            self._auto_epoch(progress)
        else:
            with self._blas_limit():
                self.run_steps(progress=progress)
        return self.history.epochs[-1].loss

    def _auto_epoch(self, progress):
        """The rest of the epoch under threads "auto": the load is checked (threads_left, whose
        chunks are training steps like the others) at the epoch's start and again after any
        chunk whose steps ran RECHECK_SLOWDOWN times slower than those of the first chunk after
        the last check, while more than five chunks are left."""
        run, chunk = (lambda n: self.run_steps(n, progress)), self.chunk_steps
        while True:
            left = self.steps_per_epoch - self.epoch_step
            if left > 5 * chunk:
                # As long as 0.1 s, all but the last chunk at most: /proc/stat counts in 10 ms
                # ticks, and a quarter of a 100 ms epoch misread the load (one thread chosen,
                # alone, in two epochs of seven at batch 2048 on the 2-core machine).
                most = -(-left // chunk) - 1
                self.blas_threads, _ = threads_left(run, chunk, most, self.blas_threads, limit=self._blas_limit)
            # One limit for all the chunks until the next check: OpenBLAS set back to more threads
            # after each chunk cost the next one (measured: 17% of an epoch at batch 512).
            with self._blas_limit():
                if self._run_while_steady(progress):
                    return

    def _run_while_steady(self, progress):
        """Chunks of steps until the epoch is done (True) or one runs RECHECK_SLOWDOWN times
        slower per step than the first (False)."""
        steady = None  # seconds a step in the first chunk
        while True:
            left = self.steps_per_epoch - self.epoch_step
            n = min(self.chunk_steps, left)
            start = time.perf_counter()
            self.run_steps(n, progress)
            if n == left:
                return True
            seconds = (time.perf_counter() - start) / n
            steady = seconds if steady is None else steady
            if seconds > RECHECK_SLOWDOWN * steady:
                return False

    def _blas_limit(self, count=None):
        """BLAS's limit for a block run with `count` threads (the trainer's count when None): the
        count, or the compiled loop's for it (one where the loop runs threads of its own); no
        limit on a GPU backend (no host BLAS)."""
        if self._blas is None:
            return blas_threads(None)
        count = self.blas_threads if count is None else count
        if self.compiled_steps is not None:
            count = self.compiled_steps.blas_threads(count)
        return blas_threads(count, self._blas)

    def accuracy(self, x, y, batch_size=None):
        """The fraction of rows of device data x whose label y the model predicts (one read),
        batch_size rows at a time (the backend's eval_rows when None), or, batch_size None, by
        the compiled loop's count where it has one (Numba's split steps: on their two threads)."""
        counted = None if batch_size else self._compiled_count(x, y)
        if counted is not None:
            return counted / len(y)
        batch_size = batch_size or self.backend.eval_rows
        correct = 0
        for start in range(0, len(y), batch_size):
            logits = self.model.forward(x[start : start + batch_size])
            correct = correct + self.backend.count_correct(logits, y[start : start + batch_size])
        return int(self.backend.to_numpy(correct)) / len(y)

    def _compiled_count(self, x, y):
        """The compiled loop's count of correct rows where it has one for the trainer's threads
        (Numba's, on the threads of its split steps), else None."""
        steps = self.compiled_steps
        return None if steps is None else steps.count_correct(x, y, self.blas_threads)

    def fit(self, log=print, progress=False, after_epoch=None):
        """Train up to config.epochs and return the history, with the test accuracy.
        log(line) gets each epoch's summary; after_epoch(trainer) runs after each
        (checkpointing). Ctrl-C raises TrainingInterrupted with the state after the last whole
        epoch (the state fit started from, before the first)."""
        start = time.perf_counter()
        self.backend.prepare(self.config.dtype)
        if self.compiled_steps is not None:
            self.compiled_steps.prepare(self.step_losses)
        compile_seconds = time.perf_counter() - start
        if compile_seconds > 0.01:
            log(f"{self.backend.name}: compiled kernels in {compile_seconds:.2f} s (not counted in epoch times)")
        self.last_whole_epoch = self.state()
        try:  # Ctrl-C anywhere from here, between epochs too, saves the last whole epoch
            while self.epoch < self.config.epochs:
                self._fit_epoch(log, progress, after_epoch)
            with self._blas_limit():
                self.history.test_accuracy = self.accuracy(self.test_x, self.test_y)
        except KeyboardInterrupt:
            raise TrainingInterrupted(self.last_whole_epoch) from None
        log(f"Test accuracy: {self.history.test_accuracy:.4f}")
        return self.history

    def _fit_epoch(self, log, progress, after_epoch):
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.epoch_step,
            disable=not progress,
            leave=False,
            unit="batch",
            desc=f"Epoch {self.epoch + 1}",
        )
        with bar:
            self.train_epoch(progress=bar)
        self.last_whole_epoch = self.state()  # what Ctrl-C saves from here on: it resumes exactly
        stats, count = self.history.epochs[-1], self.blas_threads
        threads = f", {count} thread{'s' * (count != 1)}" if self.threads is not None and self._blas is not None else ""
        log(
            f"Epoch {stats.epoch} - Cost: {stats.loss:.4f}, accuracy: {stats.val_accuracy:.4f}"
            f"  ({duration_text(stats.seconds)}, {stats.samples_per_second:,.0f} samples/s{threads})"
        )
        if after_epoch is not None:
            after_epoch(self)
