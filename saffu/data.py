"""Corpora and their byte-level BPE token ids, cached on disk.

A corpus is a folder with train.txt, valid.txt and test.txt, or WikiText-2 (raw) loaded
through Hugging Face `datasets`. The tokenizer is trained on the whole training split,
and the ids of every split are cached under `data.cache_dir`, keyed by the content of
the three splits and the tokenizer settings, so the jobs of a sweep share them.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from omegaconf import DictConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from saffu.files import apply_umask_mode

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Bump when the cached files change meaning, so old caches are not reused.
CACHE_FORMAT = 1


class CorpusError(ValueError):
    """A corpus that cannot be used, with a message that names the file and the fix."""


@dataclass
class TokenizedCorpus:
    """Token ids of the three splits of one corpus, under one tokenizer.

    `train`, `valid` and `test` are 1-D int64 tensors of ids in [0, vocab_size), already cut
    to `max_train_tokens` / `max_eval_tokens`. `chars[split]` is the number of characters
    of the text those ids cover, the denominator of bits per character.
    """

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    chars: dict[str, int]
    key: str
    tokenizer_path: Path

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def read_folder(directory: str | os.PathLike) -> dict[str, str]:
    """Read train.txt, valid.txt and test.txt from a corpus folder as UTF-8 text."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise CorpusError(
            f"corpus folder {str(directory)!r} not found; set data.dir to a folder with train.txt, valid.txt and test.txt"
        )
    texts = {}
    for split in SPLITS:
        path = directory / f"{split}.txt"
        if not path.is_file():
            raise CorpusError(f"corpus file {str(path)!r} is missing; every corpus folder needs train.txt, valid.txt and test.txt")
        raw = path.read_bytes()
        if b"\x00" in raw:
            raise CorpusError(f"corpus file {str(path)!r} contains NUL bytes and looks binary; give plain UTF-8 text")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(
                f"corpus file {str(path)!r} is not valid UTF-8 (byte {error.start}); convert it, e.g. with iconv -t UTF-8"
            ) from None
        if not text.strip():
            raise CorpusError(f"corpus file {str(path)!r} is empty; every split needs text")
        texts[split] = text
    return texts


def read_wikitext(hf_path: str, hf_config: str) -> dict[str, str]:
    """Load WikiText through Hugging Face `datasets` and join each split into one text."""
    try:
        import datasets

        dataset = datasets.load_dataset(hf_path, hf_config)
    except Exception as error:  # datasets raises many types for an unreachable hub
        raise CorpusError(
            f"could not load {hf_path}/{hf_config} through Hugging Face datasets ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}). Without access to the hub, "
            "use a local corpus folder: python sweep.py data=folder data.dir=PATH "
            "(PATH holds train.txt, valid.txt and test.txt)"
        ) from None
    names = {"train": "train", "valid": "validation", "test": "test"}
    return {split: "".join(dataset[names[split]]["text"]) for split in SPLITS}


def read_corpus(data_cfg: DictConfig) -> dict[str, str]:
    """Read the three splits named by a `data` config."""
    if data_cfg.name == "folder":
        return read_folder(data_cfg.dir)
    if data_cfg.name == "wikitext2":
        return read_wikitext(data_cfg.hf_path, data_cfg.hf_config)
    raise CorpusError(f"data.name={data_cfg.name!r} is unknown; use data=folder or data=wikitext2")


def train_tokenizer(train_text: str, vocab_size: int, min_frequency: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `vocab_size` entries on the training text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_lines(train_text), trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode text line by line (newlines kept) and return the ids and, per token, the
    number of characters of the text up to the end of that token."""
    lines = _lines(text)
    encodings = tokenizer.encode_batch(lines, add_special_tokens=False)
    ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings] or [np.zeros(0, np.int64)])

    # Character offset of each token's end in the whole text; a token never spans two lines.
    ends = []
    line_start = 0
    for line, encoding in zip(lines, encodings):
        ends.append(line_start + np.asarray([end for _, end in encoding.offsets], dtype=np.int64))
        line_start += len(line)
    char_ends = np.concatenate(ends or [np.zeros(0, np.int64)])
    return ids, char_ends


def prepare(data_cfg: DictConfig, tokenizer_cfg: DictConfig) -> TokenizedCorpus:
    """Load a corpus and its token ids, training and caching the tokenizer on first use.

    Safe to call from many processes at once: one builds the cache under a file lock and
    the others wait for it, then read it.
    """
    texts = read_corpus(data_cfg)
    key = cache_key(texts, tokenizer_cfg)
    cache_dir = Path(data_cfg.cache_dir).expanduser() / key
    # A complete cache is read without the lock, so a read-only cache folder works.
    if not (cache_dir / "meta.json").is_file():
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache_dir) + ".lock"):
            if not (cache_dir / "meta.json").is_file():
                _build_cache(texts, tokenizer_cfg, cache_dir)
    return _load_cache(cache_dir, data_cfg)


def cache_key(texts: dict[str, str], tokenizer_cfg: DictConfig) -> str:
    digest = hashlib.sha256()
    digest.update(f"format={CACHE_FORMAT};vocab={tokenizer_cfg.vocab_size};min_freq={tokenizer_cfg.min_frequency}".encode())
    for split in SPLITS:
        digest.update(hashlib.sha256(texts[split].encode("utf-8")).digest())
    return digest.hexdigest()[:20]


def _build_cache(texts: dict[str, str], tokenizer_cfg: DictConfig, cache_dir: Path) -> None:
    start = time.perf_counter()
    tokenizer = train_tokenizer(texts["train"], tokenizer_cfg.vocab_size, tokenizer_cfg.min_frequency)
    vocab_size = tokenizer.get_vocab_size()

    # Write into a sibling temporary folder and rename it, so a killed job never leaves a half
    # cache. A folder left by a job killed with SIGKILL is removed here: the caller holds the
    # cache's lock, so no other build is writing one.
    for leftover in cache_dir.parent.glob(f"{cache_dir.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".", dir=cache_dir.parent))
    try:
        tokenizer.save(str(staging / "tokenizer.json"))
        lengths = {}
        for split in SPLITS:
            ids, char_ends = encode(tokenizer, texts[split])
            np.save(staging / f"{split}.ids.npy", ids)
            np.save(staging / f"{split}.char_ends.npy", char_ends)
            lengths[split] = int(ids.size)
        meta = {"vocab_size": vocab_size, "tokens": lengths, "format": CACHE_FORMAT}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))
        apply_umask_mode(staging, directory=True)
        os.replace(staging, cache_dir)
    except BaseException:  # Ctrl-C, SIGTERM or a full disk
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "tokenized corpus into %s: vocab %d, %s tokens (%.1f s)",
        cache_dir, vocab_size, lengths, time.perf_counter() - start,
    )


def _load_cache(cache_dir: Path, data_cfg: DictConfig) -> TokenizedCorpus:
    meta = json.loads((cache_dir / "meta.json").read_text())
    limits = {"train": data_cfg.max_train_tokens, "valid": data_cfg.max_eval_tokens, "test": data_cfg.max_eval_tokens}
    ids, chars = {}, {}
    for split in SPLITS:
        split_ids = np.load(cache_dir / f"{split}.ids.npy")
        char_ends = np.load(cache_dir / f"{split}.char_ends.npy")
        limit = limits[split]
        if limit is not None:
            split_ids, char_ends = split_ids[:limit], char_ends[:limit]
        if split_ids.size == 0:
            raise CorpusError(f"the {split} split of the corpus has no tokens; give it text")
        ids[split] = torch.from_numpy(split_ids)
        chars[split] = int(char_ends[-1])
    return TokenizedCorpus(
        train=ids["train"], valid=ids["valid"], test=ids["test"],
        vocab_size=int(meta["vocab_size"]), chars=chars, key=cache_dir.name,
        tokenizer_path=cache_dir / "tokenizer.json",
    )


def _lines(text: str) -> list[str]:
    return text.splitlines(keepends=True)
