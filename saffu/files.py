"""File helpers shared by the caches and the analysis's writers."""

from __future__ import annotations

import os


def apply_umask_mode(path: str | os.PathLike[str], directory: bool = False) -> None:
    """Give `path` the mode that the current umask gives a new file or folder.

    tempfile.mkstemp and mkdtemp create their results readable by the owner only. The
    caches and results are written through them and then renamed into place, so without
    this a cache folder shared by several users, or a results file, would stay private.
    """
    # os.umask can only be read by setting it, so set it and put it back.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)
