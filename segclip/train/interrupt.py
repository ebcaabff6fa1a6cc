"""Stopping a training run gently on Ctrl-C (SIGINT) or SIGTERM (what cluster schedulers send).

NOTE: [stopping at a step boundary] While a training step runs, the first SIGINT or SIGTERM only
sets :attr:`StopSignal.signum`; the engine finishes the step and the epoch loop stops there, so the
trainer can save a checkpoint of that exact position (model, optimizer, schedule, RNG states and
the epoch's partial summary) and a resume continues with the next step, losing no work. Under DDP
the flag rides along the step's one all-reduce, so every rank stops after the same step. Outside a
step (evaluation, a checkpoint save, setup), or on a second SIGINT (the user insists), the signal
raises :class:`segclip.cli.Interrupted` (a ``KeyboardInterrupt``) at once; a further SIGTERM while
a stop is pending is ignored (torchrun and schedulers follow SIGINT with SIGTERM; SIGKILL comes
later if the process does not end).

DataLoader workers ignore SIGINT (:func:`ignore_in_worker`): a Ctrl-C reaches the whole process
group, and a worker that died of it would turn the gentle stop into "DataLoader worker exited
unexpectedly"; the main process decides, and shuts the workers down. They keep SIGTERM's default,
because that is how their parent ends them (``multiprocessing`` terminates daemonic children at
exit). A SIGTERM sent to the whole group (a scheduler cancelling a job) can therefore kill a
worker; the trainer then treats the loader's error as the interruption it is.
"""

from __future__ import annotations

import signal

from segclip.cli import Interrupted  # the one exception every command ends an interruption with

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    """Installs the SIGINT/SIGTERM handlers for a training run (a context manager; a no-op where
    signals cannot be set, i.e. outside the main thread). The trainer sets ``deferring`` while an
    epoch trains; the engine sets ``in_step`` while a step runs (a state that cannot be saved)."""

    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self.in_step = False
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.deferring and self.signum is None:
            self.signum = signum
            return
        if self.deferring and signum == signal.SIGTERM:
            return  # a stop is already under way
        raise Interrupted(signum)

    def __enter__(self):
        try:
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the worker ignores SIGINT (see the module doc)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def exit_status(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
    return 128 + int(signum)
