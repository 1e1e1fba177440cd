"""Stopping cleanly on SIGTERM (preemption) or a first Ctrl-C, and at once on a second Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from fmnist_jax.errors import UserError

logger = logging.getLogger(__name__)


class Interrupted(UserError):
    """Training stopped on a signal after saving; `exit_code` is what the process should return."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Turns SIGTERM and the first SIGINT into a flag the training loop polls after each dispatch.

    A dispatch runs at most `steps_per_dispatch` steps, well under a second on CPU
    for the default model, and the loop saves as soon as it returns.

    A second SIGINT raises KeyboardInterrupt at once. Finished checkpoints survive
    that, because Orbax only renames a checkpoint into place once it is complete.
    Handlers are installed only in the main thread, where Python allows it.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_code(self) -> int:
        # 128 + SIGINT is the shell's code for Ctrl-C. After SIGTERM the job saved and can be
        # resumed, so it exits 0 like any clean shutdown a preempting scheduler requests.
        return 130 if self.signal_name == "SIGINT" else 0

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = name
        logger.warning("%s received: saving after the steps in flight, then exiting "
                       "(press Ctrl-C again to abort without saving)", name)
