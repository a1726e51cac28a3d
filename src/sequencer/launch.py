"""`sequencer-run`: torchrun with its flags unchanged, whose rendezvous failures end in one line and exit code 2.

torchrun (`torch.distributed.run`) starts the workers only after every node has joined the rendezvous; a node whose
peers never come (a wrong endpoint, a node that did not start) waits out the join timeout and then ends in
torchrun's own traceback, before any code of ours runs. Launched through `sequencer-run`, the same command ends in
one line naming the endpoint, the nodes expected and the timeout, and exit code 2; the workers never started, so
nothing of an earlier run was touched. It also launches with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 unless set: the
workers of a restartable run (`--max-restarts`) need their own store to rejoin (pytorch/pytorch#135712, and
`sequencer train` refuses a restartable launch without it), which the static rendezvous never gives them, so such a
launch on it is refused before it starts. Workers that refused their input (one line each, exit code 2) end the
launch in exit code 2; other failures in one line naming the failed ranks and exit code 1.

    sequencer-run --nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m sequencer train ...
"""

from __future__ import annotations

import argparse
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousError
from torch.distributed.run import get_args_parser, parse_min_max_nnodes, run

SHARED_STORE_SWITCH = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
# The exit code of a command that refused its input (`sequencer.errors.UsageError`), after its one line.
REFUSED = 2


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv`; a rendezvous that fails becomes one line on stderr and exit code 2, as does a
    restartable launch on the static rendezvous, and workers that fail end it in their exit code without torchrun's
    traceback."""
    args = get_args_parser().parse_args(argv)
    if args.max_restarts > 0 and static_rendezvous(args):
        print(
            f"sequencer-run: error: --max-restarts {args.max_restarts} needs a c10d rendezvous: torchrun's static one "
            f"(--rdzv-backend static, the default) lends its store to the workers whatever {SHARED_STORE_SWITCH} "
            "says, and a restarted group would read the addresses of the one before; launch with --standalone "
            "(one node) or --rdzv-backend c10d --rdzv-endpoint HOST:PORT",
            file=sys.stderr,
        )
        return REFUSED
    os.environ.setdefault(SHARED_STORE_SWITCH, "1")
    try:
        run(args)
    except ChildFailedError as error:
        failures = sorted(error.failures.items())
        if all(failure.exitcode == REFUSED for _, failure in failures):
            return REFUSED  # each worker printed why (rank 0 only, in our commands); torchrun's traceback adds nothing
        print(f"sequencer-run: error: {_failed_workers(failures)}", file=sys.stderr)
        return 1
    except RendezvousError as error:
        timeout = next((item for item in args.rdzv_conf.split(",") if item.startswith("join_timeout=")), "")
        waited = f"within {timeout.partition('=')[2]} s" if timeout else "within the join timeout"
        print(
            f"sequencer-run: error: not all of the {args.nnodes} node(s) joined the rendezvous at "
            f"{args.rdzv_endpoint or 'the default endpoint'} {waited}: start every node with the same "
            f"--rdzv-endpoint and --nnodes ({type(error).__name__})",
            file=sys.stderr,
        )
        return REFUSED
    return 0


def static_rendezvous(args: argparse.Namespace) -> bool:
    """Whether torchrun will launch `args` on the static rendezvous (whose store the workers always share)."""
    if args.standalone or args.rdzv_backend != "static":
        return False
    # The torchruns whose --master-port has no default (not 2.7's) switch a one-node launch given neither
    # --rdzv-endpoint nor --master-port to c10d themselves.
    return bool(args.rdzv_endpoint) or args.master_port is not None or parse_min_max_nnodes(args.nnodes)[1] != 1


def _failed_workers(failures: list[tuple[int, ProcessFailure]]) -> str:
    """'worker rank 0 exited with code 1, rank 3 was killed by SIGKILL': how each failed worker ended."""
    ends = [
        f"rank {rank} was killed by {failure.signal_name()}"
        if failure.exitcode < 0
        else f"rank {rank} exited with code {failure.exitcode}"
        for rank, failure in failures
    ]
    return "worker " + ", ".join(ends)


if __name__ == "__main__":
    sys.exit(main())
