"""Shared test fixtures: the CLI runner and its refusal check, the image-tree builder, a small model whose logits differ
between images."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sequencer
from sequencer.cli import build_parser, main
from sequencer.train_config import TrainConfig


def pytest_configure(config: pytest.Config) -> None:
    """Split the cores among pytest-xdist's workers, in this process and the ones its tests start: two processes
    that each run one OpenMP thread per core slow each other ten times over."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is None:
        return
    threads = max(1, len(os.sched_getaffinity(0)) // int(workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def build_image_tree(
    root: Path,
    classes: int | Sequence[str] = 2,
    per_class: int = 6,
    size: int = 16,
    splits: Sequence[str] = ("train", "val"),
    suffix: str = ".png",
    file_names: Sequence[str] | None = None,
) -> Path:
    """ROOT/<split>/<class>/<image> (ROOT/<class>/<image> with no splits): noise tinted by class, one colour channel
    per class, so that up to three classes are learnable whatever the crop or flip. `classes` is a count (folders
    class_0, class_1, ...) or the folder names (WordNet ids, numbers ...); `file_names` name the images in order."""
    names = [f"class_{i}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    rng = np.random.default_rng(0)
    files = iter(file_names or [])
    for split in splits or [""]:
        for label, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
                pixels[..., label % 3] += 150
                Image.fromarray(pixels).save(folder / next(files, f"{i}{suffix}"))
    return root


def _to_authors_format(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our keys to the authors' layout (the inverse of `sequencer.checkpoint.from_authors_format`)."""
    depths: dict[int, int] = {}
    for key in state_dict:
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", key):
            depths[int(m.group(1))] = max(depths.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    out = {}
    for key, value in state_dict.items():
        key = re.sub(
            r"^stages\.(\d+)\.downsample\.down\.",
            lambda m: f"blocks.{int(m.group(1)) - 1}.{depths[int(m.group(1)) - 1]}.down.",
            key,
        )
        key = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"blocks.\1.\2.", key)
        key = re.sub(r"^head\.fc\.", "head.", key)
        out[key] = value
    return out


@pytest.fixture(scope="session")
def to_authors_format() -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Our weights in the authors' key layout, as their checkpoints hold them."""
    return _to_authors_format


@pytest.fixture(scope="session")
def make_image_tree() -> Callable[..., Path]:
    """`build_image_tree`, the one builder of class-folder image trees for every test."""
    return build_image_tree


def tiny_with_head(num_classes: int = 1000) -> torch.nn.Module:
    """sequencer2d_tiny with a random head: the zero-initialised one makes every logit 0 and comparisons vacuous."""
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny", num_classes=num_classes)
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., torch.nn.Module]:
    """`tiny_with_head`, for tests: sequencer2d_tiny with a random head, in eval mode."""
    return tiny_with_head


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_with_head()`'s weights in a .safetensors file."""
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    sequencer.save_weights(tiny_with_head(), path)
    return path


@pytest.fixture(scope="session")
def onnx_export(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`sequencer export --model sequencer2d_tiny --checkpoint CHECKPOINT --format onnx --dynamic-batch`, run once
    for the session (an ONNX export takes about 10 s here): the file it wrote and what the command printed."""
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    argv = ["export", "--model", "sequencer2d_tiny", "--checkpoint", str(checkpoint), "--format", "onnx"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*argv, "-o", str(path), "--dynamic-batch"]) == 0
    return path, printed.getvalue()


def write_hub_cache(cache: Path, repo_id: str, filename: str, state_dict: dict[str, torch.Tensor]) -> None:
    """huggingface_hub's cache layout: models--ORG--NAME/refs/main holds the commit, snapshots/COMMIT/ the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / filename)  # timm's push_to_hub format
    else:
        torch.save(state_dict, snapshot / filename)


@pytest.fixture(scope="session")
def fill_hub_cache() -> Callable[..., None]:
    """`write_hub_cache(cache, repo_id, filename, state_dict)`: weights in a huggingface_hub cache, as downloaded."""
    return write_hub_cache


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty huggingface_hub cache in tmp, offline (huggingface_hub reads the variables once, at import)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _argv(parts: tuple[object, ...]) -> list[str]:
    """Command-line words: a string with spaces is split as a shell would, anything else is one word ("" too)."""
    words = []
    for part in parts:
        text = str(part)
        words += shlex.split(text) if isinstance(part, str) and any(c.isspace() for c in text) else [text]
    return words


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., int]:
    """`sequencer WORDS...` run in-process through the real entry point; returns its exit code."""

    def run(*parts: object) -> int:
        try:
            return main(_argv(parts))
        except SystemExit as exited:  # what argparse ends with: a refused flag (2), --help or --version (0)
            return exited.code

    return run


def _contents(folder: Path) -> dict[str, bytes | None] | None:
    """Every path under `folder` with its bytes (None for a folder); None when `folder` does not exist."""
    if not folder.exists():
        return None
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


@pytest.fixture
def assert_refused(request: pytest.FixtureRequest) -> Callable[..., str]:
    """`assert_refused(WORDS..., match=REGEX, absent=PATHS, unchanged=FOLDER)`: `sequencer WORDS...` is refused (exit
    code 2, one line on stderr, "sequencer COMMAND: error: ..." in which REGEX is found) and writes nothing (no path
    of PATHS exists afterwards; FOLDER holds what it held before). Returns the line, without its newline."""
    # pytest allows one capture per test: stderr is read through the test's capfd if it has one
    capture = request.getfixturevalue("capfd" if "capfd" in request.fixturenames else "capsys")

    def check(*words: object, match: str, absent: Sequence[Path] = (), unchanged: Path | None = None) -> str:
        argv = _argv(words)
        before = _contents(unchanged) if unchanged is not None else None
        capture.readouterr()  # what the test printed before
        try:
            code = main(argv)
        except SystemExit as exited:  # the parser refuses from inside parse_args
            code = exited.code
        error = capture.readouterr().err
        assert code == 2, f"exit code {code}, not 2; stderr: {error!r}"
        assert error.endswith("\n") and error.count("\n") == 1, f"not one line: {error!r}"
        assert error.startswith(f"sequencer {argv[0]}: error: "), error
        assert re.search(match, error), f"{match!r} not found in {error!r}"
        for path in absent:
            assert not Path(path).exists(), f"{path} was written"
        if unchanged is not None:
            assert _contents(unchanged) == before, f"{unchanged} changed"
        return error.removesuffix("\n")

    return check


@pytest.fixture(scope="session")
def parse_cli() -> Callable[..., argparse.Namespace]:
    """The arguments `sequencer WORDS...` would run with, parsed by the real parser (nothing runs)."""

    def parse(*parts: object) -> argparse.Namespace:
        argv = _argv(parts)
        return build_parser(argv[0]).parse_args(argv)

    return parse


@pytest.fixture
def parse_train(parse_cli: Callable[..., argparse.Namespace]) -> Callable[..., TrainConfig]:
    """The `TrainConfig` `sequencer train WORDS...` would run with (nothing runs)."""

    def parse(*parts: object) -> TrainConfig:
        return TrainConfig(**{k: v for k, v in vars(parse_cli("train", *parts)).items() if k != "command"})

    return parse


class _Terminal(io.StringIO):
    """A buffer that says it is a terminal, where tqdm draws its bars."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def capture_stderr(monkeypatch: pytest.MonkeyPatch) -> Callable[..., io.StringIO]:
    """`capture_stderr(terminal=True)` puts a fresh buffer in place of sys.stderr, a terminal or a pipe; returns it."""

    def capture(terminal: bool = True) -> io.StringIO:
        buffer = _Terminal() if terminal else io.StringIO()
        monkeypatch.setattr(sys, "stderr", buffer)
        return buffer

    return capture


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Commands set torch's thread count for the process (--threads); give every test the suite's own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """predict's ONNX exports go to a folder of the run's, never to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("sequencer_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEQUENCER_CACHE", str(folder))
        yield folder


class Torchrun:
    """torchrun launches on 127.0.0.1, one thread per process; every process they start is ended with the test.

    torchrun puts each worker in a session of its own, so a process group does not hold them: they are found by a
    marker in their environment, which they inherit."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.launches: list[subprocess.Popen] = []

    @staticmethod
    def endpoint() -> str:
        """A rendezvous endpoint on 127.0.0.1, at a port that nothing listens on now."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"127.0.0.1:{probe.getsockname()[1]}"

    def start(
        self,
        launch: Sequence[str],
        command: Sequence[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        launcher: str = "torch.distributed.run",
    ) -> subprocess.Popen:
        """`torchrun LAUNCH... COMMAND...` in the background, its output captured; `env`: more variables;
        `launcher`: the module that launches (torchrun's, or `sequencer.launch`, which takes the same flags)."""
        env = {
            **os.environ,
            **(env or {}),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "SEQUENCER_TEST_LAUNCH": self.marker,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", launcher, "--local-addr", "127.0.0.1", *launch, *command],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.launches.append(process)
        return process

    def wait(self, process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
        """The launch's exit code and output; a launch still running after `timeout` s raises TimeoutExpired."""
        stdout, stderr = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def run(
        self,
        launch: Sequence[str],
        command: Sequence[str],
        cwd: Path,
        timeout: float,
        env: dict[str, str] | None = None,
        launcher: str = "torch.distributed.run",
    ) -> subprocess.CompletedProcess:
        """`start` and `wait`."""
        return self.wait(self.start(launch, command, cwd, env, launcher), timeout)

    def close(self) -> None:
        """Stop the launches still running (torchrun stops its workers on SIGTERM), then kill whatever is left."""
        for process in self.launches:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self._marked_processes():
            time.sleep(0.2)
        for pid in self._marked_processes():
            with contextlib.suppress(ProcessLookupError):  # ended meanwhile
                os.kill(pid, signal.SIGKILL)
        for process in self.launches:
            process.communicate()

    def _marked_processes(self) -> list[int]:
        """The processes (not zombies) whose environment carries this launcher's marker."""
        needle = f"SEQUENCER_TEST_LAUNCH={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                state = (entry / "stat").read_text().rpartition(")")[2].split()[0]  # after "PID (NAME)"
                if state != "Z" and needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return found


@pytest.fixture
def torchrun() -> Iterator[Torchrun]:
    """A `Torchrun` launcher whose processes are all ended when the test ends, passed or failed."""
    launcher = Torchrun()
    yield launcher
    launcher.close()


@pytest.fixture(scope="module")
def module_torchrun() -> Iterator[Torchrun]:
    """`torchrun` for a module-scoped fixture's launch (one run that several tests compare against)."""
    launcher = Torchrun()
    yield launcher
    launcher.close()
