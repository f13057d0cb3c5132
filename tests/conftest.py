"""Shared fixtures: the real corpora, found through SAFFU_DATA_DIR."""

import os
from pathlib import Path

import pytest

CORPORA = ("gutenberg-fiction", "kjv")


def data_root() -> Path | None:
    """Return the folder that contains the real corpora, or None when SAFFU_DATA_DIR is unset."""
    value = os.environ.get("SAFFU_DATA_DIR")
    return Path(value) if value else None


@pytest.fixture(scope="session")
def corpora_dir() -> Path:
    """Folder of the real corpora. Skips without SAFFU_DATA_DIR, and fails instead when
    SAFFU_REQUIRE_DATA=1 (set by .ci/run), so CI never passes by skipping them."""
    root = data_root()
    missing = root is None or not all((root / name / "train.txt").is_file() for name in CORPORA)
    if missing:
        reason = f"the corpora {CORPORA} are not under SAFFU_DATA_DIR={root}; set it to the folder that holds them"
        if os.environ.get("SAFFU_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def gutenberg_dir(corpora_dir: Path) -> Path:
    return corpora_dir / "gutenberg-fiction"


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory, request):
    """Keeps tokenizer and token-id caches out of the user's home during tests unless
    SAFFU_CACHE_DIR is set (CI sets it so the tests share one cache)."""
    if "SAFFU_CACHE_DIR" not in os.environ:
        os.environ["SAFFU_CACHE_DIR"] = str(tmp_path_factory.mktemp("saffu-cache"))
    yield
