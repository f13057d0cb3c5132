"""Fine-tuning: validations per epoch or per interval of trained positions, and early stopping."""

import pytest
import torch
from omegaconf import OmegaConf

from saffu.explicit import solve_model
from saffu.finetune import train
from saffu.model import SAFFUModel
from tests.test_method import make_layer, markov_chain, sample_chain, solver_config

VOCAB = 10
SPAN = 20
SPANS_PER_BATCH = 4  # 80 trained positions per batch


@pytest.fixture(scope="module")
def chain():
    transitions, generator = markov_chain(VOCAB, seed=5, concentration=0.4)
    return sample_chain(transitions, 3000, generator), sample_chain(transitions, 600, generator)


def solved_model(tokens):
    model = SAFFUModel([make_layer(tokens, VOCAB, block_size=2, radius=3)])
    solve_model(model, tokens, solver_config(calibration_tokens=256), torch.Generator().manual_seed(0))
    return model


def train_config(**overrides):
    values = dict(
        epochs=1, span_tokens=SPAN, batch_spans=SPANS_PER_BATCH, patience=100, max_seconds=None,
        eval_tokens=None, eval_interval_tokens=None,
    )
    values.update(overrides)
    return OmegaConf.create(values)


def run_training(chain, lr, **overrides):
    train_tokens, valid_tokens = chain
    model = solved_model(train_tokens)
    logged: dict[str, dict[int, float]] = {}

    def log_metric(name, value, step=None):
        logged.setdefault(name, {})[step] = value

    result = train(
        model, train_tokens, valid_tokens, 1000, train_config(**overrides), lr, "finetune", log_metric,
        torch.Generator().manual_seed(0),
    )
    return model, result, logged


def test_interval_validates_within_epoch(chain):
    _, result, logged = run_training(chain, 1e-3, eval_interval_tokens=400)
    positions = [logged["finetune/val_positions"][step] for step in sorted(logged["finetune/val_positions"])]
    assert sorted(logged["finetune/epoch_val_ppl"]) == list(range(len(positions)))
    assert positions[0] == 0
    # Every 400 positions (five batches), then once at the end of the epoch.
    assert all(later - earlier == 400 for earlier, later in zip(positions[:-2], positions[1:-1]))
    assert 0 < positions[-1] - positions[-2] <= 400 + SPAN * SPANS_PER_BATCH
    assert len(positions) >= 7
    assert len(result.val_ppl_history) == len(positions)


def test_default_validates_once_per_epoch(chain):
    _, result, logged = run_training(chain, 1e-3, epochs=2)
    assert sorted(logged["finetune/epoch_val_ppl"]) == [0, 1, 2]
    positions = logged["finetune/val_positions"]
    assert positions[0] == 0
    assert 2800 <= positions[1] <= 3000
    assert positions[2] > positions[1]
    assert result.epochs == 2


def test_patience_counts_validations(chain):
    explicit = solved_model(chain[0]).state_dict()
    # A learning rate this large only makes the explicit solution worse.
    model, result, logged = run_training(chain, 3.0, epochs=3, patience=2, eval_interval_tokens=160)
    assert sorted(logged["finetune/epoch_val_ppl"]) == [0, 1, 2]
    assert logged["finetune/val_positions"][2] == 320
    assert result.epochs == 1
    assert result.best_epoch == 0
    assert min(result.val_ppl_history[1:]) > result.val_ppl_history[0]
    for name, value in model.state_dict().items():
        assert torch.equal(value, explicit[name]), name


def test_time_cap_marks_phase(chain):
    _, capped, _ = run_training(chain, 1e-3, epochs=3, max_seconds=0.0)
    assert capped.stopped_by_time is True
    assert capped.epochs == 1
    _, uncapped, _ = run_training(chain, 1e-3, epochs=2)
    assert uncapped.stopped_by_time is False
    assert uncapped.epochs == 2
