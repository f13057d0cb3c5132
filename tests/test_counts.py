"""The count cache: jobs on the same text share co-occurrence counts and solve the same model."""

import logging
import os

import pytest
import torch

import saffu.explicit
from saffu.counts import CountCache
from saffu.explicit import solve_model
from tests.test_method import markov_chain, sample_chain, solver_config
from tests.test_stacking import VOCAB, stacked_model


@pytest.fixture(scope="module")
def chain_tokens():
    transitions, generator = markov_chain(VOCAB, seed=11, concentration=0.5)
    return sample_chain(transitions, 3000, generator)


def solved_state(tokens, counts, kind="onehot", code_dim=None):
    model = stacked_model(tokens, layers=2, block_size=3, radius=5, kind=kind, code_dim=code_dim)
    solve_model(model, tokens, solver_config(calibration_tokens=256), torch.Generator().manual_seed(0), counts)
    return model.state_dict()


def assert_same_state(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.fixture
def call_counter(monkeypatch):
    """Counts the calls of the functions that count pairs and window inputs."""
    calls = {"pair_counts": 0, "shifted_inputs": 0}
    for name in calls:
        original = getattr(saffu.explicit, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(saffu.explicit, name, counting)
    return calls


@pytest.mark.parametrize("kind, code_dim", [("onehot", None), ("bitcode", 6)])
def test_cached_counts_give_the_same_model(chain_tokens, tmp_path, kind, code_dim):
    direct = solved_state(chain_tokens, None, kind, code_dim)
    first = solved_state(chain_tokens, CountCache(tmp_path), kind, code_dim)
    second = solved_state(chain_tokens, CountCache(tmp_path), kind, code_dim)
    assert_same_state(first, direct)
    assert_same_state(second, direct)


def test_second_solve_reads_every_count(chain_tokens, tmp_path, call_counter):
    solved_state(chain_tokens, CountCache(tmp_path))
    # Layer 0 counts its three block offsets and its window. Layer 1 reads distributions in
    # its block experts, so it counts only its window, under another calibration mask.
    names = sorted(path.name for path in tmp_path.glob("*/*.pt"))
    assert names == sorted(["offset0.pt", "offset1.pt", "offset2.pt", "bag_of_words_r5.pt", "bag_of_words_r5.pt"])
    assert len(list(tmp_path.iterdir())) == 2  # one folder per text and counted mask
    assert call_counter["pair_counts"] == 3

    call_counter.update(pair_counts=0, shifted_inputs=0)
    solved_state(chain_tokens, CountCache(tmp_path))
    assert call_counter == {"pair_counts": 0, "shifted_inputs": 0}


def test_another_text_gets_its_own_counts(chain_tokens, tmp_path):
    solved_state(chain_tokens, CountCache(tmp_path))
    solved_state(chain_tokens[:2000], CountCache(tmp_path))
    assert len([path for path in tmp_path.iterdir() if path.is_dir()]) == 4


def test_unreadable_count_file_is_counted_again(chain_tokens, tmp_path, caplog):
    direct = solved_state(chain_tokens, None)
    solved_state(chain_tokens, CountCache(tmp_path))
    damaged = next(tmp_path.glob("*/offset1.pt"))
    damaged.write_bytes(damaged.read_bytes()[:100])

    with caplog.at_level(logging.WARNING, logger="saffu.counts"):
        assert_same_state(solved_state(chain_tokens, CountCache(tmp_path)), direct)
    assert caplog.text.count(f"count cache file {damaged} is unreadable") == 1
    flat, count = torch.load(damaged, weights_only=True)["tensors"]
    assert count.sum() > 0
    assert flat.numel() == count.numel()


def test_count_file_of_another_offset_is_counted_again(chain_tokens, tmp_path, caplog):
    direct = solved_state(chain_tokens, None)
    solved_state(chain_tokens, CountCache(tmp_path))
    folder = next(path.parent for path in tmp_path.glob("*/offset1.pt"))
    (folder / "offset1.pt").write_bytes((folder / "offset2.pt").read_bytes())

    with caplog.at_level(logging.WARNING, logger="saffu.counts"):
        assert_same_state(solved_state(chain_tokens, CountCache(tmp_path)), direct)
    assert "written for another count, text or format" in caplog.text


def test_full_disk_while_writing_still_solves(chain_tokens, tmp_path, caplog, monkeypatch):
    """Count files written to /dev/full, which fails every write with ENOSPC."""
    real_fdopen = os.fdopen

    def full_disk(handle, mode):
        os.close(handle)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), mode)

    direct = solved_state(chain_tokens, None)
    monkeypatch.setattr(os, "fdopen", full_disk)
    with caplog.at_level(logging.WARNING, logger="saffu.counts"):
        assert_same_state(solved_state(chain_tokens, CountCache(tmp_path)), direct)
    assert "No space left on device" in caplog.text
    assert "failed to write count cache" in caplog.text
    # No count file and no half-written staging file is left, only the lock files.
    assert [path.name for path in tmp_path.glob("*/*") if not path.name.endswith(".lock")] == []


def test_count_files_get_the_umask_mode(chain_tokens, tmp_path):
    solved_state(chain_tokens, CountCache(tmp_path))
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.stat().st_mode & 0o777 for path in tmp_path.glob("*/*.pt")}
    assert modes == {0o666 & ~umask}


def test_unwritable_cache_folder_still_solves(chain_tokens, tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    direct = solved_state(chain_tokens, None)
    with caplog.at_level(logging.WARNING, logger="saffu.counts"):
        assert_same_state(solved_state(chain_tokens, CountCache(blocker / "counts")), direct)
    assert "is not writable" in caplog.text
    assert caplog.text.count("counting without it") == 1


def test_interrupted_write_leaves_nothing(chain_tokens, tmp_path, monkeypatch):
    """Ctrl-C while a count file is written stops the solve and removes the staging file.
    One left by a job killed with SIGKILL is removed when that count is written next."""
    real_fdopen = os.fdopen

    class InterruptedFile:
        """A file whose writes are interrupted once its first kilobyte has reached the disk."""

        def __init__(self, file):
            self.file = file
            self.written = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            if self.written + len(data) <= 1024:
                self.written += len(data)
                return self.file.write(data)
            self.file.write(bytes(data[: 1024 - self.written]))
            self.file.flush()
            raise KeyboardInterrupt

        def flush(self):
            self.file.flush()

    monkeypatch.setattr(os, "fdopen", lambda handle, mode: InterruptedFile(real_fdopen(handle, mode)))
    with pytest.raises(KeyboardInterrupt):
        solved_state(chain_tokens, CountCache(tmp_path))
    (folder,) = tmp_path.iterdir()
    assert [path.name for path in folder.iterdir() if not path.name.endswith(".lock")] == []

    monkeypatch.setattr(os, "fdopen", real_fdopen)
    lock = next(folder.glob("*.pt.lock"))
    leftover = lock.with_name(lock.name.removesuffix(".lock") + ".k1ll3d")
    leftover.write_bytes(b"half a count file")
    solved_state(chain_tokens, CountCache(tmp_path))
    assert not leftover.exists()
    assert [path.name for path in folder.iterdir() if not path.name.endswith((".lock", ".pt"))] == []
