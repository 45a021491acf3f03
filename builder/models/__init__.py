"""Model wrappers for the slow validation level: NSFW scoring and CLIP embeddings.

Each wrapper is built cheaply (no weights), loads its model once in ``load()`` (in an actor's
setup) and is then called on batches. torch, transformers and onnxruntime are imported only in
``load()``, so this package imports without the ``ml`` extra. Preprocessing that runs on CPU
workers ahead of the models lives in ``builder.models.preprocess``.

Hugging Face model ids resolve to a local directory by ``resolve_model_dir``: a local path, else
the Hugging Face cache (``HF_HOME``), else a download when the hub is reachable and
``HF_HUB_OFFLINE`` is not set. Anything else is a ``ModelLoadError`` at once, never a hang on
retries.

The wrappers may be called from several threads at once (the in-process runner does), so every
lazy initialisation (imports, weights, processors, sessions) runs under ``LOAD_LOCK``, once.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builder.errors import ModelLoadError

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_TRUE = ("1", "true", "yes", "on")
HUB_PROBE_TIMEOUT_S = 5.0
_WEIGHT_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken")

LOAD_LOCK = threading.RLock()
"""Held by every lazy initialisation of the model wrappers, across all of them: transformers'
lazy imports are not thread-safe (two threads resolving its first attributes at once can get an
ImportError), and a model is loaded once however many threads ask for it first."""


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # imported, without a __spec__
        return True


def import_failure(exc: ImportError, needs: str, packages: Sequence[str]) -> ModelLoadError:
    """The error for ``exc``, raised importing ``packages`` for ``needs`` (what asks for them).

    Only a package that is not installed at all is "needs the ml extra"; an installed one that
    fails to import (a broken dependency, a lazy attribute that fails) names the real error, since
    installing the extra would not help.
    """
    absent = [name for name in packages if not _installed(name)]
    if absent:
        return ModelLoadError(f"{needs} needs {' and '.join(absent)} (the ml extra): "
                              "pip install 'pixcrawler[ml]'")
    return ModelLoadError(f"{needs}: {' and '.join(packages)} installed but failed to import: "
                          f"{type(exc).__name__}: {exc}")


def check_device(device: str) -> str:
    """Validate a device string ('cpu', 'cuda', 'cuda:N'); raise ValueError naming the options."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ValueError(f"device {device!r} is not valid; allowed: 'cpu', 'cuda', 'cuda:N'")
    return device


def torch_device(device: str) -> Any:
    """The torch device for a configured device string; fails if CUDA is configured but absent."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} is configured but torch sees no CUDA GPU on this worker; run the "
            "validator on a GPU node (resources.gpus_per_actor > 0) or configure device 'cpu'")
    return torch.device(device)


def hub_offline() -> bool:
    """Whether the hub must not be contacted (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return True
    return False


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def _hub_reachable(endpoint: str) -> str:
    """'' if the hub answers an HTTP request within a few seconds, else why not."""
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):
            return ""
    except urllib.error.HTTPError:
        return ""
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else is meant as a filesystem path."""
    return model_id.startswith(("/", ".", "~")) or "\\" in model_id or model_id.count("/") > 1


def resolve_model_dir(model_id: str) -> str:
    """A local directory holding the Hugging Face model ``model_id`` (a hub id or a path).

    A path (``/``, ``.`` or ``~`` first) is that directory. A hub id ('name', 'owner/name') is
    taken from the Hugging Face cache, or downloaded (only when not offline and the hub
    answers), and never from a folder of that name in the current one: whoever can write
    where the command runs (``/tmp``) could put a model of their own in place of the default
    ``openai/clip-vit-base-patch32`` there, and choose what the dataset keeps. Raises
    ModelLoadError, with what to do, when none works.
    """
    if _looks_like_path(model_id):
        local = Path(model_id).expanduser()
        if local.is_dir():
            return str(local.absolute())  # (a relative one would read as a hub id later)
        raise ModelLoadError(f"model directory {model_id!r} does not exist; give a directory "
                             "written by save_pretrained or a Hugging Face model id")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as exc:
        raise import_failure(exc, f"loading {model_id!r}", ("huggingface_hub",)) from exc
    how_to = ("the model must be available locally: download it beforehand into the Hugging Face "
              f"cache on every worker (HF_HOME; e.g. `hf download {model_id}`) or give a local "
              "directory written by save_pretrained as the model id")
    if Path(model_id).is_dir():
        how_to += (f" (a folder {model_id!r} here is not read for a hub id: write it as "
                   f"'./{model_id}' to use it)")
    try:
        return snapshot_download(model_id, local_files_only=True)
    except ValueError as exc:
        raise ModelLoadError(f"{model_id!r} is neither a local directory nor a valid Hugging Face "
                             f"model id: {exc}") from exc
    except OSError:
        pass
    if hub_offline():
        raise ModelLoadError(f"model {model_id!r} is not in the Hugging Face cache and "
                             f"HF_HUB_OFFLINE is set; {how_to}")
    endpoint = hub_endpoint()
    why = _hub_reachable(endpoint)
    if why:
        raise ModelLoadError(f"model {model_id!r} is not in the Hugging Face cache and the hub "
                             f"({endpoint}) cannot be reached ({why}); {how_to}")
    try:
        from huggingface_hub import HfApi

        files = HfApi(endpoint=endpoint).list_repo_files(model_id)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) \
            else ["*.bin"]
        return snapshot_download(model_id, endpoint=endpoint,
                                 allow_patterns=[*_WEIGHT_PATTERNS, *weights])
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"could not download model {model_id!r} from {endpoint}: {exc}; "
                             f"{how_to}") from exc


def load_image_processor(model_id: str, needs: str) -> Any:
    """The model's Pillow image processor (its size, crop, mean and std drive preprocessing;
    torchvision is not needed). ``needs`` names what asks for it, for the error message.
    Callers hold ``LOAD_LOCK``."""
    try:
        from transformers import AutoImageProcessor
    except ImportError as exc:
        raise import_failure(exc, needs, ("transformers",)) from exc
    directory = resolve_model_dir(model_id)
    try:
        return AutoImageProcessor.from_pretrained(directory, backend="pil")
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{model_id!r} has no usable image processor "
                             f"(preprocessor_config.json): {exc}") from exc


from builder.models.clip import ClipModel  # noqa: E402
from builder.models.nsfw import NsfwModel  # noqa: E402

__all__ = ["ClipModel", "NsfwModel", "ModelLoadError", "resolve_model_dir", "check_device",
           "torch_device", "hub_offline"]
