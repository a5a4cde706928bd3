"""Stop cleanly at a step boundary when the scheduler says time is up.

Batch schedulers announce the end of an allocation with a signal (Slurm: ``SIGTERM``
at the time limit, or the signal chosen with ``#SBATCH --signal=USR1@120``), then kill
the job after a grace period. :class:`StopRequest` installs handlers for ``SIGTERM``
and ``SIGUSR1`` that only set a flag; at each step boundary the training loop calls
:meth:`StopRequest.should_stop` with its ``World``, which sums the flag over ranks, so
one rank receiving the signal is enough and *all* ranks stop after the same step.
The loop then writes a checkpoint from the root rank and exits 0, printing
:func:`resume_command`.

OpenMPI's ``mpiexec`` forwards ``SIGUSR1`` (and ``SIGUSR2``) to every rank, but a
``SIGTERM`` sent to ``mpiexec`` kills the ranks at once (exit 1, no checkpoint), so
the process that runs ``mpiexec`` relays ``SIGTERM`` to it as ``SIGUSR1``
(:func:`relay_stop_signals`).
"""
import os
import shlex
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

#: a second Ctrl-C counts only this long after the first: ``timeout`` and shells pass one
#: keypress on to their child, which then sees it twice at once
REPEAT_AFTER_S = 1.0


def _repeated(first):
    """Whether a SIGINT now is a second Ctrl-C, not a copy of the one at ``first``."""
    return first is not None and time.monotonic() - first >= REPEAT_AFTER_S


class StopRequest:
    """A flag set by ``SIGTERM``/``SIGUSR1``; ranks agree on it at step boundaries.

    Parameters
    ----------
    signals : tuple of signal.Signals
        Signals that request a stop (``SIGTERM`` and ``SIGUSR1`` by default). Add
        ``SIGINT`` to make Ctrl-C stop at the next step boundary too; a second Ctrl-C
        before that boundary raises ``KeyboardInterrupt`` (after it, the checkpoint is
        being written and Ctrl-C is ignored).
    install : bool
        Install the handlers now (only possible in the main thread).

    Attributes
    ----------
    requested : bool
        True once one of the signals arrived in this process.
    interrupted : bool
        True once a ``SIGINT`` (Ctrl-C) arrived.
    signum : int or None
        The first signal received.

    Examples
    --------
    >>> import os, signal
    >>> from lcls_dl.distributed.local_world import LocalWorld
    >>> stop = StopRequest()
    >>> stop.should_stop(LocalWorld())
    False
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> stop.should_stop(LocalWorld())
    True
    >>> stop.uninstall()
    """

    def __init__(self, signals=STOP_SIGNALS, install=True):
        self.signals = tuple(signals)
        self.requested = False
        self.interrupted = False
        self._first_sigint = None
        self.stopping = False  # the loop has seen the request: it is checkpointing
        self.signum = None
        self._previous = {}
        if install:
            self.install()

    def _handler(self, signum, frame):
        # Only set flags (no I/O, no MPI, no locks in a signal handler); a second Ctrl-C
        # raises, as Python's own SIGINT handler would.
        if signum == signal.SIGINT and self.interrupted:
            if not self.stopping and _repeated(self._first_sigint):
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
            return
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            self.interrupted, self._first_sigint = True, time.monotonic()
        self.requested = True

    def install(self):
        """Install the handlers, remembering the previous ones for :meth:`uninstall`."""
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self):
        """Restore the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False

    def request(self, signum=None):
        """Ask for a stop from code (same effect as receiving a signal)."""
        self._handler(signum, None)

    def should_stop(self, world):
        """True on every rank iff any rank has received a stop signal.

        A collective (an allreduce of the flag): call it on every rank at the same
        point of every step. Under :class:`~lcls_dl.distributed.ulfm.FaultTolerantWorld`
        it may raise :class:`~lcls_dl.distributed.ulfm.WorldShrunk` like any collective.
        """
        stop = int(world.allreduce_sum(int(bool(self.requested)))) > 0
        self.stopping = self.stopping or stop
        return stop

    @property
    def signal_name(self):
        """Name of the first signal received (``"SIGTERM"``), or None."""
        if self.signum is None:
            return None
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return str(self.signum)


def should_stop(world, request):
    """Function form of :meth:`StopRequest.should_stop`."""
    return request.should_stop(world)


def resume_command(argv=None, flag="--resume"):
    """The command line to continue an interrupted run: ``argv`` plus ``--resume``.

    Parameters
    ----------
    argv : list of str, optional
        ``sys.argv`` by default; a leading path to the ``lcls-dl`` script (or the ``-c`` /
        ``__main__.py`` of a rank started by the launcher) becomes ``lcls-dl``.

    Examples
    --------
    >>> resume_command(["/usr/bin/lcls-dl", "train", "data", "--out", "my model"])
    "lcls-dl train data --out 'my model' --resume"
    >>> resume_command(["lcls-dl", "train", "data", "--resume"])
    'lcls-dl train data --resume'
    """
    args = list(sys.argv if argv is None else argv)
    if args and (args[0].endswith(("lcls-dl", "__main__.py")) or args[0] == "-c"):
        args[0] = "lcls-dl"
    if flag not in args:
        args.append(flag)
    return " ".join(shlex.quote(str(a)) for a in args)


class relay_stop_signals:
    """In the process that runs ``mpiexec``: turn ``SIGTERM``/``SIGUSR1`` into ``SIGUSR1`` for it.

    ``mpiexec`` forwards ``SIGUSR1`` to every rank, where :class:`StopRequest` sees it;
    a ``SIGTERM`` delivered to ``mpiexec`` itself would kill the ranks before they can
    checkpoint. Use as a context manager around ``Popen(...).wait()``.

    ``SIGINT`` (Ctrl-C in the terminal; ``mpiexec`` runs in a session of its own, so
    only this process gets it) is relayed the same way, once: a second one, at least
    :data:`REPEAT_AFTER_S` later, raises ``KeyboardInterrupt`` in this process, whose
    caller then ends the job at once.

    Parameters
    ----------
    proc : subprocess.Popen
        The running ``mpiexec``.
    graceful : bool
        False for ranks that do not checkpoint: ``mpiexec`` gets ``SIGTERM`` instead
        (it ends the ranks).

    Attributes
    ----------
    relayed : int or None
        The first signal that was relayed (the job was asked to stop), else None.
    interrupted : bool
        A ``SIGINT`` was relayed.

    Examples
    --------
    >>> import subprocess, sys
    >>> proc = subprocess.Popen([sys.executable, "-c", "pass"])
    >>> with relay_stop_signals(proc) as relay:
    ...     rc = proc.wait()
    >>> relay.relayed is None
    True
    """

    def __init__(self, proc, signals=STOP_SIGNALS + (signal.SIGINT,), graceful=True):
        self.proc = proc
        self.signals = tuple(signals)
        self.graceful = bool(graceful)
        self.relayed = None
        self.interrupted = False
        self._first_sigint = None
        self._previous = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:
                if _repeated(self._first_sigint):
                    raise KeyboardInterrupt
                return
            self.interrupted, self._first_sigint = True, time.monotonic()
            # os.write: a print here could re-enter a write the main thread is in
            os.write(2, b"lcls-dl: Ctrl-C: every rank stops after its current step and the "
                        b"job checkpoints (Ctrl-C again to end it at once)\n" if self.graceful
                     else b"lcls-dl: Ctrl-C: ending the job\n")
        if self.relayed is None:
            self.relayed = signum
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGUSR1 if self.graceful else signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        return False
