"""The training loop, the same on every backend.

Data flow: the normalised training set moves to the backend once; each epoch a permutation
from the host generator moves once; each step gathers its batch where the data lives, runs
forward, loss, backward and update, and adds the batch's loss to a device-side sum that is
read back once per epoch. So the GPU never waits on the host inside an epoch, and every
backend with the same seed starts from the same weights and sees the same batches.
"""

import math
import time
from dataclasses import dataclass, field

import numpy

from xpnet.errors import XpnetError
from xpnet.nn.loss import SoftmaxCrossEntropy
from xpnet.nn.model import MLP
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


class Trainer:
    """Owns the model, the loss, the optimiser and the device-resident data of one run."""

    def __init__(self, backend, splits, config):
        self.backend, self.config = backend, config
        train_images = splits.train.images
        self.rng = numpy.random.default_rng(config.seed)
        pixels = train_images.astype(numpy.float64)
        n_inputs = pixels[0].size
        n_classes = int(max(splits.train.labels.max(), splits.test.labels.max())) + 1
        self.model = MLP(
            backend, [n_inputs, *config.hidden, n_classes], dtype=config.dtype,
            mean=pixels.mean(), std=pixels.std(), rng=self.rng,
        )
        self.loss = SoftmaxCrossEntropy(backend)
        self.optimizer = SGD(backend, self.model.parameters(), config.lr)
        self.train_x, self.train_y = self._to_device(splits.train)
        self.val_x, self.val_y = self._to_device(splits.validation)
        self.test_x, self.test_y = self._to_device(splits.test)

    def _to_device(self, split):
        return (
            self.backend.asarray(self.model.normalize(split.images)),
            self.backend.asarray(split.labels.astype(numpy.int64)),
        )

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
            rows = order[start:start + size]
            n = len(rows)
            yield (
                backend.take_rows(self.train_x, rows, out=x_buffer[:n]),
                backend.take_rows(self.train_y, rows, out=y_buffer[:n]),
            )

    def train_epoch(self):
        """One pass over the training set; returns the mean loss (read back once)."""
        order = self.backend.asarray(self.rng.permutation(len(self.train_y)))
        loss_sum = 0.0
        for x, y in self.batches(order):
            loss_sum = loss_sum + self.step(x, y) * len(y)
        return float(self.backend.to_numpy(loss_sum)) / len(self.train_y)

    def accuracy(self, x, y, batch_size=2048):
        correct = 0
        for start in range(0, len(y), batch_size):
            logits = self.model.forward(x[start:start + batch_size])
            correct = correct + self.backend.count_correct(logits, y[start:start + batch_size])
        return int(self.backend.to_numpy(correct)) / len(y)

    def fit(self, log=print):
        history = History()
        n = len(self.train_y)
        for epoch in range(1, self.config.epochs + 1):
            self.backend.synchronize()
            start = time.perf_counter()
            loss = self.train_epoch()
            self.backend.synchronize()
            seconds = time.perf_counter() - start
            if not math.isfinite(loss):
                raise XpnetError(
                    f"training diverged in epoch {epoch} (loss {loss}); try a smaller --lr than {self.config.lr}"
                )
            stats = EpochStats(epoch, loss, self.accuracy(self.val_x, self.val_y), seconds, n / seconds)
            history.epochs.append(stats)
            log(
                f"Epoch {epoch} - Cost: {stats.loss:.4f}, accuracy: {stats.val_accuracy:.4f}"
                f"  ({stats.seconds:.2f} s, {stats.samples_per_second:,.0f} samples/s)"
            )
        history.test_accuracy = self.accuracy(self.test_x, self.test_y)
        log(f"Test accuracy: {history.test_accuracy:.4f}")
        return history
