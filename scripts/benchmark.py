#!/usr/bin/env python3
"""Time training epochs of a preset, optionally against the PyTorch peer, and print one JSON object.

Examples:
  python scripts/benchmark.py --preset original --peer --rounds 3
  python scripts/benchmark.py --augment trivial --compare-augment
  python scripts/benchmark.py --checkpoint-overhead
  python scripts/benchmark.py --preset default --time-to-accuracy 0.90
"""

from __future__ import annotations

import time

# Taken before the imports below, so that the time to accuracy includes importing JAX.
STARTED = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fmnist_jax import benchmark  # noqa: E402
from fmnist_jax import cli  # noqa: E402
from fmnist_jax import config as config_lib  # noqa: E402
from fmnist_jax.errors import UserError  # noqa: E402

# Flag, config field, type and help text of each setting that overrides the preset.
CONFIG_FLAGS = [
    ("--width", "width", int, "filters per convolution"),
    ("--batch-size", "batch_size", int, "global batch size"),
    ("--augment", "augment", str, "augmentation: " + ", ".join(config_lib.AUGMENTATIONS)),
    ("--conv", "conv", str, "convolution: " + ", ".join(config_lib.CONV_IMPLEMENTATIONS)),
    ("--steps-per-dispatch", "steps_per_dispatch", int, "training steps per compiled call"),
    ("--train-examples", "train_examples", int, "train on the first N examples only (0: all)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="original", choices=sorted(config_lib.PRESETS),
                        help="recipe to time (default: %(default)s, the recipe the peer runs)")
    parser.add_argument("--data-dir", help="folder of the four Fashion-MNIST .gz files, also passed "
                                           "to the peer (default: $FMNIST_DATA_DIR, the Debian "
                                           "package folder, the cache folder, then download; "
                                           "the peer then uses its own default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed epochs of each variant, after one warm-up epoch (default: 3)")

    parser.add_argument("--peer", action="store_true",
                        help="alternate each round with one epoch of the PyTorch peer (default: off)")
    parser.add_argument("--peer-script", type=pathlib.Path,
                        default=REPO.parent / "shared" / "bench" / "torch_peer.py",
                        help="the PyTorch peer script (default: %(default)s)")
    parser.add_argument("--peer-max-epochs", type=int, default=100,
                        help="maximum epochs of the peer's time-to-accuracy run (default: 100)")

    parser.add_argument("--compare-augment", action="store_true",
                        help="alternate epochs without and with --augment, and report the time "
                             "ratio (default: off)")
    parser.add_argument("--checkpoint-overhead", action="store_true",
                        help="alternate epochs without and with an asynchronous Orbax save "
                             "writing during them, and report the overhead in percent "
                             "(default: off)")
    parser.add_argument("--time-to-accuracy", type=float, metavar="ACCURACY",
                        help="run the trainer for the preset's epochs and report the seconds "
                             "from process start until the test accuracy first reached "
                             "ACCURACY, such as 0.90; runs alone (default: off)")

    settings = parser.add_argument_group("settings", "Unset flags take the preset's value.")
    for flag, field, kind, text in CONFIG_FLAGS:
        settings.add_argument(flag, dest=field, type=kind, default=None, help=text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.configure_logging()
    overrides = cli.config_overrides(args, CONFIG_FLAGS)
    options = benchmark.Options(
        preset=args.preset, overrides=overrides, data_dir=args.data_dir, rounds=args.rounds,
        peer_script=args.peer_script if args.peer else None,
        compare_augment=args.compare_augment, checkpoint_overhead=args.checkpoint_overhead,
        target_accuracy=args.time_to_accuracy, peer_max_epochs=args.peer_max_epochs,
        started=STARTED)
    try:
        result = benchmark.run(options)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
