"""sequencer-run: torchrun's flags, its rendezvous failures in one line, and the store restarts need."""

from __future__ import annotations

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousTimeoutError
from torch.distributed.run import get_args_parser

from sequencer import distributed, launch
from sequencer.errors import UsageError


@pytest.fixture(autouse=True)
def own_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """main sets the store switch in this process's environment: unset during each test and restored after it."""
    # setenv records the value to restore (delenv of an unset variable records nothing, leaving main's value behind).
    monkeypatch.setenv(launch.SHARED_STORE_SWITCH, "")
    monkeypatch.delenv(launch.SHARED_STORE_SWITCH)


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


def failed(*exitcodes: int) -> ChildFailedError:
    """torchrun's error for workers of ranks 0, 1 ... ending with `exitcodes` (no error files)."""
    failures = {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in enumerate(exitcodes)}
    return ChildFailedError("sequencer", failures)


@pytest.mark.parametrize(
    ("exitcodes", "code", "line"),
    [
        ((2,), 2, ""),  # refused: the worker printed its one line, and torchrun's traceback would follow it
        ((2, 2), 2, ""),
        ((2, 1), 1, "sequencer-run: error: worker rank 0 exited with code 2, rank 1 exited with code 1\n"),
        ((-9,), 1, "sequencer-run: error: worker rank 0 was killed by SIGKILL\n"),
    ],
)
def test_failed_workers_end_in_their_exit_code_without_torchruns_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, exitcodes: tuple[int, ...], code: int, line: str
) -> None:
    def fail(args):
        raise failed(*exitcodes)

    monkeypatch.setattr(launch, "run", fail)
    assert launch.main(FLAGS) == code
    assert capsys.readouterr().err == line


STATIC = ["--nproc-per-node", "2", "--max-restarts", "1"]


@pytest.mark.parametrize(
    "flags",
    [
        [*STATIC, "--master-port", "29511"],
        [*STATIC, "--nnodes", "2", "--node-rank", "0", "--master-addr", "head"],
        [*STATIC, "--rdzv-backend", "static", "--rdzv-endpoint", "head:29400"],
    ],
)
def test_a_restartable_launch_on_the_static_rendezvous_is_refused_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, flags: list[str]
) -> None:
    monkeypatch.setattr(launch, "run", lambda args: pytest.fail("launched"))
    assert launch.main([*flags, "-m", "sequencer", "train"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("sequencer-run: error: --max-restarts"), error
    assert "--standalone" in error and "--rdzv-backend c10d --rdzv-endpoint HOST:PORT" in error


def test_restartable_launches_on_a_c10d_rendezvous_start(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(launch, "run", lambda args: seen.append(args.rdzv_backend))
    for flags in (
        ["--standalone"],
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29400"],
        ["--max-restarts", "0"],
    ):
        assert launch.main([*STATIC, *flags, "-m", "sequencer", "train"]) == 0
    assert len(seen) == 3
    # One node, no endpoint, no port: the torchruns whose --master-port has no default switch it to c10d themselves.
    switches = get_args_parser().parse_args(["-m", "sequencer"]).master_port is None
    assert launch.main([*STATIC, "-m", "sequencer", "train"]) == (0 if switches else 2)


def test_a_worker_on_a_store_shared_despite_the_switch_is_told_to_change_the_rendezvous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    monkeypatch.delenv(launch.SHARED_STORE_SWITCH, raising=False)
    with pytest.raises(UsageError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment"):
        distributed.check_restartable()
    # Set, and the store shared all the same: the static rendezvous, which ignores it.
    monkeypatch.setenv(launch.SHARED_STORE_SWITCH, "1")
    with pytest.raises(UsageError) as caught:
        distributed.check_restartable()
    assert "static rendezvous" in str(caught.value) and "=1 in its environment" not in str(caught.value)
    assert "--standalone" in str(caught.value) and "--rdzv-backend c10d --rdzv-endpoint HOST:PORT" in str(caught.value)
