"""What ships inside the package (so the main job and the tests need nothing outside the repo), and where
larger data is found: always an explicit path or an environment variable, never a workspace path."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "tinystories-656k"
BUNDLED_TEXT = ASSETS / "text"
BUNDLED_TASKS = ASSETS / "tasks"

#: Directory holding the LLM-Adapters test sets (``<task>/test.json``), used when ``--data-dir`` is not given.
TASKS_DIR_ENV = "SKETCHTUNE_TASKS_DIR"


def default_tasks_dir() -> Path | None:
    """``$SKETCHTUNE_TASKS_DIR`` if set, else ``None`` (the caller asks for ``--data-dir``)."""
    value = os.environ.get(TASKS_DIR_ENV)
    return Path(value).expanduser() if value else None
