"""`xpnet train`: train, checkpoint, resume, plot."""

import sys
import time

from xpnet.backends import get_backend
from xpnet.cli import UsageError
from xpnet.data.download import prepare_data_dir
from xpnet.data.mnist import load_splits
from xpnet.errors import XpnetError
from xpnet.nn.checkpoint import load_checkpoint
from xpnet.nn.train import Diverged, TrainConfig, Trainer, TrainingInterrupted

INTERRUPTED_PATH = "xpnet-interrupted.npz"


def run(args):
    if args.save_every and not args.save:
        raise UsageError("--save-every needs --save PATH")
    if args.nesterov and not args.momentum > 0:
        raise UsageError("--nesterov needs --momentum above 0, e.g. --momentum 0.9")
    backend = get_backend(args.backend)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    data_dir = prepare_data_dir(args.data_dir, args.dataset)
    splits = load_splits(data_dir)
    config = TrainConfig(
        args.epochs,
        args.batch_size,
        args.lr,
        args.hidden,
        args.seed,
        args.dtype,
        args.momentum,
        args.nesterov,
        args.weight_decay,
        args.schedule,
    )
    trainer = Trainer(backend, splits, config, checkpoint)
    config = trainer.config  # a resumed run keeps its checkpoint's settings
    compile_seconds = backend.prepare(config.dtype)
    if compile_seconds:
        print(f"{backend.name}: compiled kernels in {compile_seconds:.2f} s (not counted in epoch times)")
    sizes = "-".join(map(str, trainer.model.sizes))
    print(f"Training {sizes} on {backend.name} ({config.dtype}), data from {data_dir}")
    if checkpoint is not None:
        print(f"Resuming {args.resume} after epoch {trainer.epoch}, up to epoch {config.epochs}")

    def after_epoch(trainer):
        if args.save_every and trainer.epoch % args.save_every == 0 and trainer.epoch < config.epochs:
            trainer.last_whole_epoch.save(args.save)  # the state fit just took after this epoch

    first_epoch = trainer.epoch
    start = time.perf_counter()
    try:
        history = trainer.fit(progress=sys.stdout.isatty() and not args.quiet, after_epoch=after_epoch)
    except TrainingInterrupted as interrupted:
        path = args.save or INTERRUPTED_PATH
        interrupted.checkpoint.save(path)
        done = interrupted.checkpoint.epoch
        print(
            f"xpnet: interrupted; saved the state after epoch {done} to {path}. "
            f"Resume with: xpnet train --backend {backend.name} --resume {path} --epochs {config.epochs}",
            file=sys.stderr,
        )
        return 130
    except Diverged as exc:
        kept = f"; the last good checkpoint, {args.save}, is kept" if args.save and args.save_every else ""
        raise XpnetError(f"{exc}{kept}") from None
    epoch_seconds = sum(e.seconds for e in history.epochs[first_epoch:])
    print(
        f"Training time: {epoch_seconds:.1f} s in epochs ({time.perf_counter() - start:.1f} s with validation and test)"
    )
    if args.save:
        trainer.last_whole_epoch.save(args.save)
        print(f"Saved checkpoint to {args.save}")
    if args.plot:
        from xpnet.plots import plot_history

        plot_history(history, args.plot)
        print(f"Wrote {args.plot}")
    return 0
