"""The ``meprop`` command line: one parser, with subcommands registered by their modules.

``meprop train TASK`` takes its options from ``TrainConfig``'s fields (one flag per field, with
the help and choices of the field's metadata), or from a JSON file (``--config``, e.g. a run's own ``config.json``) with flags overriding it.
"""

from __future__ import annotations

import argparse
import errno
import io
import os
import sys
import traceback
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from meprop import __version__

from . import demo


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--flag`` per dataclass field, its help and choices from the field's metadata
    (``help``, ``choices``); defaults stay None so a --config file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        hint = hints[f.name]
        help_ = f"{f.metadata.get('help', f.name.replace('_', ' '))} (default: {default})"
        if hint is bool or set(typing.get_args(hint)) == {bool, type(None)}:  # bool | None
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, type=_int_tuple, default=None, metavar="N[,N...]", help=help_)
        else:
            parser.add_argument(
                flag, type=hint, default=None, choices=f.metadata.get("choices"), help=help_
            )


def config_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """A ``cls`` from a base dict (a --config file) overridden by the flags that were given."""
    values = dict(base or {})
    for f in fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls.from_dict(values) if hasattr(cls, "from_dict") else cls(**values)


def _train_worker(cfg: dict, out: str, options: dict) -> None:
    """One rank of a multi-process ``meprop train`` (started by ``meprop.experiments.launch``; the
    launcher holds the run folder's lock)."""
    from .train import TrainConfig, run

    run(TrainConfig.from_dict(cfg), out, lock=False, **options)


def _train_config(args: argparse.Namespace):
    """The run's TrainConfig: the flags given, over a --config file, over (with --resume) the
    run's own config.json, so that ``--resume --out DIR`` needs no other flag."""
    from .train import ConfigError, TrainConfig

    base: dict = {}
    source = None
    if args.config:
        source = Path(args.config)
    elif args.resume and args.out is not None and (Path(args.out) / "config.json").is_file():
        source = Path(args.out) / "config.json"
    if source is not None:
        base = TrainConfig.from_file(source).to_dict()  # checks it, naming the file
        if args.config and base["task"] != args.task:
            raise ConfigError(
                f"--config {source} is a {base['task']} config, but the task given is "
                f"{args.task}: give the task {base['task']}"
            )
    base["task"] = args.task
    if source is None and getattr(args, "method", None) == "meprop":
        from .tasks import RECIPES

        chosen = ("k", "mode", "memory", "warmup", "adaptive", "optimizer", "sparse_grad")
        mlp = getattr(args, "model", None) in (None, "mlp")  # (measured on the MLP only)
        if args.task in RECIPES and mlp and all(getattr(args, f, None) is None for f in chosen):
            base.update(RECIPES[args.task])  # the measured recipe (tasks.RECIPES)
    try:
        return config_from_args(TrainConfig, args, base)
    except ConfigError as e:
        raise ConfigError(
            f"{e} (in --config {source} or the flags)" if source else str(e)
        ) from None


def _check_run_flags(args: argparse.Namespace, cfg) -> None:
    """The flags of ``meprop train`` that are not the run's settings: --restart, --nproc,
    --dist-timeout, and torchrun's processes."""
    from . import launch
    from .train import ConfigError

    if args.restart and not args.resume:
        raise ConfigError(
            "--restart goes with --resume (a run whose last.pt is lost): add --resume"
        )
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {args.nproc}")
    if not args.dist_timeout > 0 or args.dist_timeout == float("inf"):
        raise ConfigError(
            f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}"
        )
    if cfg.method == "meact" and (args.nproc > 1 or launch.under_launcher()):
        raise ConfigError(
            "--method meact runs in one process (its per-example state is not sharded): drop "
            "--nproc (or torchrun)"
        )
    if launch.under_launcher() and args.nproc != 1:
        raise ConfigError(
            f"--nproc {args.nproc} under torchrun: torchrun already started the processes "
            "(--nproc-per-node); leave --nproc out"
        )


def _train(args: argparse.Namespace) -> None:
    from . import launch
    from .train import check_run_dir, run, run_lock

    cfg = _train_config(args)
    out = args.out or Path("runs") / f"{cfg.task}-{cfg.method}-k{cfg.k}-seed{cfg.seed}"
    args.run_dir = out  # (for the message of a Ctrl-C)
    _check_run_flags(args, cfg)
    options = dict(
        data_dir=args.data_dir,
        resume=args.resume,
        restart=args.restart,
        progress=not args.no_progress,
        compact=not args.no_compact_allreduce,
    )
    if launch.under_launcher():  # torchrun started this process as one rank of a job
        launch.init_from_env(timeout_s=args.dist_timeout)  # the trainer runs on the CPU: gloo
        try:
            if int(os.environ["RANK"]) == 0:
                print(f"run directory: {out}")
            run(cfg, out, **options)
        except Exception:
            traceback.print_exc()
            launch.hard_exit()  # torchrun sees the status (see hard_exit: no teardown)
        launch.destroy()
        return
    if args.data_dir is not None:  # a mistyped --data-dir, before any process starts
        from .data import data_roots

        data_roots(args.data_dir)
    print(f"run directory: {out}")
    if args.nproc == 1:
        run(cfg, out, **options)
        return
    with run_lock(out):  # held here, for all the ranks (which the launcher outlives)
        check_run_dir(cfg, out, args.resume, args.restart)  # here rather than in every rank
        threads = launch.default_threads(args.nproc)
        print(f"{args.nproc} processes (gloo), {threads} thread{'s' * (threads > 1)} each")
        launch.spawn(
            _train_worker,
            args.nproc,
            (cfg.to_dict(), str(out), options),
            backend="gloo",
            timeout_s=args.dist_timeout,
            threads=threads,
        )


def register_train(subparsers) -> None:
    from . import launch
    from .tasks import TASKS
    from .train import TrainConfig

    p = subparsers.add_parser(
        "train",
        help="train one model on one task with one method",
        description="Train, select the best epoch on dev, score it on test. Writes config.json, "
        "log.jsonl, last.pt, best.pt and summary.json to --out.",
        epilog="example: meprop train mnist --method meprop --k 20 --hidden 500 --layers 2 "
        "--epochs 20. With --method meprop and none of --k, --mode, --memory, --warmup, "
        "--adaptive, --optimizer, --sparse-grad, the mnist task runs unified k=160 with "
        "--optimizer lazy_adam --sparse-grad: in the time-to-accuracy grid "
        "(docs/results/tta/report.md) the soonest meProp recipe at width 500 (seeds 6-16: "
        "0.73x dense's time to its best - 0.2 point, interval 0.57-0.94x), with a test accuracy "
        "level with dense's; the parse "
        "task per_example k=20 (0.56x dense's time to its accuracy in the "
        "grid's parse group, 5 seeds).",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--config", help="JSON file of TrainConfig fields (flags override it)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/TASK-METHOD-kK-seedS)")
    p.add_argument("--data-dir", type=Path, help="data root (default: $MEPROP_DATA, then cache)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--restart",
        action="store_true",
        help="with --resume: train a run whose last.pt is lost again from step 0 (its log is "
        "replaced); without it such a run is refused",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train with N local processes (torch.distributed, gloo; --batch-size stays the "
        "global batch, split between them). Or run under torchrun: torchrun --nproc-per-node N "
        "-m meprop.experiments.cli train ...",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=launch.DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="multi-process runs: how long a rank waits for the others before the run fails "
        f"(default: {launch.DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--no-compact-allreduce",
        action="store_true",
        help="multi-process runs: all-reduce meProp's weight gradients whole (DDP's ordinary "
        "all-reduce) instead of only the rows meProp kept (meprop.ddp_hook)",
    )
    add_config_arguments(p, TrainConfig, skip=("task",))
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    from . import info, report, reproduce

    parser = argparse.ArgumentParser(
        prog="meprop", description="meProp, meSimp and meAct: minimal effort back propagation."
    )
    parser.add_argument("--version", action="version", version=f"meprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (
        register_train,
        reproduce.register,
        report.register,
        demo.register,
        info.register,
    ):
        register(sub)
    return parser


# A path that is missing, not a folder, a folder, or not allowed: the user's to fix (their
# messages name the path), told in one line like the errors marked ``user_mistake``.
PATH_ERRORS = (
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError
)  # fmt: skip


class _Output:
    """stdout that cannot stop a run: where it fails (a closed pipe, as ``| head -1`` leaves;
    a full device) the rest of the output is dropped, quietly for a closed pipe, else with one
    line on stderr, and the command goes on."""

    def __init__(self, stream) -> None:
        self.stream, self.lost = stream, False

    def _lose(self, e: OSError) -> None:
        self.lost = True
        if e.errno != errno.EPIPE:
            where = getattr(self.stream, "name", "stdout")
            try:
                where = os.readlink(f"/proc/self/fd/{self.stream.fileno()}")
            except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
                pass
            print(f"meprop: output to {where} lost ({e.strerror}); going on without it",
                  file=sys.stderr)  # fmt: skip
        try:  # what is still buffered goes nowhere (no error at exit)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self.stream.write(text)
            except OSError as e:
                self._lose(e)
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self.stream.flush()
            except OSError as e:
                self._lose(e)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def main(argv: list[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = _Output(stdout)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # while the parser and the commands' modules load
        print("meprop: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _interrupted_hint(args: argparse.Namespace) -> str:
    """What to do after a Ctrl-C: ``--resume`` only where a checkpoint was written."""
    if args.command != "train":
        return ""
    out = getattr(args, "run_dir", None)
    if out is not None and (Path(out) / "last.pt").exists():
        return "; --resume continues from the last checkpoint"
    return "; no checkpoint was written yet: run the same command again"


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    from .launch import WorkerFailed

    try:
        args.func(args)
    except WorkerFailed as e:  # the others were stopped
        if e.user_error is not None:  # a rank stopped on a mistake (or a diverged run)
            print(f"meprop {args.command}: error: {e.user_error}", file=sys.stderr)
            return e.exit_status
        print(f"meprop {args.command}: {e}", file=sys.stderr)  # with the rank's traceback
        return 1
    except KeyboardInterrupt:
        print(f"meprop {args.command}: interrupted{_interrupted_hint(args)}", file=sys.stderr)
        return 130
    except Exception as e:
        # Mistakes in the arguments, files, folders or data (their classes say so) are told in
        # one line, with what to do; anything else is a bug, with its traceback.
        if not (getattr(e, "user_mistake", False) or isinstance(e, PATH_ERRORS)):
            raise
        print(f"meprop {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
