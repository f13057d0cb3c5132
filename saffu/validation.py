"""Checks of job configs before any job starts.

Each check returns a list of problems, one sentence each, that names the key, the value
and the fix. An empty list means the config passed. A sweep collects the problems of all
its jobs and stops before launching when any remain (see :class:`ConfigError`).

Two stages: :func:`check_job_config` needs only the config (types, ranges, unknown keys,
corpus files), :func:`check_against_corpus` needs the tokenized corpus (bit-code length
against the vocabulary, radius against the training split).
"""

from __future__ import annotations

import codecs
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

SPLIT_FILES = ("train.txt", "valid.txt", "test.txt")
EXPERT_KINDS = ("onehot", "bitcode")
ATTENTION_TARGETS = ("hard", "soft")
# Byte-level BPE starts from one token per byte value, so a smaller vocabulary cannot be trained.
MIN_BPE_VOCAB = 256
# The phrase that names the values of each kind of rule in messages.
_NOUNS = {"int": "an integer", "float": "a number", "bool": "true or false"}


class ConfigError(ValueError):
    """Invalid job configs: `problems` contains one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} config problem(s):\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


ANCHOR_MODELS = ("kneser_ney", "gpt2")


@dataclass(frozen=True)
class Rule:
    """Type and range of one config value. `kind` is int, float, bool or choice."""

    key: str
    kind: str
    minimum: float | None = None
    exclusive: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    meaning: str = ""


RULES = (
    Rule("seed", "int", 0, meaning="the random seed"),
    Rule("model.layers", "int", 1, meaning="the number of stacked SAFFU layers"),
    Rule("model.block_size", "int", 1, meaning="the number of block experts"),
    Rule("model.radius", "int", 0, meaning="the bag-of-words window; 0 turns it off"),
    Rule("model.attention_code_dim", "int", 1, meaning="the bit-code length of the attention features"),
    Rule("model.stack_top_k", "int", 1, meaning="entries read from the layer below"),
    Rule("model.experts.kind", "choice", choices=EXPERT_KINDS),
    Rule("model.experts.code_dim", "int", 1, nullable=True, meaning="the bit-code length of expert inputs"),
    Rule("solver.alpha", "float", 0, exclusive=True, meaning="the smoothing pseudo-count"),
    Rule("solver.calibrate", "bool"),
    Rule("solver.calibration_tokens", "int", 1),
    Rule("solver.attention_target", "choice", choices=ATTENTION_TARGETS),
    Rule("solver.attention_tau", "float", 0, exclusive=True),
    Rule("solver.attention_tokens", "int", 1, nullable=True, meaning="the positions that set the attention weights"),
    Rule("tokenizer.vocab_size", "int", MIN_BPE_VOCAB, meaning="byte-level BPE has 256 byte tokens to start from"),
    Rule("tokenizer.min_frequency", "int", 1),
    Rule("data.max_train_tokens", "int", 1, nullable=True),
    Rule("data.max_eval_tokens", "int", 1, nullable=True),
    Rule("train.enabled", "bool"),
    Rule("train.bp_only", "bool"),
    Rule("train.epochs", "int", 1),
    Rule("train.batch_spans", "int", 1),
    Rule("train.span_tokens", "int", 1),
    Rule("train.lr", "float", 0, exclusive=True, meaning="the learning rate"),
    Rule("train.bp_only_lr", "float", 0, exclusive=True, meaning="the learning rate of the bp-only baseline"),
    Rule("train.patience", "int", 1, meaning="validations without a gain before stopping"),
    Rule("train.eval_interval_tokens", "int", 1, nullable=True),
    Rule("train.max_seconds", "float", 0, exclusive=True, nullable=True),
    Rule("train.eval_tokens", "int", 1, nullable=True),
)

# Settings of the `ray` node, which is not part of a job's config (conf/ray/local.yaml).
RAY_RULES = (
    Rule("ray.cpus_per_job", "float", 0, exclusive=True, meaning="CPUs each job requests"),
    Rule("ray.num_cpus", "int", 1, nullable=True, meaning="CPUs of the local Ray instance"),
    Rule("ray.memory_factor", "float", 0, exclusive=True, meaning="bytes of peak memory per parameter byte"),
    Rule("ray.memory_base_mb", "int", 0, meaning="memory of a job process besides its model"),
    Rule("ray.max_job_memory_gb", "float", 0, exclusive=True, nullable=True, meaning="the most memory one job may need"),
    Rule("ray.log_to_driver", "bool"),
)
RAY_KEYS = ("address", "cpus_per_job", "num_cpus", "memory_factor", "memory_base_mb", "max_job_memory_gb", "temp_dir", "log_to_driver")

_MISSING = object()


def select(config: Mapping[str, Any], key: str) -> Any:
    """Return the value at a dotted key of a nested mapping, or a sentinel when absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def check_value(rule: Rule, value: Any) -> str | None:
    """Return a problem message when `value` breaks `rule`, else None."""
    if value is None:
        if rule.nullable:
            return None
        return f"{rule.key} is null; set it to {_expected(rule)}"

    if rule.kind == "bool":
        if isinstance(value, bool):
            return None
        return f"{rule.key}={value!r} is invalid: expected true or false; set {rule.key}=true or {rule.key}=false"

    if rule.kind == "choice":
        if value in rule.choices:
            return None
        return f"{rule.key}={value!r} is invalid: expected one of {', '.join(rule.choices)}; set {rule.key}={rule.choices[0]}"

    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if rule.kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f" (write {int(value)}, without a decimal point)"
        return f"{rule.key}={value!r} is invalid: expected {_expected(rule)}{hint}; set {rule.key} to {_NOUNS[rule.kind]}"
    if rule.kind == "float" and not numeric:
        hint = ""
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", value.strip()):
            hint = " (YAML reads 1e-2 as a string; write 1.0e-2 or 0.01)"
        return f"{rule.key}={value!r} is invalid: expected {_expected(rule)}{hint}; set {rule.key} to {_NOUNS[rule.kind]}"
    if rule.kind == "float" and not math.isfinite(value):
        return f"{rule.key}={value!r} is invalid: expected a finite number; set {rule.key} to {_expected(rule)}"

    if rule.minimum is not None:
        too_small = value <= rule.minimum if rule.exclusive else value < rule.minimum
        if too_small:
            return f"{rule.key}={value!r} is out of range: expected {_expected(rule)}; set {rule.key} to a larger value"
    return None


def _expected(rule: Rule) -> str:
    noun = _NOUNS.get(rule.kind, "a value")
    text = noun
    if rule.minimum is not None:
        bound = int(rule.minimum) if float(rule.minimum).is_integer() else rule.minimum
        text += f" > {bound}" if rule.exclusive else f" >= {bound}"
    if rule.nullable:
        text += " or null"
    if rule.meaning:
        text += f" ({rule.meaning})"
    return text


def check_job_config(config: Mapping[str, Any], allowed_keys: set[str] | None = None) -> list[str]:
    """Check a resolved job config without reading the corpus: types, ranges, unknown keys,
    combinations of values, and for ``data=folder`` the corpus files."""
    problems: list[str] = []
    # The anchors (Kneser-Ney, GPT-2) have their own model keys and no SAFFU experts.
    anchor = select(config, "model.name") in ANCHOR_MODELS
    for rule in RULES:
        value = select(config, rule.key)
        if value is _MISSING:
            continue
        if anchor and rule.key.startswith(("model.", "solver.")):
            continue
        problem = check_value(rule, value)
        if problem:
            problems.append(problem)

    problems.extend(_check_combinations(config))
    if allowed_keys is not None:
        problems.extend(check_unknown_keys(config, allowed_keys))

    data = config.get("data")
    if isinstance(data, Mapping) and data.get("name") == "folder":
        directory = data.get("dir")
        if directory in (None, "", "???"):
            problems.append("data.dir is not set; set data.dir=PATH to a folder with train.txt, valid.txt and test.txt")
        else:
            problems.extend(check_corpus_folder(Path(str(directory)).expanduser()))
    return problems


def _check_combinations(config: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    if select(config, "model.name") in ANCHOR_MODELS:
        return problems
    kind = select(config, "model.experts.kind")
    code_dim = select(config, "model.experts.code_dim")
    if kind == "bitcode" and code_dim is None:
        problems.append(
            "model.experts.kind=bitcode needs model.experts.code_dim; pick model/experts=bitcode32 "
            "or set model.experts.code_dim to an integer"
        )

    bracket = select(config, "solver.temperature_bracket")
    if bracket is not _MISSING:
        valid = (
            isinstance(bracket, (list, tuple))
            and len(bracket) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in bracket)
            and 0 < bracket[0] < bracket[1]
        )
        if not valid:
            problems.append(
                f"solver.temperature_bracket={bracket!r} is invalid: expected [low, high] with 0 < low < high; "
                "set solver.temperature_bracket=[0.25,32.0]"
            )
    return problems


def check_corpus_folder(directory: Path) -> list[str]:
    """Check that `directory` contains non-empty UTF-8 text files train.txt, valid.txt and test.txt."""
    if not directory.is_dir():
        return [f"data.dir={directory} is not a folder; set data.dir to a folder with {', '.join(SPLIT_FILES)}"]
    problems = []
    for name in SPLIT_FILES:
        problem = check_text_file(directory / name)
        if problem:
            problems.append(f"data.dir={directory}: {problem}")
    return problems


def check_text_file(path: Path, chunk_bytes: int = 1 << 20) -> str | None:
    """Return why `path` is not usable as a corpus split (missing, empty, binary or not UTF-8),
    or None. Reads the file in chunks, so large splits cost no more memory than one chunk."""
    if not path.is_file():
        return f"{path.name} is missing; add it (UTF-8 text) or point data.dir at another folder"
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    has_text = False
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                return (
                    f"{path.name} contains a NUL byte at offset {offset + nul}, so it looks binary; "
                    "use a plain UTF-8 text file"
                )
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                return (
                    f"{path.name} is not valid UTF-8 (byte 0x{chunk[error.start]:02x} at offset {offset + error.start}); "
                    "convert it, e.g. with `iconv -f LATIN1 -t UTF-8`"
                )
            has_text = has_text or bool(text.strip())
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return f"{path.name} ends inside a UTF-8 character; the file is truncated or not UTF-8"
    if offset == 0:
        return f"{path.name} is empty; every split needs text"
    if not has_text:
        return f"{path.name} contains only whitespace; every split needs text"
    return None


def allowed_config_keys(conf_dir: Path, groups: Iterable[str] = ()) -> set[str]:
    """Collect the dotted keys that any option of the config tree under `conf_dir` defines.

    A group file ``conf/model/experts/x.yaml`` contributes its keys under ``model.experts``,
    ``conf/config.yaml`` its top-level keys. Folders named in `groups` are skipped (the sweep
    definitions and Hydra's own settings are not job settings).
    """
    skipped = set(groups)
    keys: set[str] = set()
    for path in sorted(conf_dir.rglob("*.yaml")):
        relative = path.relative_to(conf_dir)
        parts = relative.parts[:-1]
        if parts and parts[0] in skipped:
            continue
        with path.open(encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
        if not isinstance(content, Mapping):
            continue
        prefix = ".".join(parts)
        for depth in range(1, len(parts) + 1):
            keys.add(".".join(parts[:depth]))
        for key in _flat_keys(content):
            top = key.split(".", 1)[0]
            if top == "defaults" or (not prefix and top == "hydra"):
                continue
            keys.add(f"{prefix}.{key}" if prefix else key)
    return keys


def _flat_keys(mapping: Mapping[str, Any], prefix: str = "") -> Iterable[str]:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        yield name
        if isinstance(value, Mapping):
            yield from _flat_keys(value, prefix=f"{name}.")


def check_unknown_keys(config: Mapping[str, Any], allowed_keys: set[str]) -> list[str]:
    """Report keys of `config` that no config file defines, typically a misspelled ``+key=value``."""
    problems = []
    for key in sorted(_flat_keys(config)):
        if key in allowed_keys:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else None
        if parent is not None and parent not in allowed_keys:
            continue  # Reported once, at the unknown parent.
        section = key.split(".", 1)[0]
        problems.append(
            f"unknown config key {key!r}: no file under conf/ defines it; remove the override that adds it "
            f"or check its spelling against conf/{section}/"
        )
    return problems


def check_against_corpus(config: Mapping[str, Any], vocab_size: int, train_tokens: int) -> list[str]:
    """Check the settings that depend on the tokenized corpus: bit-code lengths against the
    vocabulary, and the context (radius, block size) and the calibration spans against the
    training split."""
    from saffu.codes import check_code_dim

    problems: list[str] = []
    span = select(config, "train.span_tokens")
    trains = select(config, "train.enabled") is True or select(config, "train.bp_only") is True
    if trains and isinstance(span, int) and not isinstance(span, bool) and span > train_tokens:
        problems.append(
            f"train.span_tokens={span} is larger than the training split ({train_tokens} tokens); "
            f"set train.span_tokens to {train_tokens} or less, or train on more data"
        )
    if select(config, "model.name") in ANCHOR_MODELS:
        return problems
    dims = []
    if select(config, "model.experts.kind") == "bitcode":
        dims.append(("model.experts.code_dim", select(config, "model.experts.code_dim")))
    dims.append(("model.attention_code_dim", select(config, "model.attention_code_dim")))
    for name, value in dims:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            try:
                check_code_dim(value, vocab_size, name)
            except ValueError as error:
                problems.append(str(error))

    # The temperatures are fitted on held-out spans that take at most a tenth of the text.
    from saffu.explicit import CALIBRATION_SPAN

    if select(config, "solver.calibrate") is True and train_tokens < 10 * CALIBRATION_SPAN:
        problems.append(
            f"the training split has {train_tokens} tokens, fewer than the {10 * CALIBRATION_SPAN} that "
            f"solver.calibrate=true needs to hold out spans of {CALIBRATION_SPAN} tokens for the temperatures; "
            "give more training text or set solver.calibrate=false"
        )
    for name in ("model.radius", "model.block_size"):
        value = select(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= train_tokens:
            problems.append(
                f"{name}={value} is not smaller than the training split ({train_tokens} tokens); "
                f"set {name} below {train_tokens} or train on more data (data.max_train_tokens)"
            )
    return problems


def check_ray_settings(ray_node: Mapping[str, Any]) -> list[str]:
    """Check the types and ranges of the `ray` settings that size and place jobs."""
    config = {"ray": ray_node}
    problems = [
        f"unknown config key 'ray.{key}'; the ray settings are {', '.join(RAY_KEYS)}"
        for key in ray_node if key not in RAY_KEYS
    ]
    address = ray_node.get("address")
    if address is not None and not isinstance(address, str):
        problems.append(f"ray.address={address!r} is invalid: expected null, auto, HOST:PORT or ray://HOST:10001")
    temp_dir = ray_node.get("temp_dir")
    if temp_dir is not None and not Path(str(temp_dir)).is_dir():
        problems.append(f"ray.temp_dir={temp_dir!r} is not an existing folder; create it or set ray.temp_dir=null")
    for rule in RAY_RULES:
        value = select(config, rule.key)
        if value is not _MISSING:
            problem = check_value(rule, value)
            if problem:
                problems.append(problem)
    return problems


def check_memory(
    counts: Mapping[str, int], estimate_bytes: int, limit_bytes: int | None, memory_factor: float,
    base_mb: int = 0, onehot: bool = True,
) -> str | None:
    """Reject a model whose estimated peak memory exceeds `limit_bytes`, naming the size of
    each parameter table. `counts` are the model's parameter counts by matrix (see
    saffu.model.count_parameters) and `estimate_bytes` the job's estimated peak."""
    if limit_bytes is None or estimate_bytes <= limit_bytes:
        return None
    tables = ", ".join(
        f"{name} {value:,} floats ({_size_text(4 * value)})"
        for name, value in counts.items()
        if name != "total" and value >= counts["total"] / 100
    )
    fixes = "use a smaller model.block_size or fewer model.layers"
    if onehot:
        fixes += ", or bit-code experts (model/experts=bitcode64)"
    return (
        f"the model's tables would not fit in memory: {counts['total']:,} float32 parameters "
        f"({_size_text(4 * counts['total'])}; {tables}) need about {_size_text(estimate_bytes)} "
        f"with gradients and optimizer state (x ray.memory_factor={memory_factor:g}) and the job process "
        f"(ray.memory_base_mb={base_mb}), more than the {_size_text(limit_bytes)} limit "
        f"(ray.max_job_memory_gb, by default this machine's memory); {fixes}, "
        "or raise ray.max_job_memory_gb on a machine with more memory"
    )


def _size_text(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def merge_problems(problems_by_job: Mapping[int, list[str]], n_jobs: int) -> list[str]:
    """Merge identical problems of several jobs into one line that names the jobs."""
    jobs_of: dict[str, list[int]] = {}
    for index, problems in problems_by_job.items():
        for problem in problems:
            jobs_of.setdefault(problem, []).append(index)
    merged = []
    for problem, indices in jobs_of.items():
        if n_jobs == 1:
            merged.append(problem)
        elif len(indices) == n_jobs:
            merged.append(f"{problem} (all {n_jobs} jobs)")
        else:
            shown = ", ".join(f"#{i}" for i in sorted(indices)[:8])
            more = f" and {len(indices) - 8} more" if len(indices) > 8 else ""
            merged.append(f"{problem} (job {shown}{more})")
    return merged
