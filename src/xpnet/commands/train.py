"""`xpnet train`: train, checkpoint, resume, plot."""

import os
import shlex
import signal
import sys
import time

from xpnet.backends import get_backend
from xpnet.commands import check_outputs
from xpnet.data import load_dataset
from xpnet.data.download import AnotherDataset
from xpnet.data.mnist import resolve_data_dir
from xpnet.errors import UsageError, XpnetError
from xpnet.nn.checkpoint import load_checkpoint
from xpnet.nn.config import TrainConfig, run_settings, setting_flag
from xpnet.nn.train import Diverged, Trainer, TrainingInterrupted
from xpnet.threads import AUTO

INTERRUPTED_PATH = "xpnet-interrupted.npz"


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM both stop training at once and save the last whole epoch.
    The first signal ignores any that follow, so a second Ctrl-C cannot cut the save short.
    A SIGINT ignored from the start (a job started in the background) stays ignored."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for number, handler in self.previous.items():
            if handler is not signal.SIG_IGN:
                signal.signal(number, self._stop)
        return self

    def _stop(self, number, frame):
        self.received = number
        self.hold()
        raise KeyboardInterrupt

    def hold(self):
        """Ignore both signals until the block ends: the writes that follow always finish."""
        for number in self.previous:
            signal.signal(number, signal.SIG_IGN)

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def resume_command(args, backend, path, config, dataset):
    """The command that continues this run, whole: it names the interpreter rather than
    `xpnet` (which need not be on PATH), the checkpoint, and where the data came from."""
    command = [sys.executable, "-m", "xpnet", "train", "--backend", backend.name, "--resume", os.path.abspath(path)]
    command += ["--epochs", str(config.epochs), "--dataset", dataset, "--save", os.path.abspath(path)]
    data_dir, named = resolve_data_dir(args.data_dir, dataset)
    if named:
        command += ["--data-dir", os.path.abspath(data_dir)]
    if args.save_every:
        command += ["--save-every", str(args.save_every)]
    if args.threads != AUTO:  # the same count, so the rest of the run rounds as it would have
        command += ["--threads", str(args.threads)]
    return shlex.join(command)


def run(args):
    if args.save_every and not args.save:
        raise UsageError("--save-every needs --save PATH")
    check_outputs(args, "--save", "--plot")
    config = TrainConfig(epochs=args.epochs, **{name: getattr(args, name) for name in run_settings()})
    checkpoint = None
    if args.resume and args.recipe:
        raise UsageError("--resume continues the run with its own settings; drop --recipe")
    if args.resume:
        # A resumed run keeps its checkpoint's settings, so none may be given with --resume.
        given = [name for name in run_settings() if getattr(config, name) != getattr(TrainConfig(), name)]
        if given:
            flags = ", ".join(map(setting_flag, given))
            raise UsageError(f"--resume continues the run with its own settings; drop {flags}")
        checkpoint = load_checkpoint(args.resume)
        if checkpoint.epoch >= args.epochs:
            raise UsageError(
                f"{args.resume} is already at epoch {checkpoint.epoch}; pass --epochs above it to train on"
            )
    dataset = args.dataset or (checkpoint and checkpoint.dataset) or "mnist"
    if checkpoint is not None and checkpoint.dataset and dataset != checkpoint.dataset:
        raise UsageError(f"{args.resume} was trained on {checkpoint.dataset}, not {dataset}; drop --dataset")
    backend = get_backend(args.backend)
    try:
        splits = load_dataset(dataset, args.data_dir)
    except AnotherDataset as exc:
        if args.dataset or checkpoint is None:
            raise
        raise exc.fixed(f"{args.resume} was trained on {dataset}") from None
    trainer = Trainer(backend, splits, config, checkpoint, threads=args.threads)
    config = trainer.config  # a resumed run keeps its checkpoint's settings
    sizes = "-".join(map(str, trainer.model.sizes))
    print(f"Training {sizes} on {backend.name} ({config.dtype}), data from {splits.directory}")
    if args.recipe:
        print(
            f"Recipe {args.recipe} (`xpnet recipes {args.recipe}` says what it is): on {len(splits.train):,} "
            f"training images, with {len(splits.validation):,} held out for validation"
        )
    if config.batch_size > len(splits.train):
        print(
            f"Batch size {config.batch_size:,} is more than the {len(splits.train):,} training images: "
            "each step takes them all (full-batch gradient descent)"
        )
    if checkpoint is not None:
        print(f"Resuming {args.resume} after epoch {trainer.epoch}, up to epoch {config.epochs}")

    def after_epoch(trainer):
        if args.save_every and trainer.epoch % args.save_every == 0 and trainer.epoch < config.epochs:
            trainer.last_whole_epoch.save(args.save)  # the state fit just took after this epoch

    first_epoch = trainer.epoch
    start = time.perf_counter()
    with StopSignals() as signals:
        try:
            history = trainer.fit(progress=sys.stdout.isatty() and not args.quiet, after_epoch=after_epoch)
        except TrainingInterrupted as interrupted:
            path = args.save or INTERRUPTED_PATH
            interrupted.checkpoint.save(path)
            print(
                f"xpnet: {'terminated' if signals.received == signal.SIGTERM else 'interrupted'}; saved the state "
                f"after epoch {interrupted.checkpoint.epoch} to {path}. "
                f"Resume with: {resume_command(args, backend, path, config, dataset)}",
                file=sys.stderr,
            )
            return 128 + signals.received
        except Diverged as exc:
            kept = f"; the last good checkpoint, {args.save}, is kept" if args.save and args.save_every else ""
            raise XpnetError(f"{exc}{kept}") from None
        signals.hold()  # training is done: what follows writes its results, and nothing may cut that short
        epoch_seconds = sum(e.seconds for e in history.epochs[first_epoch:])
        print(
            f"Training time: {epoch_seconds:.1f} s in epochs "
            f"({time.perf_counter() - start:.1f} s in all, with compiling, validation and test)"
        )
        if args.save:
            trainer.last_whole_epoch.save(args.save)
            print(f"Saved checkpoint to {args.save}")
        if args.plot:
            from xpnet.plots import plot_history

            plot_history(history, args.plot)
            print(f"Wrote {args.plot}")
    return 0
