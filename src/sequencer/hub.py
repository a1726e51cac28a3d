"""Weights fetched for the builder (`fetch`): from the Hugging Face Hub (`hf-hub:ORG/REPO[@REVISION]`), an http(s) URL,
and the released weights behind `pretrained=True`; a folder in the Hub layout uploaded to the Hub (`upload`).

timm hosts the released Sequencer2D-S/M/L weights as `timm/sequencer2d_{s,m,l}.in1k`. Downloads go through
huggingface_hub's cache (HF_HOME, HF_HUB_CACHE), which later loads read from, also offline (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import warnings
from pathlib import Path
from urllib.parse import urlparse

from sequencer.checkpoint import HUB_CONFIG, WEIGHT_FILES
from sequencer.errors import CheckpointError, MissingDependencyError, UsageError

_logger = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
# timm's Hub copy of each variant's released weights; the 392 px variants are the same networks and weights.
HUB_IDS = {f"sequencer2d_{size}": f"timm/sequencer2d_{size}.in1k" for size in "sml"}
HUB_IDS.update({f"{name}_392": repo for name, repo in HUB_IDS.items()})


def fetch(source: str, with_config: bool = True) -> str:
    """The local path of checkpoint `source`: hf-hub:ORG/REPO[@REVISION] and http(s) URLs are downloaded (into
    huggingface_hub's and torch.hub's caches, which later calls read from); any other source is local already.
    `with_config` False: an hf-hub: source's weights file alone (see `download`)."""
    if source.startswith(HF_HUB_PREFIX):
        return download(source, with_config)
    if not source.startswith(("http://", "https://")):
        return source
    try:
        return _download_url(source)
    except OSError as error:
        raise CheckpointError(f"could not fetch {source}: {_first_line(error)}") from None


def download(spec: str, with_config: bool = True) -> str:
    """The local copy of `hf-hub:ORG/REPO[@REVISION]`'s weights (model.safetensors, else pytorch_model.bin): the
    snapshot folder, read as a local-dir: is, when the repo's config.json came too (`with_config`), else the weights
    file."""
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError as error:
        raise MissingDependencyError("hf-hub: weights need huggingface_hub: pip install huggingface_hub") from error
    repo_id, _, revision = spec.removeprefix(HF_HUB_PREFIX).partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UsageError(f"{spec!r}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    # Where the Hub cannot be reached, the cache alone: huggingface_hub would retry every file with backoff (~25 s
    # and 11 log lines each) before giving up.
    unreachable = (
        None if constants.HF_HUB_OFFLINE else _why_unreachable(constants.ENDPOINT, constants.HF_HUB_ETAG_TIMEOUT)
    )
    problems = []
    for filename in WEIGHT_FILES:
        try:
            weights = hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=bool(unreachable))
        except (OSError, ValueError, EntryNotFoundError) as error:
            problems.append(f"{filename}: {_first_line(error)}")
            continue
        if not with_config:
            return weights
        # timm's repos keep the input (mean, std, crop ...) and class names in config.json, not in the weights.
        config = _repo_config(spec, repo_id, revision or None, local_only=bool(unreachable))
        return str(Path(config).parent) if config and Path(config).parent == Path(weights).parent else weights
    if unreachable:
        raise CheckpointError(
            f"could not get {spec}: the Hugging Face Hub at {constants.ENDPOINT} cannot be reached ({unreachable}) "
            f"and its cache {constants.HF_HUB_CACHE} holds neither {' nor '.join(WEIGHT_FILES)}"
        )
    offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
    raise CheckpointError(
        f"could not get {spec} from the Hugging Face Hub or its cache {constants.HF_HUB_CACHE}{offline}: "
        f"{'; '.join(problems)}"
    )


def _repo_config(spec: str, repo_id: str, revision: str | None, local_only: bool) -> str | None:
    """The local file of the repo's config.json (downloaded unless `local_only`), None where the repo has none; None
    with a warning where the cache lacks it and the Hub cannot be asked whether the repo has one."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(repo_id, HUB_CONFIG, revision=revision, local_files_only=local_only)
    except LocalEntryNotFoundError:
        # Not cached as a file; the marker huggingface_hub leaves once the Hub said the repo has none is not None.
        if try_to_load_from_cache(repo_id, HUB_CONFIG, revision=revision) is not None:
            return None
    except EntryNotFoundError:  # the Hub says the repo has none
        return None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"could not get {spec}'s {HUB_CONFIG}: {_first_line(error)}") from None
    warnings.warn(
        f"{HUB_CONFIG} of {repo_id} is not in the cache, and the Hub, offline or unreachable, cannot say whether the "
        "repo has one: its weights are read without it, so their input (mean, std, crop) and class names are those "
        f"the weights file records, else the defaults; fetch it once online (hf download {repo_id} {HUB_CONFIG})",
        UserWarning,
        stacklevel=2,
    )
    return None


def _why_unreachable(endpoint: str, timeout: float) -> str | None:
    """Why the Hub at `endpoint` cannot serve files now, from one request that is not retried; None if it can."""
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(endpoint, timeout=timeout)
    except _transport_error() as error:  # refused, timed out, no route, hung up: huggingface_hub retries these
        return _first_line(error)
    return f"it answered HTTP {response.status_code}" if response.status_code >= 500 else None


def _transport_error() -> type[Exception]:
    """The error huggingface_hub's HTTP library raises when no answer came (HTTP errors are OSErrors already)."""
    from huggingface_hub.utils import get_session

    # huggingface_hub 1.x's session is an httpx client, 2.x's an httpx2 one: that library's TransportError.
    return importlib.import_module(type(get_session()).__module__.partition(".")[0]).TransportError


def check_repo_id(repo_id: str) -> None:
    """Refuse a repository name the Hub would refuse (ORG/NAME or NAME: letters, digits, -, _, .), before any work."""
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError as error:
        raise MissingDependencyError("the Hub needs huggingface_hub: pip install huggingface_hub") from error
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UsageError(f"Hub repository {repo_id!r}: {_first_line(error).partition(': ')[2]}") from None


def upload(folder: str | Path, repo_id: str, files: list[str], private: bool = False) -> str:
    """Upload `files` of `folder` (no other file there) to the Hub model repository `repo_id`, made first if missing
    (private if asked, else the account's default), as timm's push_to_hf_hub does; the token is huggingface_hub's
    (HF_TOKEN, `hf auth login`). Returns the repository's URL."""
    check_repo_id(repo_id)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        repo = api.create_repo(repo_id, private=private or None, exist_ok=True)
        api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            allow_patterns=files,  # file names: no wildcard in them
            commit_message="Add model (sequencer average)",
        )
    except (OSError, ValueError, _transport_error()) as error:
        problem = _first_line(error)
        raise CheckpointError(f"could not upload {folder} to {repo_id} on {api.endpoint}: {problem}") from None
    return str(repo)


def released_weights(name: str, url: str) -> str:
    """A local file of `name`'s released weights: timm's copy on the Hub first, else the authors' release `url`."""
    repo_id = HUB_IDS.get(name)
    if not repo_id and not url:
        raise CheckpointError(f"no released weights for {name!r}; pass pretrained=PATH to a checkpoint file")
    hub_problem = "no copy on the Hugging Face Hub"
    if repo_id:
        try:
            # The weights alone: the variant's own config describes them (the _392 names read them at 392 px,
            # where timm's config.json says 224).
            return download(HF_HUB_PREFIX + repo_id, with_config=False)
        except CheckpointError as error:
            hub_problem = str(error)
            _logger.info("%s; trying %s", hub_problem, url or "nothing else")
    url_problem = "no release URL"
    if url:
        try:
            return fetch(url)
        except CheckpointError as error:
            url_problem = str(error)
    raise CheckpointError(
        f"the released weights of {name} are unreachable. Hub: {hub_problem}. Release: {url_problem}. Download "
        "them where there is network and pass the file: pretrained=PATH, --checkpoint PATH or "
        "--initial-checkpoint PATH"
    )


def _download_url(url: str) -> str:
    """The file at `url`, kept where torch.hub keeps downloaded checkpoints (so earlier downloads are reused)."""
    import torch.hub

    # Keyed on the whole URL: two runs' model_best.pth.tar share a name, not their weights.
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = Path(urlparse(url).path).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / f"{digest}-{name}"
    if path.is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # torch.hub writes to a temporary file and renames it, so an interrupted download leaves no partial file.
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except OSError:
        # Offline, a file cached under the bare name (torch.hub's key, and ours before) is the best there is.
        shared = path.parent / name
        if not shared.is_file():
            raise
        warnings.warn(
            f"{url} cannot be fetched: using {shared}, cached under its file name by an earlier download (any URL "
            "of that name shares it)",
            UserWarning,
            stacklevel=2,
        )
        return str(shared)
    return str(path)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
