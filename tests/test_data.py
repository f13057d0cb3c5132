"""Corpus folders, the WikiText loader without the hub, and the token cache."""

import pytest
from omegaconf import OmegaConf

from saffu.data import CorpusError, prepare, read_folder, read_wikitext


def folder_config(directory, cache_dir, **overrides):
    values = dict(name="folder", dir=str(directory), max_train_tokens=None, max_eval_tokens=None, cache_dir=str(cache_dir))
    values.update(overrides)
    return OmegaConf.create(values)


@pytest.fixture()
def small_corpus(tmp_path, gutenberg_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split, size in (("train", 60_000), ("valid", 8_000), ("test", 8_000)):
        text = (gutenberg_dir / f"{split}.txt").read_text(encoding="utf-8")[:size]
        (corpus / f"{split}.txt").write_text(text, encoding="utf-8")
    return corpus


def test_wikitext_without_hub_names_folder_form(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CorpusError) as error:
        read_wikitext("Salesforce/wikitext", "wikitext-2-raw-v1")
    assert "data=folder data.dir=PATH" in str(error.value)


def test_folder_rejects_bad_files(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with pytest.raises(CorpusError, match="train.txt"):
        read_folder(corpus)
    (corpus / "train.txt").write_text("some text\n")
    (corpus / "valid.txt").write_bytes(b"\xff\xfe\x00\x01")
    (corpus / "test.txt").write_text("more text\n")
    with pytest.raises(CorpusError, match="binary"):
        read_folder(corpus)
    (corpus / "valid.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not valid UTF-8"):
        read_folder(corpus)
    (corpus / "valid.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="empty"):
        read_folder(corpus)


def test_token_cache_reused_and_cut(small_corpus, tmp_path):
    tokenizer_cfg = OmegaConf.create({"vocab_size": 400, "min_frequency": 2})
    full = prepare(folder_config(small_corpus, tmp_path / "cache"), tokenizer_cfg)
    assert full.vocab_size == 400
    assert full.chars["valid"] == len((small_corpus / "valid.txt").read_text(encoding="utf-8"))

    cut = prepare(folder_config(small_corpus, tmp_path / "cache", max_train_tokens=1000, max_eval_tokens=500), tokenizer_cfg)
    assert cut.key == full.key
    assert cut.train.numel() == 1000
    assert cut.valid.numel() == 500
    assert (cut.train == full.train[:1000]).all()
    assert 0 < cut.chars["valid"] < full.chars["valid"]
    assert len(list((tmp_path / "cache").iterdir())) == 2  # the cache folder and its lock file


def test_token_ids_decode_to_text(small_corpus, tmp_path):
    from tokenizers import Tokenizer

    corpus = prepare(folder_config(small_corpus, tmp_path / "cache"), OmegaConf.create({"vocab_size": 400, "min_frequency": 2}))
    tokenizer = Tokenizer.from_file(str(corpus.tokenizer_path))
    assert tokenizer.decode(corpus.test.tolist()) == (small_corpus / "test.txt").read_text(encoding="utf-8")


def test_complete_token_cache_read_without_lock(small_corpus, tmp_path, monkeypatch):
    import os

    import saffu.data

    tokenizer_cfg = OmegaConf.create({"vocab_size": 400, "min_frequency": 2})
    built = prepare(folder_config(small_corpus, tmp_path / "cache"), tokenizer_cfg)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "cache" / built.key).stat().st_mode & 0o777 == 0o777 & ~umask

    def read_only_lock(path):
        raise OSError(30, "Read-only file system", path)

    # A read-only cache folder refuses the lock file; a complete cache needs none.
    monkeypatch.setattr(saffu.data, "FileLock", read_only_lock)
    again = prepare(folder_config(small_corpus, tmp_path / "cache"), tokenizer_cfg)
    assert again.key == built.key
    assert (again.train == built.train).all()


def test_interrupted_tokenization_leaves_nothing(small_corpus, tmp_path, monkeypatch):
    """Ctrl-C while the token cache is written removes its staging folder. One left by a
    job killed with SIGKILL is removed by the next build of that cache."""
    import saffu.data

    tokenizer_cfg = OmegaConf.create({"vocab_size": 400, "min_frequency": 2})
    real_encode = saffu.data.encode

    def interrupted_on_valid(tokenizer, text):
        if len(text) < 10_000:  # the validation split, after the training split was saved
            raise KeyboardInterrupt
        return real_encode(tokenizer, text)

    monkeypatch.setattr(saffu.data, "encode", interrupted_on_valid)
    with pytest.raises(KeyboardInterrupt):
        prepare(folder_config(small_corpus, tmp_path / "cache"), tokenizer_cfg)
    (lock,) = (tmp_path / "cache").iterdir()
    assert lock.suffix == ".lock"

    leftover = lock.with_suffix(".k1ll3d")
    leftover.mkdir()
    (leftover / "train.ids.npy").write_bytes(b"half a cache")
    monkeypatch.setattr(saffu.data, "encode", real_encode)
    corpus = prepare(folder_config(small_corpus, tmp_path / "cache"), tokenizer_cfg)
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [corpus.key, lock.name]
