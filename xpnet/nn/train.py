"""The training loop, the same on every backend.

Data flow: the normalised training set moves to the backend once; each epoch a permutation
from the host generator moves once; each step gathers its batch where the data lives, runs
forward, loss, backward and update, and stores the batch's loss in a device-side array that
is read back once per epoch. So the GPU never waits on the host inside an epoch, every
backend with the same seed starts from the same weights and sees the same batches, and a
NaN can still be traced to the step where it first appeared.
"""

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy
from tqdm import tqdm

from xpnet.errors import DataError, XpnetError
from xpnet.nn.checkpoint import Checkpoint
from xpnet.nn.loss import SoftmaxCrossEntropy
from xpnet.nn.model import MLP, pixel_statistics
from xpnet.nn.optim import SGD

# The seed recipe used lr 1e-4 on the summed gradient of batches of 512; on the mean loss
# that is the same step, 1e-4 * 512.
SEED_LR = 1e-4 * 512


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 512
    lr: float = SEED_LR
    hidden: tuple = (200,)
    seed: int = 0
    dtype: str = "float32"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"


@dataclass
class EpochStats:
    epoch: int
    loss: float
    val_accuracy: float
    seconds: float
    samples_per_second: float


@dataclass
class History:
    epochs: list = field(default_factory=list)
    test_accuracy: float = math.nan


class Diverged(XpnetError):
    pass


class TrainingInterrupted(Exception):
    """Ctrl-C; carries the state after the last whole epoch, from which a resume is exact."""

    def __init__(self, checkpoint):
        super().__init__(f"interrupted after epoch {checkpoint.epoch}")
        self.checkpoint = checkpoint


class Trainer:
    """Owns the model, the loss, the optimiser and the device-resident data of one run."""

    def __init__(self, backend, splits, config, checkpoint=None):
        if checkpoint is not None:  # the run's own settings; only the number of epochs may change
            config = dataclasses.replace(checkpoint.train_config(TrainConfig), epochs=config.epochs)
        self.backend, self.config = backend, config
        self.rng = numpy.random.default_rng(config.seed)
        n_classes = int(max(splits.train.labels.max(), splits.test.labels.max())) + 1
        mean, std = pixel_statistics(splits.train.images)
        self.model = MLP(
            backend,
            [splits.train.images[0].size, *config.hidden, n_classes],
            dtype=config.dtype,
            mean=mean,
            std=std,
            rng=self.rng,
        )
        self.loss = SoftmaxCrossEntropy(backend)
        self.train_x, self.train_y = self._to_device(splits.train)
        self.val_x, self.val_y = self._to_device(splits.validation)
        self.test_x, self.test_y = self._to_device(splits.test)
        self.steps_per_epoch = -(-len(self.train_y) // config.batch_size)
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
        self.history = History()
        self.epoch = 0
        if checkpoint is not None:
            self.restore(checkpoint)

    def _to_device(self, split):
        return (
            self.backend.asarray(self.model.normalize(split.images)),
            self.backend.asarray(split.labels.astype(numpy.int64)),
        )

    # -- state ------------------------------------------------------------------------------
    def state(self):
        """Everything needed to continue this run exactly, copied to the host."""
        to_host = self.backend.to_numpy
        return Checkpoint(
            config=dataclasses.asdict(self.config),
            sizes=self.model.sizes,
            mean=self.model.mean,
            std=self.model.std,
            epoch=self.epoch,
            optimizer_steps=self.optimizer.steps_taken,
            rng_state=self.rng.bit_generator.state,
            history=[dataclasses.asdict(e) for e in self.history.epochs],
            params=[to_host(p.value).copy() for p in self.model.parameters()],
            velocities=[to_host(v).copy() for v in self.optimizer.velocities if v is not None],
        )

    def restore(self, checkpoint):
        if checkpoint.sizes != self.model.sizes:
            raise DataError(
                f"the checkpoint's network is {'-'.join(map(str, checkpoint.sizes))} but this data needs "
                f"{'-'.join(map(str, self.model.sizes))}; resume with the dataset it was trained on"
            )
        checkpoint.load_into(self.model)
        for velocity, saved in zip((v for v in self.optimizer.velocities if v is not None), checkpoint.velocities):
            velocity[...] = self.backend.asarray(saved)
        self.optimizer.steps_taken = checkpoint.optimizer_steps
        self.rng.bit_generator.state = checkpoint.rng_state
        self.history.epochs = [EpochStats(**e) for e in checkpoint.history]
        self.epoch = checkpoint.epoch

    # -- training ---------------------------------------------------------------------------
    def step(self, x, y):
        """One SGD step on a batch; returns its mean loss as a 0-d backend array."""
        loss = self.loss.forward(self.model.forward(x), y)
        self.model.backward(self.loss.backward())
        self.optimizer.step()
        return loss

    def batches(self, order):
        """(x, y) views of each mini-batch in the given device-side order."""
        backend, size = self.backend, self.config.batch_size
        x_buffer = backend.empty((size, self.train_x.shape[1]), self.train_x.dtype)
        y_buffer = backend.empty((size,), self.train_y.dtype)
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            n = len(rows)
            yield (
                backend.take_rows(self.train_x, rows, out=x_buffer[:n]),
                backend.take_rows(self.train_y, rows, out=y_buffer[:n]),
            )

    def train_epoch(self, progress=False):
        """One pass over the training set; returns the mean loss, or raises Diverged naming
        the first step whose loss was not finite."""
        n = len(self.train_y)
        order = self.backend.asarray(self.rng.permutation(n))
        bar = tqdm(
            total=self.steps_per_epoch, disable=not progress, leave=False, unit="batch", desc=f"Epoch {self.epoch + 1}"
        )
        # Overflow is caught below and reported with its step; NumPy's own warnings would only
        # repeat it, once per op, as noise.
        with bar, numpy.errstate(over="ignore", invalid="ignore"):
            for i, (x, y) in enumerate(self.batches(order)):
                self.step_losses[i : i + 1] = self.step(x, y)  # array to array: `[i] =` may pass through a host float
                bar.update()
        losses = self.backend.to_numpy(self.step_losses).astype(numpy.float64)
        bad = numpy.flatnonzero(~numpy.isfinite(losses))
        if len(bad):
            raise Diverged(
                f"training diverged in epoch {self.epoch + 1} at step {bad[0] + 1} of {self.steps_per_epoch} "
                f"(loss {losses[bad[0]]}); try a smaller --lr than {self.config.lr:g}"
            )
        batch_sizes = numpy.minimum(self.config.batch_size, n - self.config.batch_size * numpy.arange(len(losses)))
        return float(losses @ batch_sizes) / n

    def accuracy(self, x, y, batch_size=2048):
        correct = 0
        for start in range(0, len(y), batch_size):
            logits = self.model.forward(x[start : start + batch_size])
            correct = correct + self.backend.count_correct(logits, y[start : start + batch_size])
        return int(self.backend.to_numpy(correct)) / len(y)

    def fit(self, log=print, progress=False, after_epoch=None):
        """Train up to config.epochs; after_epoch(trainer) runs after each (checkpointing)."""
        n = len(self.train_y)
        self.last_whole_epoch = self.state()
        while self.epoch < self.config.epochs:
            try:
                self._run_epoch(n, log, progress, after_epoch)
            except KeyboardInterrupt:
                raise TrainingInterrupted(self.last_whole_epoch) from None
        self.history.test_accuracy = self.accuracy(self.test_x, self.test_y)
        log(f"Test accuracy: {self.history.test_accuracy:.4f}")
        return self.history

    def _run_epoch(self, n, log, progress, after_epoch):
        self.backend.synchronize()
        start = time.perf_counter()
        loss = self.train_epoch(progress)
        self.backend.synchronize()
        seconds = time.perf_counter() - start
        self.epoch += 1
        stats = EpochStats(self.epoch, loss, self.accuracy(self.val_x, self.val_y), seconds, n / seconds)
        self.history.epochs.append(stats)
        self.last_whole_epoch = self.state()  # what Ctrl-C saves from here on: it resumes exactly
        log(
            f"Epoch {stats.epoch} - Cost: {stats.loss:.4f}, accuracy: {stats.val_accuracy:.4f}"
            f"  ({stats.seconds:.2f} s, {stats.samples_per_second:,.0f} samples/s)"
        )
        if after_epoch is not None:
            after_epoch(self)
