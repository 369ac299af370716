"""What every Hub call shares: the endpoint, the token, the cache folder, error wording.

Everything is read at call time (not import time), so `HF_ENDPOINT`, `HF_TOKEN` and
`HF_HUB_CACHE` set after start-up are honoured. The token is only ever handed to the
`huggingface_hub` client or put in an `Authorization` header; it never enters a message,
a log line, an event or a state file. This module knows nothing about queues or formats.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers

from engine.errors import DownloadError
from engine.paths import data_dir

TOKEN_FILE = "hf_token"
LIBRARY = "latent-studio"


def endpoint() -> str:
    """The Hub (or mirror) URL, from `HF_ENDPOINT` now, else the client's default."""
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hf_cache_dir() -> Path:
    """The shared Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else the client's)."""
    if v := os.environ.get("HF_HUB_CACHE"):
        return Path(v)
    if v := os.environ.get("HF_HOME"):
        return Path(v) / "hub"
    return Path(constants.HF_HUB_CACHE)


def token_path() -> Path:
    return data_dir() / TOKEN_FILE


def save_token(token: str) -> Path:
    """Keep a Hub token in the app data folder, readable by the owner only (mode 0600)."""
    path = token_path()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token.strip())
    os.chmod(path, 0o600)
    return path


def get_token() -> str | None:
    """`HF_TOKEN`, else our saved token, else the one `huggingface_hub` saved (`hf auth login`)."""
    if v := os.environ.get("HF_TOKEN", "").strip():
        return v
    path = token_path()
    if path.is_file():
        text = path.read_text().strip()
        if text:
            return text
    try:
        from huggingface_hub import get_token as hf_get_token

        return hf_get_token()
    except Exception:
        return None


def auth_headers() -> dict[str, str]:
    """The client's own headers (user agent, `Authorization: Bearer` when there is a token)."""
    return build_hf_headers(token=get_token() or False, library_name=LIBRARY)


def api() -> HfApi:
    # token=False when none: the client must not pick up a stale one behind our back.
    return HfApi(endpoint=endpoint(), token=get_token() or False, library_name=LIBRARY)


def friendly_error(e: Exception, repo_id: str, path: str | None = None) -> DownloadError:
    """Turn a client exception into a one-line DownloadError that never carries the token."""
    where = f"{repo_id}/{path}" if path else repo_id
    page = f"{endpoint()}/{repo_id}"
    if isinstance(e, GatedRepoError):
        if get_token():
            msg = (
                f"{repo_id} is gated and your token has no access: request access on the model "
                f"page {page}, then retry"
            )
        else:
            msg = (
                f"{repo_id} is gated: request access on the model page {page}, then set HF_TOKEN "
                "(or save a token in Settings) and retry"
            )
    elif isinstance(e, RevisionNotFoundError):
        msg = f"{repo_id}: revision not found"
    elif isinstance(e, EntryNotFoundError):
        msg = f"{where}: no such file in the repository"
    elif isinstance(e, RepositoryNotFoundError):
        msg = (
            f"{repo_id}: repository not found (check the name; for a private repo set HF_TOKEN "
            "with a token that can read it)"
        )
    elif isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        msg = f"{where}: the Hub answered HTTP {status}"
    else:
        msg = f"{where}: {type(e).__name__}: {e}"
    return DownloadError(scrub(msg.splitlines()[0]))


def scrub(text: str) -> str:
    """Remove the token from any text before it leaves this package."""
    tok = get_token()
    return text.replace(tok, "***") if tok else text
