"""Weights from the Hugging Face Hub (`hf-hub:`), offline from a pre-filled huggingface_hub cache; pretrained=True."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import warnings
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

import sequencer
from sequencer import hub, model
from sequencer.builder import open_source
from sequencer.errors import CheckpointError

REPO = "timm/sequencer2d_tiny.in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # conftest.write_hub_cache's
SRC = Path(__file__).resolve().parents[1] / "src"


def assert_same_weights(loaded: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def test_hf_hub_weights_load_from_the_cache_offline(fill_hub_cache, tiny_model, offline_cache: Path) -> None:
    reference = tiny_model()
    fill_hub_cache(offline_cache, REPO, "model.safetensors", reference.state_dict())
    for spec in (f"hf-hub:{REPO}", f"hf-hub:{REPO}@main"):
        assert_same_weights(sequencer.create_model("sequencer2d_tiny", pretrained=spec), reference)
    # --checkpoint takes the same path: the builder fetches the spec (the cached file) and checkpoint reads that.
    assert hub.fetch(f"hf-hub:{REPO}").startswith(str(offline_cache))
    assert open_source(f"hf-hub:{REPO}").state_dict.keys() == reference.state_dict().keys()


# timm's config.json (save_for_hf) of a 3-class repo whose weights carry no record of ours.
TIMM_CONFIG = {
    "architecture": "sequencer2d_tiny",
    "num_classes": 3,
    "pretrained_cfg": {
        "input_size": [3, 48, 48],
        "crop_pct": 0.95,
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    },
    "label_names": ["cat", "dog", "fox"],
}


def test_a_repos_config_json_is_read_as_a_local_dir_of_the_same_files_reads_it(
    fill_hub_cache, tiny_model, offline_cache: Path
) -> None:
    fill_hub_cache(offline_cache, "someone/tiny-timm", "model.safetensors", tiny_model(3).state_dict())
    snapshot = next(offline_cache.rglob("model.safetensors")).parent
    (snapshot / "config.json").write_text(json.dumps(TIMM_CONFIG))
    remote = open_source("hf-hub:someone/tiny-timm").record
    assert remote == open_source(f"local-dir:{snapshot}").record
    assert (remote.model_name, remote.class_names, remote.mean, remote.crop_pct, remote.interpolation) == (
        "sequencer2d_tiny",
        ("cat", "dog", "fox"),
        (0.5, 0.5, 0.5),
        0.95,
        "bilinear",
    )
    built = sequencer.create_model("sequencer2d_tiny", num_classes=3, pretrained="hf-hub:someone/tiny-timm")
    assert built.pretrained_cfg["std"] == (0.25, 0.25, 0.25) and built.pretrained_cfg["label_names"][2] == "fox"


def test_released_weights_keep_the_variants_own_input_whatever_the_repos_config_says(
    fill_hub_cache, tiny_model, offline_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As sequencer2d_s_392 reads timm/sequencer2d_s.in1k, whose config.json says 224: the variant's 392 must hold.
    fill_hub_cache(offline_cache, "someone/tiny-released", "model.safetensors", tiny_model(3).state_dict())
    snapshot = next(offline_cache.rglob("model.safetensors")).parent
    (snapshot / "config.json").write_text(json.dumps(TIMM_CONFIG))  # 48 px, other mean and std
    monkeypatch.setitem(hub.HUB_IDS, "sequencer2d_tiny", "someone/tiny-released")
    released = sequencer.create_model("sequencer2d_tiny", num_classes=3, pretrained=True)
    assert released.pretrained_cfg["input_size"] == (3, 32, 32) and released.pretrained_cfg["std"] != (0.25,) * 3


def test_weights_cached_without_the_repos_config_json_load_with_a_warning(
    fill_hub_cache, tiny_model, offline_cache: Path
) -> None:
    fill_hub_cache(offline_cache, "someone/tiny-weights-only", "model.safetensors", tiny_model(3).state_dict())
    # Offline, the cache cannot say whether the repo has a config.json: the weights alone, with a warning.
    with pytest.warns(UserWarning, match="config.json of someone/tiny-weights-only is not in the cache, and the Hub"):
        assert open_source("hf-hub:someone/tiny-weights-only").record.mean is None
    # The marker huggingface_hub leaves when the Hub said the repo has none: no warning.
    marker = offline_cache / "models--someone--tiny-weights-only" / ".no_exist" / COMMIT / "config.json"
    marker.parent.mkdir(parents=True)
    marker.touch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_source("hf-hub:someone/tiny-weights-only").record.mean is None


def test_pytorch_model_bin_is_the_fallback(fill_hub_cache, tiny_model, offline_cache: Path) -> None:
    reference = tiny_model(num_classes=10)
    fill_hub_cache(offline_cache, "someone/tiny-bin", "pytorch_model.bin", reference.state_dict())
    loaded = sequencer.create_model("sequencer2d_tiny", num_classes=10, pretrained="hf-hub:someone/tiny-bin")
    assert_same_weights(loaded, reference)


def test_empty_cache_offline_is_a_clear_error(assert_refused, offline_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as caught:
        sequencer.create_model("sequencer2d_tiny", pretrained=f"hf-hub:{REPO}")
    message = str(caught.value)
    assert f"could not get hf-hub:{REPO}" in message and str(offline_cache) in message
    assert "HF_HUB_OFFLINE" in message and "model.safetensors" in message and "pytorch_model.bin" in message
    Image.new("RGB", (40, 40)).save(tmp_path / "black.png")
    command = ["predict", str(tmp_path / "black.png"), "--model", "sequencer2d_tiny", "--checkpoint", f"hf-hub:{REPO}"]
    assert_refused(*command, match=f"^sequencer predict: error: could not get hf-hub:{re.escape(REPO)}")
    with pytest.raises(ValueError, match="expected hf-hub:ORG/REPO"):
        sequencer.create_model("sequencer2d_tiny", pretrained="hf-hub:no-slash")


def test_pretrained_true_uses_the_hub_first_then_the_release_url(
    fill_hub_cache, tiny_model, offline_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.HUB_IDS["sequencer2d_s"] == hub.HUB_IDS["sequencer2d_s_392"] == "timm/sequencer2d_s.in1k"
    url = "https://example.invalid/weights/sequencer2d_tiny.pth"
    monkeypatch.setitem(hub.HUB_IDS, "sequencer2d_tiny", REPO)
    monkeypatch.setitem(model.WEIGHTS, "sequencer2d_tiny", url)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    fetched: list[str] = []

    def unreachable(address: str, *args, **kwargs) -> None:
        fetched.append(address)
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(CheckpointError) as caught:
        sequencer.create_model("sequencer2d_tiny", pretrained=True)
    message = str(caught.value)
    assert REPO in message and url in message and "pass the file: pretrained=PATH" in message
    assert fetched == [url]

    # The release URL when the Hub fails: downloaded once into torch.hub's folder, then reused.
    released = tiny_model(num_classes=1000)

    def download(address: str, destination: str, **kwargs) -> None:
        fetched.append(address)
        torch.save({"state_dict": released.state_dict()}, destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        assert_same_weights(sequencer.create_model("sequencer2d_tiny", pretrained=True), released)
    assert fetched == [url, url]

    # With the Hub's copy in the cache, the URL is not touched.
    on_hub = tiny_model(num_classes=1000)
    torch.nn.init.normal_(on_hub.stem.proj.weight)
    fill_hub_cache(offline_cache, REPO, "model.safetensors", on_hub.state_dict())
    assert_same_weights(sequencer.create_model("sequencer2d_tiny", pretrained=True), on_hub)
    assert fetched == [url, url]


def test_two_urls_of_the_same_file_name_are_two_cached_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    fetched: list[str] = []

    def download(address: str, destination: str, **kwargs) -> None:
        fetched.append(address)
        Path(destination).write_text(address)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    first, second = (f"https://example.invalid/{run}/model_best.pth.tar" for run in ("run-a", "run-b"))
    for url in (first, second, first, second):
        path = Path(hub.fetch(url))
        assert path.read_text() == url and path.name.endswith("model_best.pth.tar")
    assert fetched == [first, second]  # each downloaded once, then its own file reused
    # Offline, a file torch.hub (or an older version of ours) cached under the bare name is used, with a warning.
    (tmp_path / "torch-hub" / "checkpoints" / "released.pth").write_text("cached before")

    def offline(address: str, destination: str, **kwargs) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.warns(UserWarning, match="cached under its file name by an earlier download"):
        assert Path(hub.fetch("https://example.invalid/released.pth")).read_text() == "cached before"
    with pytest.raises(CheckpointError, match=r"could not fetch https://example\.invalid/other\.pth"):
        hub.fetch("https://example.invalid/other.pth")


@pytest.fixture
def hanging_up_server() -> Iterator[tuple[str, list[int]]]:
    """http://127.0.0.1:PORT, where every request is read and its connection closed unanswered; the count of them.

    Reading first makes every client see the same thing: closing at once would race the request (a reset while
    sending, which some clients retry, or a read error)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    connections: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            connections.append(1)
            connection.settimeout(2)
            with contextlib.suppress(OSError):
                connection.recv(65536)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", connections
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def online_cache(offline_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The empty cache of `offline_cache` with HF_HUB_OFFLINE unset: huggingface_hub would go to the network."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return offline_cache


def test_an_unreachable_hub_is_asked_once_and_each_source_tried_once(
    fill_hub_cache,
    tiny_model,
    online_cache: Path,
    hanging_up_server: tuple[str, list[int]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    address, connections = hanging_up_server
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", address)
    monkeypatch.setitem(hub.HUB_IDS, "sequencer2d_tiny", REPO)
    monkeypatch.setitem(model.WEIGHTS, "sequencer2d_tiny", f"{address}/sequencer2d_tiny.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    with caplog.at_level(logging.INFO), pytest.raises(CheckpointError) as caught:
        sequencer.create_model("sequencer2d_tiny", pretrained=True)
    assert len(connections) == 2  # the Hub once (then its cache only), the release URL once
    # A peer that hangs up reads as either error, as the close races the request.
    assert re.search(
        rf"the Hugging Face Hub at {address} cannot be reached \((RemoteProtocolError|ReadError)", str(caught.value)
    )
    assert "Retry" not in caplog.text and "thrown while requesting" not in caplog.text
    # The cache still serves what it holds, with the Hub unreachable.
    fill_hub_cache(online_cache, REPO, "model.safetensors", tiny_model().state_dict())
    assert_same_weights(sequencer.create_model("sequencer2d_tiny", pretrained=f"hf-hub:{REPO}"), tiny_model())
    assert len(connections) == 3


def test_a_closed_hub_port_is_one_line_without_retries(
    assert_refused,
    online_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # HF_ENDPOINT: nothing listens
    Image.new("RGB", (40, 40)).save(tmp_path / "black.png")
    command = ["predict", tmp_path / "black.png", "--model", "sequencer2d_tiny", "--checkpoint", f"hf-hub:{REPO}"]
    match = f"error: could not get hf-hub:{re.escape(REPO)}: the Hugging Face Hub at .* cannot be reached"
    with caplog.at_level(logging.INFO):
        error = assert_refused(*command, match=match)  # stderr through capfd: whatever writes to the descriptor too
    # huggingface_hub alone retries each weight file 5 times with backoff (~46 s), logging 11 lines per file.
    assert "Retry" not in caplog.text and "thrown while requesting" not in caplog.text
    assert "cannot be reached (ConnectError" in error and str(online_cache) in error


@pytest.mark.slow
def test_cli_checkpoint_from_the_hub_with_the_environment_variables(fill_hub_cache, tiny_model, tmp_path: Path) -> None:
    home = tmp_path / "hf-home"
    fill_hub_cache(home / "hub", REPO, "model.safetensors", tiny_model().state_dict())
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-m", "sequencer", "predict", str(tmp_path / "red.png"), "--model", "sequencer2d_tiny"]
    command += ["--runtime", "torch"]  # the weights' way from the Hub is the subject, not the engine
    ok = subprocess.run([*command, "--checkpoint", f"hf-hub:{REPO}"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "red.png" in ok.stdout
