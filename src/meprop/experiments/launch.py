"""Start N local processes joined by torch.distributed, and watch them until they end.

``spawn(fn, nproc, args)`` starts ``nproc`` processes (``torch.multiprocessing``); each joins
one process group (gloo on the CPU, NCCL with one GPU per process) and runs ``fn(*args)``.
Processes are forked from a fork server that has imported torch and meprop once (start method
"forkserver", where the platform has it; "spawn" elsewhere): a rank starts in a fraction of a
second instead of importing torch again, and the server is reused by later jobs. Each rank
gets the launcher's environment as it is at the call. The group meets at a ``TCPStore`` that the calling process serves on a port of
127.0.0.1 that the OS picks, so concurrent jobs never race for a port. The caller watches the
processes: as soon as one exits with an error or is killed, the others get SIGTERM, then SIGKILL
after a grace period, and ``WorkerFailed`` is raised with the rank and its traceback. A rank
that hangs without exiting is caught by the process group's timeout: the ranks waiting for it
in a collective fail after ``timeout_s``, and the watcher then stops the rest. The launcher
itself may die too: SIGTERM stops its ranks before it exits (status 143), and each rank
watches it (``_die_with_parent``), so that after a SIGKILL the fork server and every rank end
within a fraction of a second instead of training on alone.

Under torchrun (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT),
``init_from_env`` joins the group that the environment describes instead.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "WorkerFailed",
    "default_threads",
    "under_launcher",
    "init_from_env",
    "destroy",
    "hard_exit",
    "spawn",
]

#: Seconds a collective waits for the other ranks before failing (a hung rank ends the run).
DEFAULT_TIMEOUT_S = 300.0
#: Seconds between a rank's checks that its launcher still runs (see ``_die_with_parent``).
WATCH_S = 0.2


class WorkerFailed(RuntimeError):
    """A process of a ``spawn`` job failed; the others have been stopped."""

    def __init__(
        self,
        rank: int,
        nproc: int,
        reason: str,
        user_error: str | None = None,
        exit_status: int = 1,
    ) -> None:
        super().__init__(f"rank {rank} of {nproc} failed: {reason.strip()}")
        self.rank = rank
        self.nproc = nproc
        #: The message of the exception that ended the job when its class marks it as a
        #: mistake to report without a traceback (``user_mistake = True``), else None.
        self.user_error = user_error
        self.exit_status = exit_status


def cpu_count() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(nproc: int) -> int:
    """Threads per process: ``$OMP_NUM_THREADS`` if set, else the cores shared out evenly."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, cpu_count() // nproc)


def under_launcher() -> bool:
    """Whether torchrun (or another env:// launcher) started this process as one rank."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def _backend(backend: str | None, device: str) -> str:
    return backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")


def init_from_env(
    backend: str | None = None, device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Join the process group described by RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun
    sets them; with NCCL, LOCAL_RANK picks this process's GPU). Backend: gloo on the CPU,
    NCCL on GPUs."""
    backend = _backend(backend, device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def destroy() -> None:
    """Leave the process group (after ``init_from_env``)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def hard_exit(status: int = 1) -> NoReturn:
    """End this rank now, freeing nothing (after its error is reported).

    Freeing DDP's reducer after one of its all-reduces timed out can deadlock inside torch: the
    main thread, holding the GIL, waits for gloo's lock, and gloo's thread, holding that lock,
    frees the timed-out work and waits for the GIL. A launcher would never see the rank end."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    if "numba" in sys.modules:  # the compiled kernels' thread pool, the same size
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    else:
        os.environ["NUMBA_NUM_THREADS"] = str(threads)


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux: /proc; None where unknown or gone), which
    tells the process apart from a later one that reuses its id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _die_with_parent(launcher: int, started: str | None) -> None:
    """No orphaned ranks: this process ends when the launcher does, however it ends.

    On Linux the parent's death sends SIGKILL (prctl); the parent is a fork server, though,
    which outlives a launcher that was killed. So a watchdog thread also checks the launcher
    every ``WATCH_S`` seconds: once it is gone, it stops the fork server (started by that
    launcher, for it alone) and this process."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)

    def gone() -> bool:
        try:
            os.kill(launcher, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # pragma: no cover - another user's process: ours is gone
            return True
        return started is not None and _start_time(launcher) != started

    if gone():  # the launcher died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while not gone():
            time.sleep(WATCH_S)
        parent = os.getppid()
        if parent not in (1, launcher):  # the launcher's fork server
            try:
                os.kill(parent, signal.SIGKILL)
            except OSError:
                pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="meprop-launcher-watch", daemon=True).start()


def _worker(
    rank: int,
    fn: Callable,
    args: tuple,
    nproc: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    launcher: tuple[int, str | None],
    env: dict[str, str],
    stamps: str,
) -> None:
    _die_with_parent(*launcher)
    # The launcher's environment now (a fork server keeps the one it started with), plus
    # torchrun's variables, so that code running under either launcher sees the same setup.
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    _set_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=nproc, timeout=timeout)
    try:
        dist.barrier()  # every rank is connected: none leaves while another still connects
        # No barrier after fn: a rank may leave once its last collective is done, while rank 0
        # still writes its summary (a barrier there would time out on a long final evaluation).
        fn(*args)
    except BaseException as e:
        # When: the launcher reports the first failure, not the ranks that failed because of it.
        (Path(stamps) / str(rank)).write_text(repr(time.time()))
        if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: the usual way out
            raise
        (Path(stamps) / f"{rank}.err").write_text(traceback.format_exc())
        if getattr(e, "user_mistake", False):  # told in one line (see WorkerFailed.user_error)
            status = getattr(e, "exit_status", 2)
            (Path(stamps) / f"{rank}.msg").write_text(f"{status}\n{e}")
        hard_exit()
    destroy()


def _start_method() -> str:
    if "forkserver" not in multiprocessing.get_all_start_methods():  # pragma: no cover
        return "spawn"
    # Takes effect when the server starts (the first job of this process). DDP's constructor
    # imports torch._dynamo, seconds of imports that every rank would otherwise repeat.
    preload = [__name__, "meprop.distributed", "torch._dynamo"]
    multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
    return "forkserver"


def spawn(
    fn: Callable,
    nproc: int,
    args: tuple = (),
    *,
    backend: str | None = None,
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    grace_s: float = 5.0,
) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes joined by torch.distributed; wait for all.

    Args:
        fn: a picklable function (defined at the top level of an importable module).
        nproc: number of processes (ranks 0 to nproc - 1).
        args: picklable arguments.
        backend: ``"gloo"`` or ``"nccl"``; default: gloo for ``device="cpu"``, NCCL for
            ``"cuda"`` (process r uses GPU r).
        timeout_s: how long a collective waits for the other ranks before failing.
        threads: intra-op threads per process (default: ``default_threads(nproc)``).
        grace_s: after a failure, seconds the others get to exit on SIGTERM before SIGKILL.

    Raises:
        WorkerFailed: a process raised, exited with a non-zero status or was killed.

    Example::

        def work(path):
            import torch.distributed as dist
            print(dist.get_rank(), dist.get_world_size(), path)

        spawn(work, 2, ("data",))
    """
    backend = _checked_backend(nproc, timeout_s, backend, device)
    threads = threads or default_threads(nproc)
    # The rendezvous: port 0 lets the OS pick a free port, held from now until the end.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="meprop-launch-") as stamps:
        worker_args = (fn, args, nproc, store.port, backend, timeout_s, threads,
                       (os.getpid(), _start_time(os.getpid())), dict(os.environ), stamps)  # fmt: skip
        context = mp.start_processes(
            _worker, args=worker_args, nprocs=nproc, join=False, start_method=_start_method()
        )
        try:
            with _sigterm_raises():
                _watch(context, nproc, grace_s, Path(stamps))
        except BaseException:  # WorkerFailed, KeyboardInterrupt, ...: leave no process behind
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            raise
        finally:
            for f in context.error_files:
                Path(f).unlink(missing_ok=True)
    del store


def _checked_backend(nproc: int, timeout_s: float, backend: str | None, device: str) -> str:
    """``spawn``'s arguments checked; the backend it runs (``_backend``)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    backend = _backend(backend, device)
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(
            f"nproc={nproc} NCCL processes need {nproc} GPUs, found {torch.cuda.device_count()}"
        )
    return backend


class Terminated(SystemExit):
    """The launcher got SIGTERM: its ranks are stopped, and it exits with 128 + 15."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM to the launcher (in the main thread) raises ``Terminated``, so that the ranks
    are stopped before it exits instead of training on alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _watch(context, nproc: int, grace_s: float, stamps: Path) -> None:
    """Wait until every process has ended; after the first failure stop the others and raise
    ``WorkerFailed`` for the root cause."""
    procs = context.processes
    live = {p.sentinel: i for i, p in enumerate(procs)}
    failed = False
    while live and not failed:
        for sentinel in multiprocessing.connection.wait(list(live)):
            i = live.pop(sentinel)
            procs[i].join()
            failed |= procs[i].exitcode != 0
    if not failed:
        return
    # The others: grace_s to end by themselves (a rank failing because of another records
    # when), then SIGTERM, another grace_s, then SIGKILL.
    _join_all(procs, grace_s)
    stopped = {i for i, p in enumerate(procs) if p.is_alive()}
    for i in stopped:
        procs[i].terminate()
    _join_all(procs, grace_s)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    raise _root_cause(procs, context.error_files, stopped, stamps, nproc)


def _join_all(procs, seconds: float) -> None:
    end = time.monotonic() + seconds
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))


def _root_cause(procs, error_files, stopped: set, stamps: Path, nproc: int) -> WorkerFailed:
    """The first failure: a rank killed by a signal (not by us), else the earliest exception;
    the ranks that failed after it (typically in a collective, of a closed connection) are
    named at the end."""
    failures = []  # (order, rank, reason)
    for i, p in enumerate(procs):
        if i in stopped or p.exitcode == 0:
            continue
        if p.exitcode < 0:
            try:
                name = signal.Signals(-p.exitcode).name
            except ValueError:
                name = f"signal {-p.exitcode}"
            failures.append(((0, 0.0), i, f"process {p.pid} killed by {name}"))
            continue
        stamp = stamps / str(i)
        when = float(stamp.read_text()) if stamp.is_file() else math.inf
        reason = f"process {p.pid} exit status {p.exitcode}"
        if (stamps / f"{i}.err").is_file():  # the traceback of an exception (see _worker)
            reason = (stamps / f"{i}.err").read_text()
        elif os.access(error_files[i], os.R_OK):
            with open(error_files[i], "rb") as fh:
                reason = pickle.load(fh)  # the formatted traceback (torch's spawn wrapper)
        failures.append(((1, when), i, reason))
    failures.sort(key=lambda f: f[:2])
    _, rank, reason = failures[0]
    user_error, exit_status = None, 1
    if (stamps / f"{rank}.msg").is_file():
        status, _, user_error = (stamps / f"{rank}.msg").read_text().partition("\n")
        exit_status = int(status)
    later = [f"rank {i}: {r.strip().splitlines()[-1]}" for _, i, r in failures[1:] if r.strip()]
    if later:
        reason = f"{reason.rstrip()}\n(then, in consequence: {'; '.join(later)})"
    if stopped:  # e.g. a hung rank, after the others timed out waiting for it
        ranks = ", ".join(map(str, sorted(stopped)))
        reason = f"{reason.rstrip()}\n(still running, stopped: rank {ranks})"
    return WorkerFailed(rank, nproc, reason, user_error, exit_status)
