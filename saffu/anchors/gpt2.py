"""A small GPT-2 trained from random initialization on the corpus token ids, by backpropagation alone.

Conventions:
    - Token id V = vocab_size is the start symbol, so the input embedding has V + 1 rows.
      The output embedding is tied to it (as in GPT-2), and the logit of the start symbol
      is dropped, so every prediction is a softmax over the V real tokens.
    - Training reads the stream [start, train_0, ..., train_{N-1}]. An epoch covers it once
      in non-overlapping windows of `context` inputs, from a random offset in [0, context),
      plus the window at position 0, the only one that contains the start symbol.
    - Evaluation predicts every token of a split. Token t is predicted from the inputs
      [start, x_0, ..., x_{t-1}], truncated to the last `context` of them by a sliding
      window with stride `eval_stride`. So x_0 is predicted from the start symbol alone,
      and later tokens see between context - eval_stride + 1 and context inputs.

Each size in `model.sizes` is trained with AdamW (linear warmup, then cosine decay to
zero at `max_epochs` or a constant rate) and early stopping on validation perplexity.
The size with the lowest validation perplexity is kept and scored on test.
"""

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from transformers import GPT2Config, GPT2LMHeadModel

from saffu.anchors.common import MetricLogger, TokenCorpus, split_metrics, split_tokens

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPT2Size:
    """Depth, heads and width of one GPT-2 candidate."""

    n_layer: int
    n_head: int
    n_embd: int

    @property
    def label(self) -> str:
        """Name used in metric keys, such as `l4_h4_d128`."""
        return f"l{self.n_layer}_h{self.n_head}_d{self.n_embd}"


@dataclass
class TrainingOptions:
    """Optimization and stopping settings shared by every size (the `model` config group)."""

    context: int = 128
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 200
    schedule: str = "cosine"
    dropout: float = 0.1
    max_epochs: int = 20
    patience: int = 2
    max_seconds: float | None = None
    eval_stride: int | None = None
    eval_interval: int | None = None
    eval_batch_size: int = 32

    @property
    def stride(self) -> int:
        """Evaluation stride in tokens: `eval_stride`, or half the context by default."""
        return self.eval_stride if self.eval_stride is not None else max(1, self.context // 2)


@dataclass
class SizeResult:
    """Outcome of training one size: the best validation NLL and the weights that reached it."""

    size: GPT2Size
    n_params: int
    val_nll: float
    val_ppl: float
    epochs: float
    steps: int
    seconds: float
    state_dict: dict[str, torch.Tensor]
    curve: list[float] = field(default_factory=list)


def build_gpt2(vocab_size: int, size: GPT2Size, context: int, dropout: float) -> GPT2LMHeadModel:
    """Build a randomly initialized GPT-2 with V + 1 input tokens (V real ones and the start symbol)."""
    if size.n_embd % size.n_head != 0:
        raise ValueError(f"n_embd={size.n_embd} must be divisible by n_head={size.n_head}")
    config = GPT2Config(
        vocab_size=vocab_size + 1,
        n_positions=context,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=vocab_size,
        eos_token_id=vocab_size,
        use_cache=False,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def count_parameters(model: torch.nn.Module) -> int:
    """Return the number of distinct parameters, counting the tied embedding matrix once."""
    return sum(p.numel() for p in model.parameters())


def real_token_logits(model: GPT2LMHeadModel, inputs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Return logits over the real tokens, shape (batch, length, vocab_size), for inputs (batch, length)."""
    return model(input_ids=inputs).logits[..., :vocab_size]


def evaluation_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Return (start, end, first_scored) input windows that score every target of a split once.

    Input position i predicts target i. A window feeds inputs [start, end) and scores the
    targets [first_scored, end). Windows other than the first have length min(context, n_tokens).
    """
    if stride < 1 or stride > context:
        raise ValueError(f"eval_stride must be in [1, context={context}], got {stride}")
    end = min(context, n_tokens)
    windows = [(0, end, 0)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        windows.append((new_end - context, new_end, end))
        end = new_end
    return windows


@torch.no_grad()
def evaluate_nll(
    model: GPT2LMHeadModel,
    tokens: torch.Tensor,
    vocab_size: int,
    context: int,
    stride: int,
    batch_size: int,
    device: torch.device,
) -> float:
    """Return the summed natural-log NLL of every token of `tokens` (shape (n,)), the first predicted from the start symbol."""
    was_training = model.training
    model.eval()
    start_symbol = torch.tensor([vocab_size], dtype=torch.long)
    inputs = torch.cat([start_symbol, tokens[:-1].long()])
    targets = tokens.long()
    windows = evaluation_windows(tokens.numel(), context, stride)
    total = 0.0
    for first in range(0, len(windows), batch_size):
        batch = windows[first : first + batch_size]
        window_inputs = torch.stack([inputs[start:end] for start, end, _ in batch]).to(device)
        window_targets = torch.stack([targets[start:end] for start, end, _ in batch]).to(device)
        offsets = torch.arange(window_inputs.shape[1], device=device)
        scored = torch.stack(
            [offsets >= first_scored - start for start, _, first_scored in batch]
        )  # (batch, length) True where the target is scored by this window
        logits = real_token_logits(model, window_inputs, vocab_size).float()
        nll = F.cross_entropy(logits.transpose(1, 2), window_targets, reduction="none")
        total += float(nll[scored].sum())
    model.train(was_training)
    return total


def make_optimizer(model: torch.nn.Module, options: TrainingOptions) -> torch.optim.AdamW:
    """Return AdamW with weight decay on matrices and embeddings only, not on biases and LayerNorm gains."""
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decayed, "weight_decay": options.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=options.lr)


def _lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Return the learning-rate multiplier: linear warmup, then cosine decay to 0 or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _epoch_window_starts(n_inputs: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Return shuffled starts of the windows of one epoch over a stream of `n_inputs` inputs."""
    offset = int(torch.randint(0, length, (1,), generator=generator))
    starts = torch.arange(offset, n_inputs - length + 1, length)
    if offset > 0:
        starts = torch.cat([torch.zeros(1, dtype=torch.long), starts])
    return starts[torch.randperm(starts.numel(), generator=generator)]


def train_size(
    size: GPT2Size,
    train: torch.Tensor,
    valid: torch.Tensor,
    vocab_size: int,
    options: TrainingOptions,
    seed: int,
    device: torch.device,
    log_metric: MetricLogger,
) -> SizeResult:
    """Train one size with early stopping on validation perplexity and return its best weights.

    Validation runs after every epoch, or every `eval_interval` steps when set. Training
    stops after `patience` validations without a new best, after `max_epochs`, or at the
    first step past `max_seconds`, which is followed by one last validation.
    Logs `gpt2/{label}/val_ppl` and `gpt2/{label}/train_loss` with the validation index as step.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_gpt2(vocab_size, size, options.context, options.dropout).to(device)
    n_params = count_parameters(model)
    log.info("training GPT-2 %s with %d parameters", size.label, n_params)

    stream = torch.cat([torch.tensor([vocab_size], dtype=torch.long), train.long()])
    n_inputs = stream.numel() - 1
    length = min(options.context, n_inputs)
    steps_per_epoch = math.ceil(len(_epoch_window_starts(n_inputs, length, torch.Generator())) / options.batch_size)
    total_steps = steps_per_epoch * options.max_epochs
    optimizer = make_optimizer(model, options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, options.warmup_steps, total_steps, options.schedule)
    )

    best_nll = math.inf
    best_state = copy.deepcopy(model.state_dict())
    curve: list[float] = []
    bad_validations = 0
    step = 0
    loss_sum, loss_count = 0.0, 0
    best_epochs = 0.0
    start = time.perf_counter()
    offsets = torch.arange(length)

    def validate() -> bool:
        """Validate, keep the best weights, and return True when patience has run out."""
        nonlocal best_nll, best_state, bad_validations, loss_sum, loss_count, best_epochs
        val_nll = evaluate_nll(
            model, valid, vocab_size, options.context, options.stride, options.eval_batch_size, device
        )
        val_ppl = math.exp(val_nll / valid.numel())
        curve.append(val_ppl)
        train_loss = loss_sum / max(1, loss_count)
        log_metric(f"gpt2/{size.label}/val_ppl", val_ppl, len(curve))
        log_metric(f"gpt2/{size.label}/train_loss", train_loss, len(curve))
        log.info(
            "%s step %d (epoch %.2f): train loss %.4f, validation perplexity %.3f",
            size.label, step, step / steps_per_epoch, train_loss, val_ppl,
        )
        loss_sum, loss_count = 0.0, 0
        if val_nll < best_nll:
            best_nll = val_nll
            best_state = copy.deepcopy(model.state_dict())
            best_epochs = step / steps_per_epoch
            bad_validations = 0
            return False
        bad_validations += 1
        return bad_validations >= options.patience

    stopped = False
    model.train()
    for _ in range(options.max_epochs):
        starts = _epoch_window_starts(n_inputs, length, generator)
        for first in range(0, starts.numel(), options.batch_size):
            index = starts[first : first + options.batch_size, None] + offsets
            inputs = stream[index].to(device)
            targets = stream[index + 1].to(device)
            logits = real_token_logits(model, inputs, vocab_size)
            loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += float(loss.detach())
            loss_count += 1
            over_time = options.max_seconds is not None and time.perf_counter() - start > options.max_seconds
            if over_time:
                log.info("%s reached max_seconds=%s at step %d", size.label, options.max_seconds, step)
                validate()
                stopped = True
                break
            if options.eval_interval is not None and step % options.eval_interval == 0 and validate():
                stopped = True
                break
        if stopped:
            break
        if options.eval_interval is None and validate():
            break
    if loss_count > 0 and not stopped:
        validate()  # steps after the last interval validation

    return SizeResult(
        size=size,
        n_params=n_params,
        val_nll=best_nll,
        val_ppl=math.exp(best_nll / valid.numel()),
        epochs=best_epochs,
        steps=step,
        seconds=time.perf_counter() - start,
        state_dict=best_state,
        curve=curve,
    )


def parse_sizes(sizes: Sequence) -> list[GPT2Size]:
    """Return the candidate sizes from a list of {n_layer, n_head, n_embd} mappings."""
    parsed = [GPT2Size(int(s["n_layer"]), int(s["n_head"]), int(s["n_embd"])) for s in sizes]
    if not parsed:
        raise ValueError("model.sizes is empty; give at least one {n_layer, n_head, n_embd}")
    return parsed


def training_options(model_cfg: DictConfig) -> TrainingOptions:
    """Read the training options from the `model` config group, with the dataclass defaults for missing keys."""
    defaults = TrainingOptions()

    def read(name: str, cast: type) -> object:
        value = model_cfg.get(name, getattr(defaults, name))
        return None if value is None else cast(value)

    options = TrainingOptions(
        context=read("context", int),
        batch_size=read("batch_size", int),
        lr=read("lr", float),
        weight_decay=read("weight_decay", float),
        warmup_steps=read("warmup_steps", int),
        schedule=read("schedule", str),
        dropout=read("dropout", float),
        max_epochs=read("max_epochs", int),
        patience=read("patience", int),
        max_seconds=read("max_seconds", float),
        eval_stride=read("eval_stride", int),
        eval_interval=read("eval_interval", int),
        eval_batch_size=read("eval_batch_size", int),
    )
    if options.schedule not in ("cosine", "constant"):
        raise ValueError(f"model.schedule must be 'cosine' or 'constant', got {options.schedule!r}")
    if options.patience < 1:
        raise ValueError(f"model.patience must be at least 1, got {options.patience}")
    return options


def run_gpt2(cfg: DictConfig, corpus: TokenCorpus, log_metric: MetricLogger) -> dict[str, float]:
    """Train every size of `cfg.model.sizes`, keep the best on validation, and score it on test.

    After selection, the validation curve of the kept size is logged again as
    `bp_only/epoch_val_ppl`, so it lines up with the backprop-only curves of SAFFU runs.
    """
    model_cfg = cfg.model
    options = training_options(model_cfg)
    sizes = parse_sizes(model_cfg.sizes)
    threads = model_cfg.get("threads")
    if threads is not None:
        torch.set_num_threads(int(threads))
    # NOTE: only the CPU path has been run; the tensors are moved per batch, so CUDA should work unchanged.
    device_name = model_cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device_name)
    seed = int(cfg.get("seed", 0))

    start = time.perf_counter()
    train = split_tokens(corpus, "train")
    valid = split_tokens(corpus, "valid")
    test = split_tokens(corpus, "test")
    vocab_size = corpus.vocab_size

    metrics: dict[str, float] = {}
    best: SizeResult | None = None
    for size in sizes:
        result = train_size(size, train, valid, vocab_size, options, seed, device, log_metric)
        metrics[f"gpt2/{size.label}/val_ppl"] = result.val_ppl
        metrics[f"gpt2/{size.label}/n_params"] = float(result.n_params)
        metrics[f"gpt2/{size.label}/seconds"] = result.seconds
        if best is None or result.val_nll < best.val_nll:
            best = result
        else:
            result.state_dict.clear()  # free the weights of a size that lost
    assert best is not None  # parse_sizes rejects an empty list

    for index, val_ppl in enumerate(best.curve, start=1):
        log_metric("bp_only/epoch_val_ppl", val_ppl, index)
    model = build_gpt2(vocab_size, best.size, options.context, options.dropout).to(device)
    model.load_state_dict(best.state_dict)
    test_nll = evaluate_nll(model, test, vocab_size, options.context, options.stride, options.eval_batch_size, device)
    metrics.update(
        {
            "n_params": float(best.n_params),
            **split_metrics("val", best.val_nll, valid.numel(), corpus.chars["valid"]),
            **split_metrics("test", test_nll, test.numel(), corpus.chars["test"]),
            "seconds": time.perf_counter() - start,
            "gpt2/n_layer": float(best.size.n_layer),
            "gpt2/n_head": float(best.size.n_head),
            "gpt2/n_embd": float(best.size.n_embd),
            "gpt2/context": float(options.context),
            "gpt2/best_epoch": best.epochs,
            "gpt2/steps": float(best.steps),
        }
    )
    return metrics
