"""Config checks before launch: each bad input is rejected with its own message."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from saffu.launch import RaySettings, ray_address_problem
from saffu.planning import plan_jobs, resolve_job_config
from saffu.validation import allowed_config_keys, check_against_corpus, check_job_config, check_text_file
from sweep_helpers import REPO, SWEEP, sweep_command, write_corpus_slice

CONF = REPO / "conf"
ALLOWED = allowed_config_keys(CONF, ("sweep", "hydra", "ray", "tracking"))


def composed_config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    config = resolve_job_config(cfg)
    assert isinstance(config, dict), config
    return config


@pytest.fixture()
def good_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "good"
    folder.mkdir()
    for name in ("train", "valid", "test"):
        (folder / f"{name}.txt").write_text(f"Some {name} text, with words.\n" * 20, encoding="utf-8")
    return folder


BAD_VALUES = [
    ("model.block_size=-1", "model.block_size=-1 is out of range"),
    ("model.block_size=0", "model.block_size=0 is out of range"),
    ("model.block_size=2.5", "model.block_size=2.5 is invalid: expected an integer"),
    ("train.eval_interval_tokens=often", "set train.eval_interval_tokens to an integer"),
    ("model.layers=0", "model.layers=0 is out of range"),
    ("model.radius=-3", "model.radius=-3 is out of range"),
    ("solver.alpha=0", "solver.alpha=0 is out of range: expected a number > 0"),
    ("solver.alpha=-0.5", "solver.alpha=-0.5 is out of range"),
    ("solver.alpha='1e-2'", "YAML reads 1e-2 as a string"),
    ("solver.attention_target=medium", "solver.attention_target='medium' is invalid: expected one of hard, soft"),
    ("solver.temperature_bracket=[2.0,1.0]", "solver.temperature_bracket=[2.0, 1.0] is invalid"),
    ("model.experts.kind=dense", "model.experts.kind='dense' is invalid: expected one of onehot, bitcode"),
    ("model.experts.kind=bitcode", "model.experts.kind=bitcode needs model.experts.code_dim"),
    ("tokenizer.vocab_size=100", "tokenizer.vocab_size=100 is out of range"),
    ("train.epochs=0", "train.epochs=0 is out of range"),
    ("train.lr=fast", "train.lr='fast' is invalid: expected a number"),
    ("train.max_seconds=long", "set train.max_seconds to a number"),
    ("train.bp_only=maybe", "train.bp_only='maybe' is invalid: expected true or false"),
    ("seed=-1", "seed=-1 is out of range"),
    ("+model.blocksize=4", "unknown config key 'model.blocksize'"),
    ("+trainer.epochs=4", "unknown config key 'trainer'"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_bad_value_rejected(override, expected, good_corpus):
    config = composed_config("data=folder", f"data.dir={good_corpus}", override)
    problems = check_job_config(config, ALLOWED)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_default_config_passes(good_corpus):
    config = composed_config("data=folder", f"data.dir={good_corpus}")
    assert check_job_config(config, ALLOWED) == []


def test_missing_data_dir_rejected():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=["data=folder"])
    message = resolve_job_config(cfg)
    assert isinstance(message, str)
    assert "data.dir is required but not set" in message


def write_bytes(folder: Path, name: str, content: bytes) -> None:
    (folder / name).write_bytes(content)


BAD_CORPORA = [
    ("missing valid", lambda f: (f / "valid.txt").unlink(), "valid.txt is missing"),
    ("empty test", lambda f: write_bytes(f, "test.txt", b""), "test.txt is empty"),
    ("whitespace test", lambda f: write_bytes(f, "test.txt", b" \n\n\t\n"), "test.txt contains only whitespace"),
    ("binary train", lambda f: write_bytes(f, "train.txt", b"\x7fELF\x02\x01\x00\x00binary"), "train.txt contains a NUL byte"),
    ("latin-1 train", lambda f: write_bytes(f, "train.txt", "caf\u00e9 na\u00efve\n".encode("latin-1")), "train.txt is not valid UTF-8"),
]


@pytest.mark.parametrize(("name", "damage", "expected"), BAD_CORPORA, ids=[case[0] for case in BAD_CORPORA])
def test_bad_corpus_rejected(name, damage, expected, good_corpus):
    damage(good_corpus)
    config = composed_config("data=folder", f"data.dir={good_corpus}")
    problems = check_job_config(config, ALLOWED)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_missing_corpus_folder_rejected(tmp_path):
    config = composed_config("data=folder", f"data.dir={tmp_path / 'nowhere'}")
    problems = check_job_config(config, ALLOWED)
    assert problems == [f"data.dir={tmp_path / 'nowhere'} is not a folder; set data.dir to a folder with train.txt, valid.txt, test.txt"]


def test_utf8_split_across_chunks_accepted(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\u00e9" * 10, encoding="utf-8")
    assert check_text_file(path, chunk_bytes=3) is None


CORPUS_CASES = [
    ({"model": {"experts": {"kind": "bitcode", "code_dim": 8}, "attention_code_dim": 32, "radius": 0, "block_size": 1}},
     "model.experts.code_dim=8 is too small for a vocabulary of 512 tokens"),
    ({"model": {"experts": {"kind": "onehot", "code_dim": None}, "attention_code_dim": 9, "radius": 0, "block_size": 1}},
     "model.attention_code_dim=9 is too small"),
    ({"model": {"experts": {"kind": "onehot", "code_dim": None}, "attention_code_dim": 32, "radius": 30000, "block_size": 1}},
     "model.radius=30000 is not smaller than the training split (20000 tokens)"),
    ({"model": {"experts": {"kind": "onehot", "code_dim": None}, "attention_code_dim": 32, "radius": 0, "block_size": 1},
      "train": {"enabled": True, "bp_only": False, "span_tokens": 30000}},
     "train.span_tokens=30000 is larger than the training split (20000 tokens)"),
]


def test_calibration_needs_ten_spans_of_text():
    config = {"model": {"experts": {"kind": "onehot", "code_dim": None}, "attention_code_dim": 32, "radius": 0,
                        "block_size": 1}, "solver": {"calibrate": True}}
    (problem,) = check_against_corpus(config, vocab_size=512, train_tokens=2559)
    assert "the training split has 2559 tokens, fewer than the 2560" in problem
    assert "set solver.calibrate=false" in problem
    assert check_against_corpus(config, vocab_size=512, train_tokens=2560) == []
    config["solver"]["calibrate"] = False
    assert check_against_corpus(config, vocab_size=512, train_tokens=300) == []


@pytest.mark.parametrize(
    ("config", "expected"), CORPUS_CASES, ids=["expert code_dim", "attention code_dim", "radius", "span_tokens"]
)
def test_corpus_dependent_value_rejected(config, expected):
    problems = check_against_corpus(config, vocab_size=512, train_tokens=20000)
    assert len(problems) == 1, problems
    assert expected in problems[0]


@pytest.mark.corpus
def test_plan_rejects_code_dim_and_radius(tmp_path, gutenberg_dir):
    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    base = ["data=folder", f"data.dir={corpus}", "data.max_train_tokens=5000", "tokenizer.vocab_size=512"]
    composed = [
        (["good"], composed_config(*base), str(tmp_path / "0")),
        (["small code"], composed_config(*base, "model/experts=bitcode16", "model.experts.code_dim=8"), str(tmp_path / "1")),
        (["big radius"], composed_config(*base, "model.radius=6000"), str(tmp_path / "2")),
    ]
    plan = plan_jobs(composed, CONF, RaySettings())
    assert plan.jobs == []
    assert len(plan.problems) == 2, plan.problems
    assert "model.experts.code_dim=8 is too small" in plan.problems[0]
    assert "(job #1)" in plan.problems[0]
    assert "model.radius=6000 is not smaller than the training split (5000 tokens)" in plan.problems[1]


@pytest.mark.corpus
def test_plan_rejects_model_too_big_for_memory(tmp_path, gutenberg_dir):
    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    base = ["data=folder", f"data.dir={corpus}", "data.max_train_tokens=5000", "tokenizer.vocab_size=512"]
    composed = [
        (["bitcode"], composed_config(*base, "model/experts=bitcode16"), str(tmp_path / "0")),
        (["onehot"], composed_config(*base), str(tmp_path / "1")),
    ]
    # 10 MiB per job: the bit-code model (5 x 16 x 512 weights) fits, the one-hot one
    # (5 tables of 513 rows x 512 logits, 1,313,280 floats, about 30 MiB with Adam) does not.
    plan = plan_jobs(composed, CONF, RaySettings(memory_base_mb=0, max_job_memory_gb=10 / 1024))
    assert plan.jobs == []
    assert len(plan.problems) == 1, plan.problems
    problem = plan.problems[0]
    experts = 5 * 513 * 512
    total = experts + 4 * 32 * 5 + 7  # expert tables, attention weights (b * d_attn x E), temperatures
    assert problem.startswith(f"the model's tables would not fit in memory: {total:,} float32 parameters")
    assert f"layer0/experts {experts:,} floats (5.0 MiB)" in problem
    assert "need about 30.1 MiB with gradients and optimizer state (x ray.memory_factor=6)" in problem
    assert "(ray.memory_base_mb=0)" in problem
    assert "or bit-code experts (model/experts=bitcode64)" in problem
    assert "more than the 10.0 MiB limit (ray.max_job_memory_gb" in problem
    assert "(job #1)" in problem


def test_bad_ray_setting_rejected_before_launch(tmp_path):
    result = subprocess.run(
        [
            sys.executable, str(SWEEP), "-m", "+sweep=smoke", "ray.max_job_memory_gb=-1", "ray.memory_factor=big",
            "+ray.max_job_mem_gb=1", "ray.log_to_driver=maybe", f"ray.temp_dir={tmp_path / 'missing'}",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    assert "ray.max_job_memory_gb=-1 is out of range" in result.stdout
    assert "ray.memory_factor='big' is invalid" in result.stdout
    assert "YAML reads 1e-2" not in result.stdout
    assert "unknown config key 'ray.max_job_mem_gb'" in result.stdout
    assert "ray.log_to_driver='maybe' is invalid" in result.stdout
    assert f"ray.temp_dir='{tmp_path / 'missing'}' is not an existing folder" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_sweep_with_bad_inputs_exits_before_launch(tmp_path):
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "train.txt").write_bytes(b"\x00\x01\x02")
    (binary / "valid.txt").write_text("valid text\n")
    (binary / "test.txt").write_text("test text\n")
    result = subprocess.run(
        [
            sys.executable, str(SWEEP), "-m", "+sweep=smoke", "data=folder", f"data.dir={binary}",
            "model.block_size=-1,2", "solver.alpha=0", "+model.bogus=1",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    assert "the sweep was not started" in result.stdout
    assert "model.block_size=-1 is out of range" in result.stdout
    assert "solver.alpha=0 is out of range" in result.stdout
    assert "unknown config key 'model.bogus'" in result.stdout
    assert "train.txt contains a NUL byte at offset 0" in result.stdout
    # Each problem once, naming its jobs, not once per job.
    assert result.stdout.count("solver.alpha=0 is out of range") == 1
    assert not (tmp_path / "mlflow.db").exists()
    assert not any((tmp_path / "multirun").glob("*/job.log"))


def test_sweep_with_bad_tracking_uri_exits(tmp_path):
    result = subprocess.run(
        [
            sys.executable, str(SWEEP), "-m", "+sweep=smoke",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", f"tracking.uri=sqlite:///{tmp_path / 'missing' / 'mlflow.db'}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    assert f"the folder {tmp_path / 'missing'} does not exist" in result.stdout


def test_sweep_into_deleted_experiment_exits(tmp_path, gutenberg_dir):
    from mlflow.tracking import MlflowClient

    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("saffu"))
    result = subprocess.run(
        [
            sys.executable, str(SWEEP), "-m", "+sweep=smoke", "+sweep.dry_run=true", "data=folder", f"data.dir={corpus}",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    assert "experiment 'saffu' is deleted" in result.stdout
    assert "mlflow experiments restore --experiment-id" in result.stdout


def test_sweep_setting_outside_sweep_rejected(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SWEEP), "-m", "+sweep=optuna", "optuna.sampler=tpe", "model.block_size=1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    assert "write +sweep=optuna sweep.optuna.sampler=tpe" in result.stdout
    assert "model.block_size" not in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("override", ["+tracking.ur=http://alice:s3cret@127.0.0.1:9", "tracking.ur=http://alice:s3cret@127.0.0.1:9"])
def test_unknown_tracking_key_rejected(tmp_path, override):
    result = subprocess.run(
        [sys.executable, str(SWEEP), "-m", "+sweep=smoke", override],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stdout
    assert "sets the unknown key 'tracking.ur'" in result.stdout
    assert "tracking.uri, tracking.artifact_location" in result.stdout
    assert "alice:***@127.0.0.1:9" in result.stdout
    assert "s3cret" not in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ray_address_problem_names_the_address():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert ray_address_problem(f"127.0.0.1:{port}") is None
        assert ray_address_problem(f"ray://127.0.0.1:{port}") is None
    assert ray_address_problem(None) is None
    assert ray_address_problem("auto") is None

    port = closed_port()
    problem = ray_address_problem(f"ray://127.0.0.1:{port}")
    assert problem.startswith(f"ray.address='ray://127.0.0.1:{port}': no connection to 127.0.0.1:{port} (")
    assert "ray://HOST:10001" in problem
    assert "is not HOST:PORT" in ray_address_problem("ray://head-node")
    assert "is not HOST:PORT" in ray_address_problem("127.0.0.1:http")
    assert "port 99999 is out of range" in ray_address_problem("127.0.0.1:99999")
    assert "port 0 is out of range" in ray_address_problem("ray://127.0.0.1:0")


@pytest.mark.corpus
def test_unreachable_ray_address_stops_sweep(tmp_path, gutenberg_dir):
    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    port = closed_port()
    result = subprocess.run(
        sweep_command(tmp_path, corpus, "+sweep=smoke", f"ray.address=127.0.0.1:{port}"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stdout
    assert f"ray.address='127.0.0.1:{port}': no connection to 127.0.0.1:{port}" in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.corpus
def test_unwritable_artifact_store_stops_cleanly(tmp_path, gutenberg_dir):
    """An artifact location below a regular file cannot be created: the sweep and a single
    job stop with one line before any job starts, and leave no RUNNING run."""
    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    (tmp_path / "a-file").write_text("not a folder")
    location = f"+tracking.artifact_location={tmp_path / 'a-file' / 'artifacts'}"
    sweep = subprocess.run(
        sweep_command(tmp_path, corpus, "+sweep=smoke", location),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    single = subprocess.run(
        [part for part in sweep_command(tmp_path, corpus, location) if part != "-m"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    for result in (sweep, single):
        assert result.returncode == 2, result.stdout[-4000:]
        assert "Traceback" not in result.stdout
        assert "to the artifact store (NotADirectoryError" in result.stdout
        assert "check that tracking.artifact_location" in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("saffu").experiment_id], "")
    assert sorted((run.data.tags.get("saffu.role"), run.info.status) for run in runs) == [("job", "FAILED"), ("sweep", "FAILED")]


@pytest.mark.corpus
def test_dry_run_lists_jobs_without_running(tmp_path, gutenberg_dir):
    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    result = subprocess.run(
        [
            sys.executable, str(SWEEP), "-m", "+sweep=smoke", "+sweep.dry_run=true", "data=folder", f"data.dir={corpus}",
            "data.max_train_tokens=5000", "tokenizer.vocab_size=512",
            f"hydra.sweep.dir={tmp_path / 'multirun'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stdout
    assert "dry run of sweep smoke" in result.stdout
    assert "8 jobs, 8 to run, 0 already finished" in result.stdout
    rows = [line for line in result.stdout.splitlines() if " run " in line and "block_size=" in line]
    assert len(rows) == 8
    assert "started a local Ray" not in result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("saffu")
    assert client.search_runs([experiment.experiment_id]) == []


def test_anchor_config_passes_checks():
    config = {"model": {"name": "kneser_ney", "orders": [2, 3], "experts": {"kind": "none", "code_dim": None}}}
    assert check_job_config(config) == []
    assert check_against_corpus(config, vocab_size=512, train_tokens=20000) == []


@pytest.mark.corpus
def test_misspelled_sweep_setting_stops_sweep(tmp_path, gutenberg_dir):
    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    result = subprocess.run(
        sweep_command(tmp_path, corpus, "+sweep=smoke", "+sweep.dry_rnu=true"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180,
    )
    assert result.returncode == 2, result.stdout
    assert "unknown keys ['dry_rnu']" in result.stdout
    assert "Traceback" not in result.stdout
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.corpus
def test_kneser_ney_single_job_runs(tmp_path, gutenberg_dir):
    corpus = write_corpus_slice(gutenberg_dir, tmp_path / "corpus", train_chars=60_000, eval_chars=10_000)
    result = subprocess.run(
        [
            sys.executable, str(SWEEP), "model=kneser_ney", "data=folder", f"data.dir={corpus}",
            "tokenizer.vocab_size=512", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("saffu")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "kneser_ney"
    assert 1.0 < run.data.metrics["val_ppl"] < 512
    assert run.data.metrics["n_params"] > 0
