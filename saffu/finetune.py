"""Backpropagation through a SAFFU model: explicit+bp from the solution, bp-only from random.

A batch is a set of random contiguous spans of the training split. The one-hot expert
tables are Embeddings with sparse gradients, stepped by SparseAdam, so a step costs
O(batch * E * V) and touches only the rows of the batch's tokens. Adam steps the dense
parameters (bit-code experts, attention, temperatures).
"""

import logging
import math
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from saffu.evaluate import evaluate
from saffu.model import IGNORE_INDEX, SAFFUModel, make_windows, span_starts

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of one training phase. The model is left at its best validation."""

    best_val_ppl: float
    best_epoch: int  # index of the best validation (0: before training), the epoch by default
    epochs: int
    seconds: float
    tokens_per_second: float
    val_ppl_history: list[float] = field(default_factory=list)  # index 0: before training
    # True when the train.max_seconds cap cut the phase short, so its result depends on the
    # machine's speed and load as well as on the model.
    stopped_by_time: bool = False


def make_optimizers(model: SAFFUModel, lr: float) -> list[torch.optim.Optimizer]:
    optimizers: list[torch.optim.Optimizer] = []
    sparse = model.sparse_parameters()
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
    optimizers.append(torch.optim.Adam(model.dense_parameters(), lr=lr))
    return optimizers


def batch_loss(model: SAFFUModel, tokens: torch.Tensor, starts: torch.Tensor, span: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the spans starting at `starts`."""
    context_ids, targets = make_windows(tokens, starts, span, model.context, model.vocab_size)
    logits = model(context_ids)  # (S, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def train(
    model: SAFFUModel,
    train_tokens: torch.Tensor,
    valid_tokens: torch.Tensor,
    valid_chars: int,
    train_cfg: DictConfig,
    lr: float,
    phase: str,
    log_metric,
    generator: torch.Generator,
) -> TrainResult:
    """Train `model` in place with early stopping on validation perplexity.

    Validates after every epoch, or every `train_cfg.eval_interval_tokens` trained
    positions and at the end of each epoch. Logs `{phase}/epoch_val_ppl` at step 0 (before
    training) and at step k after the k-th validation, which is epoch k by default, with
    `{phase}/val_positions` (trained positions so far) at the same step. Stops after
    `patience` validations without a new best and restores the best parameters.
    """
    span, spans_per_batch = int(train_cfg.span_tokens), int(train_cfg.batch_spans)
    max_seconds = train_cfg.max_seconds
    interval = train_cfg.get("eval_interval_tokens")
    if train_cfg.eval_tokens is not None:
        valid_chars = round(valid_chars * min(1.0, int(train_cfg.eval_tokens) / valid_tokens.numel()))
        valid_tokens = valid_tokens[: int(train_cfg.eval_tokens)]

    best_ppl = evaluate(model, valid_tokens, valid_chars).ppl
    history = [best_ppl]
    log_metric(f"{phase}/epoch_val_ppl", best_ppl, 0)
    log_metric(f"{phase}/val_positions", 0.0, 0)
    best_state = _copy_state(model)
    best_check, checks_without_gain, epochs_run, trained_tokens, last_check_tokens = 0, 0, 0, 0, 0
    optimizers = make_optimizers(model, lr)
    start = time.perf_counter()

    def validate(epoch: int) -> bool:
        """Validate once, keep the best parameters, and return True when patience ran out."""
        nonlocal best_ppl, best_check, checks_without_gain, best_state, last_check_tokens
        ppl = evaluate(model, valid_tokens, valid_chars).ppl
        model.train()
        history.append(ppl)
        check = len(history) - 1
        last_check_tokens = trained_tokens
        log_metric(f"{phase}/epoch_val_ppl", ppl, check)
        log_metric(f"{phase}/val_positions", float(trained_tokens), check)
        log.info(
            "%s epoch %d, %d positions: validation perplexity %.2f (best %.2f)",
            phase, epoch, trained_tokens, ppl, min(best_ppl, ppl),
        )
        if ppl < best_ppl:
            best_ppl, best_check, checks_without_gain = ppl, check, 0
            best_state = _copy_state(model)
        else:
            checks_without_gain += 1
        return checks_without_gain >= int(train_cfg.patience)

    stopped = out_of_time = False
    for epoch in range(1, int(train_cfg.epochs) + 1):
        model.train()
        offset = int(torch.randint(max(1, min(span, train_tokens.numel())), (1,), generator=generator))
        starts = span_starts(train_tokens.numel() - offset, span) + offset
        starts = starts[torch.randperm(starts.numel(), generator=generator)]
        batches = range(0, starts.numel(), spans_per_batch)
        out_of_time = False
        progress = tqdm(batches, desc=f"{phase} epoch {epoch}", unit="batch", file=sys.stderr, mininterval=10, leave=False)
        for first in progress:
            loss = batch_loss(model, train_tokens, starts[first : first + spans_per_batch], span)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for optimizer in optimizers:
                optimizer.step()
            trained_tokens += min(spans_per_batch, starts.numel() - first) * span
            if max_seconds is not None and time.perf_counter() - start > float(max_seconds):
                out_of_time = True
                break
            is_last_batch = first + spans_per_batch >= starts.numel()
            if interval is not None and not is_last_batch and trained_tokens - last_check_tokens >= int(interval):
                stopped = validate(epoch)
                if stopped:
                    break
        progress.close()
        epochs_run = epoch
        if not stopped and trained_tokens > last_check_tokens:
            stopped = validate(epoch)
        if stopped:
            if epoch < int(train_cfg.epochs) or interval is not None:
                log.info("%s: stopping early in epoch %d, no gain for %d validations", phase, epoch, checks_without_gain)
            break
        if out_of_time:
            log.info("%s: stopping after %.0f s, the train.max_seconds cap", phase, time.perf_counter() - start)
            break

    seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    return TrainResult(
        best_val_ppl=best_ppl,
        best_epoch=best_check,
        epochs=epochs_run,
        seconds=seconds,
        tokens_per_second=trained_tokens / seconds if seconds > 0 else math.nan,
        val_ppl_history=history,
        stopped_by_time=out_of_time,
    )


def _copy_state(model: SAFFUModel) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}
