"""Stop signals of the command-line programs: Ctrl-C, SIGTERM and the drain request.

Importing Hydra, Ray and MLflow and composing the config take up to two seconds before a
program reaches its own handling of these signals. With Python's defaults, a Ctrl-C in
that time ends in a traceback from inside an import, SIGTERM ends the process with status
143 and SIGUSR1 (the sweep's drain request) with status 138. A program that calls
:func:`handle_stop_signals` first and runs its imports and its work inside
:func:`exit_quietly_when_stopped` stops with one line and status 130 at any time instead.

Only the standard library is imported here, so that the handlers are in place before the
slow imports start.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

# The signal that makes a sweep drain. Ray Tune stops a run gracefully on it too, and Slurm
# sends it ahead of a job's time limit with `#SBATCH --signal=B:USR1@SECONDS`.
DRAIN_SIGNAL = signal.SIGUSR1
# The exit status of a program stopped by Ctrl-C or SIGTERM, as a shell reports Ctrl-C.
EXIT_INTERRUPTED = 130

# Set by DRAIN_SIGNAL between handle_stop_signals and a sweep's drain block
# (saffu.launch.drain_on_signal), which then drains the sweep as soon as it starts.
drain_requested = threading.Event()
# Set by Ctrl-C or SIGTERM after handle_stop_signals. Python drops a KeyboardInterrupt
# raised inside a finalizer or weakref callback ("Exception ignored in ..."), so
# exit_quietly_when_stopped also reads this.
stop_requested = threading.Event()


def handle_stop_signals(drain: bool = False) -> None:
    """For the rest of the process, make SIGTERM raise KeyboardInterrupt as Ctrl-C does, and
    both set `stop_requested`. With `drain`, make DRAIN_SIGNAL set `drain_requested` instead
    of ending the process (its default action). Call it in the main thread, before the slow
    imports."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # A shell's `&` ignores Ctrl-C.
        signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if drain:
        signal.signal(DRAIN_SIGNAL, lambda signum, frame: drain_requested.set())


def _raise_interrupt(signum: int, frame: object) -> None:
    stop_requested.set()
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def exit_quietly_when_stopped(message: str) -> Iterator[None]:
    """Turn a KeyboardInterrupt that leaves the block, or an error that one caused, into
    ``error: MESSAGE`` on stderr and exit status 130. So does a block that ends normally
    after Python dropped the interrupt of a stop signal. Other errors and SystemExit pass."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) and error.code in (0, None, EXIT_INTERRUPTED):
            raise
        if interrupt_behind(error) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if stop_requested.is_set():
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED)


def interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """Return the KeyboardInterrupt that `error` was raised from or while handling, if any.

    A Ctrl-C or SIGTERM that lands inside OmegaConf can leave a config node half-built.
    OmegaConf's cleanup then fails on it with an AttributeError raised while the interrupt
    was being handled, which reaches the sweeper as an OmegaConf error, or as Hydra's
    ConfigCompositionException. Such an error is the interrupt, not a problem of the configs.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
