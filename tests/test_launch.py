"""sequencer-run: torchrun's flags, its rendezvous failures in one line, and the store restarts need."""

from __future__ import annotations

import pytest
from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousTimeoutError

from sequencer import launch

FLAGS = ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "host:29400", "-m", "sequencer", "train"]


def test_a_rendezvous_that_fails_ends_in_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for error in (RendezvousTimeoutError("timed out"), RendezvousClosedError("closed")):

        def fail(args, error=error):
            raise error

        monkeypatch.setattr(launch, "run", fail)
        assert launch.main([*FLAGS[:6], "--rdzv-conf", "join_timeout=7", *FLAGS[6:]]) == 2
        assert capsys.readouterr().err == (
            "sequencer-run: error: not all of the 2 node(s) joined the rendezvous at host:29400 within 7 s: start "
            f"every node with the same --rdzv-endpoint and --nnodes ({type(error).__name__})\n"
        )


def test_the_launch_gets_torchruns_arguments_and_its_own_store_for_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.delenv(launch.SHARED_STORE_SWITCH, raising=False)
    monkeypatch.setattr(launch, "run", lambda args: seen.append((args, launch.os.environ[launch.SHARED_STORE_SWITCH])))
    assert launch.main([*FLAGS, "--epochs", "1"]) == 0
    args, switch = seen[0]
    assert (args.nnodes, args.rdzv_endpoint, args.module, args.training_script) == (
        "2",
        "host:29400",
        True,
        "sequencer",
    )
    assert args.training_script_args == ["train", "--epochs", "1"] and switch == "1"
    # A value the user set is kept.
    monkeypatch.setenv(launch.SHARED_STORE_SWITCH, "0")
    launch.main(FLAGS)
    assert seen[1][1] == "0"


def test_other_failures_keep_torchruns_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def worker_failed(args):
        raise RuntimeError("a worker failed")  # torchrun's ChildFailedError is not a rendezvous error either

    monkeypatch.setattr(launch, "run", worker_failed)
    with pytest.raises(RuntimeError, match="a worker failed"):
        launch.main(FLAGS)
