#!/usr/bin/env python3
"""Train the Fashion-MNIST CNN, or resume the latest run with --resume.

Examples:
  python scripts/train.py                      # the default preset, into ckpts/<run>/
  python scripts/train.py --resume             # continue the latest run where it stopped
  python scripts/train.py --resume --epochs 40 --lr 3e-4 --schedule cosine
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from fmnist_jax import cli  # noqa: E402
from fmnist_jax import config as config_lib  # noqa: E402
from fmnist_jax import runs  # noqa: E402
from fmnist_jax.errors import UserError  # noqa: E402
from fmnist_jax.interrupt import Interrupted  # noqa: E402

# Flag, config field, type and help text of every setting a preset provides.
CONFIG_FLAGS = [
    ("--epochs", "epochs", int, "total epochs of the run, counted from the start, not extra ones"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--schedule", "schedule", str, "learning-rate schedule: " + ", ".join(config_lib.SCHEDULES)),
    ("--warmup", "warmup_epochs", float, "warmup length in epochs, for warmup_cosine"),
    ("--optimizer", "optimizer", str, "optimizer: " + ", ".join(config_lib.OPTIMIZERS)),
    ("--weight-decay", "weight_decay", float, "weight decay (adamw, sgd)"),
    ("--momentum", "momentum", float, "momentum (sgd)"),
    ("--batch-size", "batch_size", int, "global batch size"),
    ("--width", "width", int, "filters per convolution"),
    ("--augment", "augment", str, "augmentation: " + ", ".join(config_lib.AUGMENTATIONS)),
    ("--seed", "seed", int, "seed of initialisation, data order and augmentation"),
    ("--val-split", "val_split", int, "training examples held out for validation (0: none)"),
    ("--train-examples", "train_examples", int, "train on the first N examples only (0: all)"),
    ("--keep", "keep", int, "most recent checkpoints to keep"),
    ("--save-every-steps", "save_every_steps", int, "also save every N steps (0: epoch ends only)"),
    ("--save-every-minutes", "save_every_minutes", float, "also save every M minutes (0: off)"),
    ("--steps-per-dispatch", "steps_per_dispatch", int, "training steps per compiled call"),
    ("--conv", "conv", str, "convolution: " + ", ".join(config_lib.CONV_IMPLEMENTATIONS)),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--preset", default="default", choices=sorted(config_lib.PRESETS),
                     help="starting settings of a new run (default: %(default)s)")
    run.add_argument("--resume", action="store_true",
                     help="continue the latest run, or --run NAME, from its checkpoint "
                          "(default: off); with no checkpoint, start fresh")
    run.add_argument("--resume-from", default="latest",
                     help="checkpoint to resume: latest, best or a step number (default: %(default)s)")
    run.add_argument("--run", help="run folder name under --ckpt-dir "
                                   "(default: a new timestamped name, or the latest run with --resume)")
    run.add_argument("--ckpt-dir", type=pathlib.Path, default=runs.DEFAULT_ROOT,
                     help="checkpoint root folder (default: %(default)s)")
    run.add_argument("--data-source", default="idx", choices=("idx", "tfds"),
                     help="read IDX files, or use tensorflow-datasets (default: %(default)s)")
    run.add_argument("--data-dir", help="folder of the four Fashion-MNIST .gz files; for tfds, "
                                        "its manual_dir (default: search, then download)")
    run.add_argument("--stop-at-step", type=int,
                     help="save and exit once the run reaches this step, as on SIGTERM "
                          "(default: off)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG figures (default: off)")
    run.add_argument("--no-progress", action="store_true",
                     help="hide the progress bars (default: off)")

    preset = config_lib.PRESETS["default"]
    settings = parser.add_argument_group(
        "settings", "Unset flags take the preset's value, or on --resume the saved value.")
    for flag, field, kind, text in CONFIG_FLAGS:
        settings.add_argument(flag, dest=field, type=kind, default=None,
                              help=f"{text} (default preset: {getattr(preset, field)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging()
    overrides = cli.config_overrides(args, CONFIG_FLAGS)
    try:
        # Log lines go through tqdm, so they do not break a progress bar in the middle.
        with logging_redirect_tqdm():
            runs.launch(args.preset, overrides, root=args.ckpt_dir, run_name=args.run,
                        resume=args.resume, resume_from=args.resume_from,
                        data_source=args.data_source, data_dir=args.data_dir,
                        show_progress=not args.no_progress, draw_plots=not args.no_plots,
                        stop_at_step=args.stop_at_step)
    except Interrupted as stopped:
        print(stopped, file=sys.stderr)
        return stopped.exit_code
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
