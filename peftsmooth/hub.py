"""Pretrained weights from the Hugging Face hub, and a failure within seconds where it cannot be reached.

timm fetches `pretrained=True` weights through huggingface_hub, whose client retries a failed request
five times with back-off: about a minute of warnings on a machine without network before the error.
So before timm is asked, the hub gets one request, without retries, that must be answered within
PROBE_TIMEOUT_S seconds. If it is not, the client is put in offline mode for the call, as
`HF_HUB_OFFLINE=1` does (which is honoured as it is): a copy in the local Hugging Face cache still
loads, without a request, and a missing one is one line naming `model.weights=` and
`HF_HUB_OFFLINE=1`, raised before the model is even built.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

from peftsmooth.errors import UserError

PROBE_TIMEOUT_S = 3.0
# the files timm looks for in a hub repository, safetensors first
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@functools.lru_cache(maxsize=None)
def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `url` answers one HTTP request within `timeout` seconds. The request goes through the
    hub client's own session (its proxy and certificate settings) but not its retries, and runs in a
    thread, since a name lookup has no timeout of its own. Asked once per process."""
    answered: list[bool] = []

    def ask() -> None:
        try:
            from huggingface_hub.utils import get_session

            get_session().head(url, timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001 - no answer, whatever the reason (DNS, refused, TLS, timeout)
            answered.append(False)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


def offline_reason() -> str | None:
    """Why the hub will not be asked (HF_HUB_OFFLINE=1, or it does not answer), None when it will."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1 is set"
    if reachable(constants.ENDPOINT):
        return None
    return f"{constants.ENDPOINT} cannot be reached (no answer within {PROBE_TIMEOUT_S:g} s)"


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[str | None]:
    """Within: the hub client offline when the hub cannot be reached. Yields offline_reason()."""
    from huggingface_hub import constants

    reason = offline_reason()
    forced = reason is not None and not constants.HF_HUB_OFFLINE
    if forced:
        constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        if forced:
            constants.HF_HUB_OFFLINE = False


def hub_repo(model_name: str) -> str | None:
    """The hub repository timm loads `model_name`'s pretrained weights from (None: not from the hub)."""
    if model_name.startswith("hf-hub:") or model_name.startswith("hf_hub:"):
        return model_name.split(":", 1)[1]
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError):
        return None
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def cached(repo: str) -> bool:
    """Whether the local Hugging Face cache holds weights of `repo` (`id` or `id@revision`)."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    return any(isinstance(try_to_load_from_cache(repo_id, name, revision=revision or None), str)
               for name in WEIGHT_FILES)


def weights_error(what: str, key: str, cause: str) -> UserError:
    """The one line for pretrained weights that could not be had: where to put them instead."""
    return UserError(
        f"could not load pretrained weights for {what} ({cause}); give {key}.weights=/path/to/model.safetensors "
        f"(downloaded where the hub is reachable), or fill the Hugging Face cache there and run here with "
        f"HF_HUB_OFFLINE=1, or {key}.pretrained=false for random weights")


def require_cached(model_name: str, key: str, reason: str) -> None:
    """Offline: the weights must be in the cache already; fail now, before the model is built."""
    repo = hub_repo(model_name)
    if repo is not None and not cached(repo):
        raise weights_error(model_name, key, f"{reason}, and {repo} is not in the local Hugging Face cache")
