"""Preemption: SIGTERM -> finish the optimizer step, every rank agrees, checkpoint, exit retryable.

A pod that is preempted, evicted or drained gets SIGTERM and, ``terminationGracePeriodSeconds``
later, SIGKILL. Kubernetes signals the container's first process only: ``torchrun`` (its
elastic agent), which forwards SIGTERM to its local ranks and SIGKILLs those still running
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds later (default 30). Ranks on other nodes get no
signal at all. So:

* each rank's :class:`SigtermWatch` turns SIGTERM into a request, nothing more: the step in
  progress (its forward and backward passes, its collectives) runs to its end;
* the training loop adds the request to the all-reduce of each step's metrics, so every rank
  learns at the same step that some rank was asked to stop, at no extra collective;
* all ranks then write a checkpoint of that step together and leave with
  :data:`EXIT_PREEMPTED` (:class:`Preempted`, a ``SystemExit``);
* ``rmjob-torchrun`` (:func:`torchrun`) is torchrun whose own exit status is
  :data:`EXIT_PREEMPTED` too, where torchrun's would be 1 (a failed child, or the agent's own
  SIGTERM), which retry policies read as the trainer's error; which gives its ranks
  :data:`SHUTDOWN_TIMEOUT_S` after SIGTERM instead of torchrun's 30 s; and which leaves a
  first-run mistake at the ranks' one ``error:`` line and status 2, without torchrun's
  traceback and failure summary.

The retried pod reruns the same command, which resumes from the newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

# Retryable by Kubeflow's restartPolicy ExitCode (128-255 are), and no 128+N of a signal (N <= 64):
# a run that stopped cleanly is told apart from one killed by SIGTERM (143) or SIGKILL (137).
EXIT_PREEMPTED = 200
# How torchrun records the ranks it stops itself (subprocess exit status: minus the signal).
_ENDED_BY_TORCHRUN = (-signal.SIGTERM, -signal.SIGKILL)
# torchrun SIGKILLs its ranks this long after forwarding SIGTERM (its own default: 30 s, less than
# one step and a checkpoint of a large model). In a pod the grace period is the limit that
# counts: at its end the kubelet kills the container, torchrun and ranks alike.
SHUTDOWN_TIMEOUT_S = 3600


class Preempted(SystemExit):
    """Raised by ``train()`` once every rank has written the checkpoint of ``step``: uncaught,
    the process exits with :data:`EXIT_PREEMPTED`."""

    def __init__(self, step: int | None):
        super().__init__(EXIT_PREEMPTED)
        self.step = step


class SigtermWatch:
    """While active (``with``), SIGTERM sets :attr:`requested` instead of ending the process.

    Left with :class:`Preempted`, SIGTERM stays ignored: the process is on its way out, and
    torchrun SIGTERMs the ranks still running as soon as one rank has exited, which would
    record a rank still in interpreter shutdown as killed (-15) instead of preempted. Left
    otherwise, the previous action is restored.

    Only the main thread can install signal handlers; elsewhere (a trainer run in a thread)
    SIGTERM keeps its own action and :attr:`requested` stays False."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> SigtermWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._request)
            self._installed = True
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, signal.SIG_IGN if isinstance(exc, Preempted) else self._previous)
            self._installed = False

    def _request(self, signum, frame) -> None:
        # No printing here: a handler that runs while the main thread is inside print() would
        # re-enter the same buffered stream.
        self.requested = True


def torchrun(argv: list[str] | None = None) -> int:
    """``rmjob-torchrun``: torchrun (same arguments), whose exit status is :data:`EXIT_PREEMPTED`
    when its ranks stopped for a preemption, so that a retry policy can tell it from an error:

    * this agent got SIGTERM (the pod is being stopped): torchrun forwarded it to the ranks
      and waited for them (up to ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` s, which should match the
      pod's ``terminationGracePeriodSeconds``); torchrun itself would exit 1;
    * every failed rank exited with the user-error status 2 (a first-run mistake, one
      ``error:`` line that every rank printed): rmjob-torchrun exits 2 too and prints nothing
      more, where torchrun adds its traceback and failure summary and exits 1;
    * a rank exited with :data:`EXIT_PREEMPTED` (another node was preempted and these ranks
      stopped with it), and every other rank that failed did too or was ended by torchrun
      itself (SIGTERM, then SIGKILL, to the ranks still running once one has exited);
      torchrun would exit 1.

    A SIGTERM repeated while torchrun stops its ranks is ignored (see :func:`_first_signal_only`);
    one that comes once the ranks all exited 0 (torchrun waits for the other nodes' agents then)
    leaves with 0, where torchrun would exit 1.
    Anything else (success, errors, other signals) is torchrun's own outcome. Without
    ``--shutdown_timeout`` or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, ranks get
    :data:`SHUTDOWN_TIMEOUT_S` seconds after SIGTERM instead of torchrun's 30.
    """
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent
    from torch.distributed.elastic.multiprocessing import api as processes
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from rmjob_trainer.cli import EXIT_USER_ERROR

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    # Installed by torchrun (by this name) when it starts its ranks.
    terminate = processes._terminate_process_handler
    processes._terminate_process_handler = _first_signal_only(terminate)
    exit_barrier, ranks_succeeded = SimpleElasticAgent._exit_barrier, []

    def exit_barrier_after_success(agent) -> None:
        # torchrun waits there (for the other nodes' agents) only once all its ranks exited 0.
        ranks_succeeded.append(True)
        exit_barrier(agent)

    SimpleElasticAgent._exit_barrier = exit_barrier_after_success
    quiet = _UserErrorLogFilter(EXIT_USER_ERROR)
    for name in _FAILURE_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        torchrun_main(argv)
    except SignalException as e:
        if e.sigval != signal.SIGTERM:
            raise
        if ranks_succeeded:
            # Not retried: a replacement pod could not meet the nodes that finished.
            print("rmjob-torchrun: SIGTERM after the ranks finished; exit status 0", file=sys.stderr, flush=True)
            return 0
        print(f"rmjob-torchrun: SIGTERM: ranks stopped; exit status {EXIT_PREEMPTED} (preempted, retryable)",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except ChildFailedError as e:
        exit_codes = {failure.exitcode for failure in e.failures.values()}
        if EXIT_USER_ERROR in exit_codes and exit_codes <= {EXIT_USER_ERROR, *_ENDED_BY_TORCHRUN}:
            # Every rank printed the same one-line error (preflight.agree), or was stopped by
            # torchrun before it could; torchrun's summary would bury the line under a traceback.
            quiet.held.clear()
            if _ranks_stderr_redirected(argv):
                print(f"rmjob-torchrun: the ranks stopped on a user error (exit status {EXIT_USER_ERROR}); "
                      "their error lines are in torchrun's --log-dir", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        if EXIT_PREEMPTED not in exit_codes or not exit_codes <= {EXIT_PREEMPTED, *_ENDED_BY_TORCHRUN}:
            raise
        print(f"rmjob-torchrun: ranks stopped for a preemption; exit status {EXIT_PREEMPTED} (retryable)",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    finally:
        processes._terminate_process_handler = terminate
        SimpleElasticAgent._exit_barrier = exit_barrier
        for name in _FAILURE_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
        for record in quiet.held:  # not a user error after all: torchrun's lines as it logged them
            logging.getLogger(record.name).handle(record)
    return 0


def _ranks_stderr_redirected(argv: list[str] | None) -> bool:
    """Whether torchrun sends the ranks' stderr to files only (``--redirects``, ``--tee``)."""
    from torch.distributed.run import parse_args

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return bool(int(args.redirects) & 2) and not int(args.tee) & 2
    except ValueError:  # per-rank settings ("0:3,1:0"): some rank's may be
        return True


# Where torchrun logs a failed worker group, before raising ChildFailedError: the first failure's
# exit status, then (its @record wrapper) the error file it has no parent file to copy into.
_FAILURE_LOGGERS = ("torch.distributed.elastic.multiprocessing.api",
                    "torch.distributed.elastic.multiprocessing.errors.error_handler")


class _UserErrorLogFilter(logging.Filter):
    """Holds back torchrun's two log lines about a first failure with the user-error status:
    that rank printed its own line. Whether the run ends as a user error is known only later;
    if not, :func:`torchrun` logs the held lines after all."""

    def __init__(self, user_error_status: int) -> None:
        super().__init__()
        self.user_error_status = user_error_status
        self.first_failure_was_user_error = False
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("failed (exitcode: "):
            self.first_failure_was_user_error = record.args[0] == self.user_error_status
        elif not record.msg.startswith("no error file defined for parent"):
            return True
        if self.first_failure_was_user_error:
            self.held.append(record)
            return False
        return True


def _first_signal_only(handler):
    """torchrun's signal handler, which then ignores that signal. torchrun waits for its ranks
    once: a second SIGTERM (a pod deleted again, with a shorter grace period) starts that wait
    over, a third ends torchrun at once, and with it, the container's first process, the ranks
    writing their checkpoint."""

    def handle(signum, frame) -> None:
        signal.signal(signum, signal.SIG_IGN)
        handler(signum, frame)

    return handle
