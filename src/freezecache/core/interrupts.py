"""SIGINT and SIGTERM in a stage: one clean stop, however many signals arrive.

Python turns SIGINT into a KeyboardInterrupt wherever the main thread is. A second one (``timeout``
in front of ``dvc`` sends two about a millisecond apart; so does an impatient Ctrl-C) lands in
the cleanup the first one started, or in the interpreter's shutdown, which prints ``Exception
ignored in ... threading._shutdown`` and can even exit 0, so that DVC records the stage as done
and goes on with the next. Here a stage goes through three phases:

- **starting** (:func:`exit_on_signal`, before its params are loaded): nothing is written yet,
  so a signal ends the process at once, with one line;
- **working** (:func:`stopping`, inside the stage guard): the first signal raises
  :class:`Interrupted` in the main thread, so the usual cleanup runs (a cache build rolls back
  to its last durable chunk, checkpoints stay); later signals are only counted. Writing the
  stage's outputs is :func:`deferred`: a signal then waits until they are all written, so an
  interrupted stage has published all of its outputs or none;
- **done** (back to :func:`exit_on_signal`): the outputs exist, a signal exits non-zero at once.

Exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports it.
Only the standard library: the launcher installs the first phase before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The stage was asked to stop by a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def status(self) -> int:
        return 128 + self.signum


class _State:
    active = False  # inside stopping()
    raised: Interrupted | None = None  # the one Interrupted of this process
    pending: int | None = None  # a signal that arrived while deferred
    depth = 0  # nesting of deferred()
    at_success: list = []  # run when stopping()'s block ends without a signal


def _exit_now(signum: int, _frame=None) -> None:
    name = signal.Signals(signum).name
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.write(f"error: interrupted by {name}; nothing more was written\n")
        sys.stderr.flush()
    os._exit(128 + signum)


def _raise_once(signum: int, _frame=None) -> None:
    if _State.raised is not None or _State.pending is not None:
        return  # the stop is under way: let its cleanup finish
    if _State.depth:
        _State.pending = signum
        return
    _State.raised = Interrupted(signum)
    raise _State.raised


def exit_on_signal() -> None:
    """SIGINT and SIGTERM end the process at once (exit 128 + signal), with one line."""
    _install(_exit_now)


@contextlib.contextmanager
def stopping() -> Iterator[None]:
    """Inside: the first SIGINT or SIGTERM raises :class:`Interrupted`, later ones are ignored;
    at the end, without a signal, the :func:`at_success` calls run (a signal cannot cut them
    short). After: the handlers from before (:func:`exit_on_signal` in a stage process), or,
    when a signal came, still none that raises: the process is on its way out."""
    before = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in SIGNALS}
    _State.active, _State.raised, _State.pending, _State.depth = True, None, None, 0
    _State.at_success = []
    _install(_raise_once)
    try:
        yield
        with deferred():
            for call in _State.at_success:
                if pending():
                    break
                call()
    finally:
        _State.active, _State.at_success = False, []
        if not pending():  # after a signal, later ones stay ignored while the process exits
            _install(None, before)


def at_success(call) -> None:
    """Run ``call`` once the stage has done all of its work without being interrupted (at once
    outside :func:`stopping`): e.g. removing checkpoints only a finished stage may drop."""
    if _State.active:
        _State.at_success.append(call)
    else:
        call()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block a signal does not cut short: one that arrives inside is raised at its end."""
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
    if not _State.depth and _State.pending is not None and _State.raised is None:
        _State.raised = Interrupted(_State.pending)
        raise _State.raised


def raised_or(err: BaseException) -> Interrupted:
    """The :class:`Interrupted` behind ``err`` (``err`` itself, or the signal that came)."""
    if isinstance(err, Interrupted):
        return err
    return _State.raised or Interrupted(_State.pending or signal.SIGINT)


def pending() -> bool:
    """Whether a signal arrived (raised or waiting)."""
    return _State.raised is not None or _State.pending is not None


def _install(handler, handlers: dict | None = None) -> None:
    """``handler`` for SIGINT and SIGTERM (``handlers``: each its own, e.g. the ones saved)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers belong to the main thread (a stage called from a test's thread)
    for sig in SIGNALS:
        signal.signal(sig, handlers[sig] if handlers is not None else handler)
