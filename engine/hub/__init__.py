"""Models from the Hugging Face Hub: search, variants with a memory-fit estimate, downloads,
and the local library. Every network call goes through the real `huggingface_hub` client,
with `HF_ENDPOINT`/`HF_TOKEN` read at call time (mirrors and tokens set after start-up work).

- `search.py`: `search_models`, `list_variants`, `estimate_memory` (what fits this machine).
- `downloads.py`: `DownloadManager` (queue, progress, pause/resume/cancel, retry, verify);
  `jobs.py`: its plain data (`DownloadJob`, `FileState`, `DownloadEvent`); `files.py`: cache
  layout, checksums and the queue lock.
- `library.py`: `local_models`, `delete_model`, `import_model`.
- `common.py`: endpoint, token (saved 0600, never logged), cache folder, error wording.
"""

from engine.hub.common import endpoint, get_token, hf_cache_dir, save_token
from engine.hub.downloads import DownloadManager
from engine.hub.jobs import DownloadEvent, DownloadJob, FileState
from engine.hub.library import LocalModel, delete_model, import_model, local_models
from engine.hub.search import (
    ModelSummary,
    Variant,
    estimate_memory,
    fit_label,
    list_variants,
    search_models,
    total_memory,
)

__all__ = [
    "DownloadEvent",
    "DownloadJob",
    "DownloadManager",
    "FileState",
    "LocalModel",
    "ModelSummary",
    "Variant",
    "delete_model",
    "endpoint",
    "estimate_memory",
    "fit_label",
    "get_token",
    "hf_cache_dir",
    "import_model",
    "list_variants",
    "local_models",
    "save_token",
    "search_models",
    "total_memory",
]
