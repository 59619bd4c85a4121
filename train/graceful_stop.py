"""Stop a training run cleanly on Ctrl-C or SIGTERM (a scheduler's preemption notice).

The first SIGINT / SIGTERM only asks the loop to stop: the trainer finishes the iteration (or
offline step) it is in, writes a checkpoint and raises ``flowalign.errors.TrainingStopped``, so ``--resume``
continues exactly where it stopped and nothing already computed is lost. A second signal aborts at
once (``KeyboardInterrupt``), leaving the last periodic checkpoint; a signal of the other kind within
``LAUNCHER_FORWARD_SECONDS`` of the first (Ctrl-C reaches every worker of a torchrun / accelerate launch,
whose launcher then sends SIGTERM) is the same stop.

Handlers are installed only in the main thread (Python delivers signals there) and restored on
exit. With several processes every process checks the flag of all of them at each boundary
(``stop_everywhere``), so they stop at the same iteration and write one consistent checkpoint.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Callable, Optional

import torch

from flowalign.errors import Aborted, TrainingStopped

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# a stop signal of the other kind this soon after the first is the launcher passing the same stop on
LAUNCHER_FORWARD_SECONDS = 5.0


class GracefulStop:
    """Context manager: within it, the first stop signal sets :attr:`signum`; a second raises
    ``KeyboardInterrupt``.

    Example::

        with GracefulStop("iteration") as stop:
            while ...:
                one_iteration()
                if stop.signum is not None:
                    save_checkpoint(); break
    """

    def __init__(self, unit: str = "iteration", signals: tuple = STOP_SIGNALS):
        self.unit = unit
        self.signals = signals
        self.signum: Optional[int] = None
        self._first_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def stopped(self, signum: int, step: int, total: int, checkpoint, resume: str = "--resume") -> TrainingStopped:
        """The error to raise once ``step`` of ``total`` (in :attr:`unit`) is checkpointed at ``checkpoint``; ``resume`` is the
        command that continues it (e.g. ``flowalign train --resume RUN_DIR``: a bare ``--resume`` reads the default
        recipe's folder)."""
        return TrainingStopped(f"stopped by {signal.Signals(signum).name} after {self.unit} {step} of {total}; "
                               f"checkpoint {checkpoint}; continue with {resume}", step, signum, checkpoint)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None:
            if signum != self.signum and time.monotonic() - self._first_at < LAUNCHER_FORWARD_SECONDS:
                # Ctrl-C in a terminal reaches every worker of a torchrun / accelerate launch, and the launcher then
                # SIGTERMs them: the same stop, not a second one
                logger.info("%s right after %s: taken as the launcher forwarding the same stop", signal.Signals(signum).name,
                            signal.Signals(self.signum).name)
                return
            raise Aborted(f"second {signal.Signals(signum).name}: aborting without a checkpoint", signum)
        self.signum = signum
        self._first_at = time.monotonic()
        logger.warning("%s: stopping after this %s with a checkpoint (resume with --resume); send it again to abort now",
                       signal.Signals(signum).name, self.unit)


def stop_everywhere(signum: Optional[int], gather: Callable[[torch.Tensor], torch.Tensor]) -> Optional[int]:
    """The stop signal if any process received one (``gather`` collects a tensor from every
    process; the identity with one), else None. Every process must call it at the same boundary."""
    flags = gather(torch.tensor([signum or 0], dtype=torch.long))
    received = int(flags.max())
    return received or None
