"""Trainer.fit: epochs until the config's last, with a progress bar, a line per epoch, a hook
after each (checkpointing), and Ctrl-C turned into the state after the last whole epoch."""

import time

from tqdm import tqdm

from xpnet.errors import is_interrupt


class TrainingInterrupted(Exception):
    """Ctrl-C; carries the state after the last whole epoch, from which a resume is exact."""

    def __init__(self, checkpoint):
        super().__init__(f"interrupted after epoch {checkpoint.epoch}")
        self.checkpoint = checkpoint


def duration_text(seconds):
    """'12.35 s', or three digits of milliseconds below a second ('270 ms', '8.38 ms'): a CPU
    epoch takes a tenth of a second, a GPU one a few milliseconds."""
    milliseconds = seconds * 1e3
    return f"{milliseconds:.3g} ms" if milliseconds < 999.5 else f"{seconds:.2f} s"


def fit_trainer(trainer, log=print, progress=False, after_epoch=None):
    """Train up to trainer.config.epochs and return the history, with the test accuracy (see
    Trainer.fit)."""
    start = time.perf_counter()
    trainer.prepare()
    compile_seconds = time.perf_counter() - start
    if compile_seconds > 0.01:
        log(f"{trainer.backend.name}: compiled kernels in {compile_seconds:.2f} s (not counted in epoch times)")
    trainer.last_whole_epoch = trainer.state()
    try:  # Ctrl-C anywhere from here, between epochs too, saves the last whole epoch
        while trainer.epoch < trainer.config.epochs:
            _fit_epoch(trainer, log, progress, after_epoch)
        trainer.history.test_accuracy = trainer.test_accuracy()
    except BaseException as exc:
        if not is_interrupt(exc):
            raise
        raise TrainingInterrupted(trainer.last_whole_epoch) from None
    log(f"Test accuracy: {trainer.history.test_accuracy:.4f}")
    return trainer.history


def _fit_epoch(trainer, log, progress, after_epoch):
    bar = tqdm(
        total=trainer.steps_per_epoch,
        initial=trainer.epoch_step,
        disable=not progress,
        leave=False,
        unit="batch",
        desc=f"Epoch {trainer.epoch + 1}",
    )
    with bar:
        trainer.train_epoch(progress=bar)
    trainer.last_whole_epoch = trainer.state()  # what Ctrl-C saves from here on: it resumes exactly
    stats, threads = trainer.history.epochs[-1], trainer.threads_in_use()
    threads = "" if threads is None else f", {threads} thread{'s' * (threads != 1)}"
    log(
        f"Epoch {stats.epoch} - Cost: {stats.loss:.4f}, accuracy: {stats.val_accuracy:.4f}"
        f"  ({duration_text(stats.seconds)}, {stats.samples_per_second:,.0f} samples/s{threads})"
    )
    if after_epoch is not None:
        after_epoch(trainer)
