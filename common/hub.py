"""Whether the Hugging Face hub can be reached, asked once per process.

Hub names load through ``huggingface_hub``/``datasets`` as usual when it can; when it cannot,
asking them anyway costs ~25 s of retries per name, so callers check here first and go straight
to the packaged copy. ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) means unreachable.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(flag, "").lower() in ("1", "true", "yes", "on")
           for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
