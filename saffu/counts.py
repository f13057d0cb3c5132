"""On-disk cache of the co-occurrence counts of the explicit solve, shared by a sweep's jobs.

The jobs of a sweep over one corpus count the same pairs again and again: block expert j
of a token layer counts (x_{t-j}, x_{t+1}) pairs, and the bag-of-words expert of radius r
sums those pairs over the offsets below r. Each count is stored once, under a key of the
training ids and the mask of positions the solve counts. Any later job with the same
inputs reads it instead of counting again, whatever its model.

A count is written to a temporary file and renamed, under a file lock, so jobs that start
together count it once and a killed job never leaves half a file. A file that cannot be
read is counted again and replaced. A folder that cannot be written only costs the time.
"""

import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from filelock import FileLock

from saffu.files import apply_umask_mode

log = logging.getLogger(__name__)

Tensors = tuple[torch.Tensor, ...]

# Part of every key and of every file: a change to what a count means must change it, so
# that files written by an older version are never read as new ones.
COUNT_FORMAT = 1


class CountCache:
    """Count files under `directory`, one folder per training text. With None, nothing is
    kept and every count is computed."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = None if directory is None else Path(directory).expanduser()
        self._warned = False

    def bind(self, tokens: torch.Tensor, counted: torch.Tensor, vocab_size: int) -> "TextCounts":
        """Return the counts of `tokens` (n,) over the positions where `counted` (n,) is True."""
        if self.directory is None:
            return TextCounts(self, None)
        digest = hashlib.sha256(f"format={COUNT_FORMAT};vocab={vocab_size};n={tokens.numel()}".encode())
        digest.update(tokens.to(torch.int64).contiguous().numpy().tobytes())
        digest.update(counted.to(torch.bool).contiguous().numpy().tobytes())
        return TextCounts(self, self.directory / digest.hexdigest()[:20])

    def _warn(self, message: str, *args) -> None:
        if not self._warned:
            log.warning(message, *args)
            self._warned = True


class TextCounts:
    """The counts of one text: `get(name, count)` reads `name` or counts and stores it."""

    def __init__(self, cache: CountCache, folder: Path | None):
        self.cache = cache
        self.folder = folder

    def get(self, name: str, count: Callable[[], Tensors]) -> Tensors:
        if self.folder is None:
            return count()
        path = self.folder / f"{name}.pt"
        stored = self._read(path, quiet=True)
        if stored is not None:
            return stored
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(path) + ".lock")
            lock.acquire()
        except OSError as error:
            self.cache._warn("count cache %s is not writable (%s); counting without it", self.folder, error)
            return count()
        try:
            stored = self._read(path)  # another job may have written it while this one waited
            if stored is not None:
                return stored
            value = count()
            self._write(path, value)
            return value
        finally:
            lock.release()

    def _read(self, path: Path, quiet: bool = False) -> Tensors | None:
        """Return the tensors stored at `path`, or None when the file is missing, unreadable
        or was written for another name, text or format. `quiet` leaves the warning to the
        second read, made under the lock."""
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, weights_only=True)
        except Exception as error:  # a truncated or foreign file: count again and replace it
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        else:
            if (
                isinstance(stored, dict)
                and stored.get("format") == COUNT_FORMAT
                and stored.get("key") == self.folder.name
                and stored.get("name") == path.stem
                and isinstance(stored.get("tensors"), list)
                and all(isinstance(item, torch.Tensor) for item in stored["tensors"])
            ):
                return tuple(stored["tensors"])
            reason = "written for another count, text or format"
        if not quiet:
            log.warning("count cache file %s is unreadable (%s); counting again", path, reason)
        return None

    def _write(self, path: Path, value: Tensors) -> None:
        stored = {"format": COUNT_FORMAT, "key": self.folder.name, "name": path.stem, "tensors": list(value)}
        staging = None
        # A file left by a job killed with SIGKILL is removed, because the caller holds this count's lock.
        for leftover in path.parent.glob(f"{path.name}.*"):
            if leftover.name != f"{path.name}.lock":
                leftover.unlink(missing_ok=True)
        # torch.save turns a Ctrl-C that lands in one of its file writes into a RuntimeError,
        # like a full disk, so the file is serialized in memory and written here.
        buffer = io.BytesIO()
        torch.save(stored, buffer)
        try:
            handle, staging = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
            with os.fdopen(handle, "wb") as file:
                file.write(buffer.getbuffer())
            apply_umask_mode(staging)
            os.replace(staging, path)
        except BaseException as error:
            if staging is not None:
                Path(staging).unlink(missing_ok=True)
            if not isinstance(error, OSError):  # Ctrl-C and SIGTERM
                raise
            self.cache._warn("failed to write count cache %s (%s); counting without it", path, error)
