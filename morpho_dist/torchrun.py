"""torchrun for morpho_dist.train, with morpho_dist's exit codes and one line per failure.

    python -m morpho_dist.torchrun --nproc_per_node=2 sharding=seed train.steps=200

Arguments that start with ``--`` are torchrun's (``--name=value``), everything else is a Hydra override for the
workers. Against plain ``torchrun -m morpho_dist.train``, it:
- checks the config once before any worker starts: a bad key or value is one line and exit code 2, no worker
  is started and no run dir is made;
- exits with the workers' exit code (2, 3, 4, ... as in one process: rank 0 has printed the one line that says
  why) instead of torchrun's report and exit code 1;
- on Ctrl-C or SIGTERM, lets the workers stop (rank 0 prints the step, the checkpoint and the resume command)
  and exits 130 or 143 without torchrun's traceback.
"""

from __future__ import annotations

import logging
import os
import sys

from morpho_dist.cli import LAUNCH_CMD_ENV, _precheck

EXIT_SIGNAL_BASE = 128


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, Hydra overrides)."""
    options = [a for a in args if a.startswith("--")]
    return options, [a for a in args if not a.startswith("--")]


def exit_code(err: BaseException) -> int:
    """The process exit code for torchrun's ChildFailedError or SignalException. Of the failed workers, the
    lowest rank that exited by itself decides: torchrun stops the others with SIGTERM once one has failed."""
    failures = getattr(err, "failures", None)
    if failures:
        codes = [failures[rank].exitcode for rank in sorted(failures)]
        code = next((c for c in codes if 0 < c < EXIT_SIGNAL_BASE), codes[0])  # not one stopped by the SIGTERM
        return EXIT_SIGNAL_BASE - code if code < 0 else code  # a worker killed by a signal: 128 + signal
    sigval = getattr(err, "sigval", None)
    return EXIT_SIGNAL_BASE + int(sigval) if sigval is not None else 1


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    options, overrides = split_args(args)
    _precheck(overrides)  # exits 2 with one line on a config error
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning
    os.environ.setdefault(LAUNCH_CMD_ENV, " ".join(["python -m morpho_dist.torchrun", *options]))

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    for name in list(logging.root.manager.loggerDict):  # each elastic module's logger sets its own level
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its per-worker failure and shutdown reports

    try:
        torchrun_main([*options, "-m", "morpho_dist.train", *overrides])
    except (ChildFailedError, SignalException) as err:
        sys.exit(exit_code(err))


if __name__ == "__main__":
    main()
