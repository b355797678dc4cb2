"""`xpnet train`: train, checkpoint, resume, plot."""

import sys
import time

from xpnet.backends import get_backend
from xpnet.data import load_dataset
from xpnet.errors import UsageError, XpnetError
from xpnet.nn.checkpoint import load_checkpoint
from xpnet.nn.train import Diverged, TrainConfig, Trainer, TrainingInterrupted

INTERRUPTED_PATH = "xpnet-interrupted.npz"


def run(args):
    if args.save_every and not args.save:
        raise UsageError("--save-every needs --save PATH")
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
    backend = get_backend(args.backend)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    splits = load_dataset(args.dataset, args.data_dir)
    trainer = Trainer(backend, splits, config, checkpoint)
    config = trainer.config  # a resumed run keeps its checkpoint's settings
    sizes = "-".join(map(str, trainer.model.sizes))
    print(f"Training {sizes} on {backend.name} ({config.dtype}), data from {splits.directory}")
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
