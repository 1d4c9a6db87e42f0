"""`--lr auto`: a learning-rate range test on the R matrices before training.

The test of Smith ("Cyclical Learning Rates for Training Neural Networks", 2017) as fastai's
`lr_find` and PyTorch Lightning's `LearningRateFinder` run it: a short run of optimizer steps whose
learning rate grows exponentially from `min_lr` to `max_lr`, one step per rate; the loss is smoothed
with a bias-corrected exponential moving average; the test stops early once the smoothed loss passes
`stop_factor` times its minimum (it has diverged). The choice is fastai's default rule, "valley": the
rate half-way down the longest run of falling loss, ignoring the first `skip_begin` points, where the
average has not settled; without a valley it falls back to fastai's older "minimum / 10" rule.
Lightning's rule (steepest descent) is recorded beside them: on the sweep's tasks (README "Defaults")
the noise of per-batch language-modelling losses sent it far too low, while the valley chose 1.7 to 3.6
times below the swept best rate, within two points of the best metric, on every task.

Only R's learning rate is scanned; a task head keeps its own (default) learning rate during the test.
Everything the test touches is put back exactly before real training starts: the trainable tensors
(copied back bitwise), their gradients, and the torch, CUDA and Python random states, so a run with
`--lr auto` that picked X equals a run with `--lr X`. The test builds its own optimizer; the run's
optimizer is created fresh afterwards. Under torchrun every process takes its slice of the same
global batches, gradients are averaged across processes, and rank 0's choice is broadcast, so every
process trains with the same rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .checkpoint import rng_state, set_rng_state

__all__ = ["LRFindResult", "LRFindSettings", "choose", "lr_range_test", "suggestions"]


@dataclass(frozen=True)
class LRFindSettings:
    min_lr: float = 1e-5
    max_lr: float = 1.0
    steps: int = 50
    beta: float = 0.9  # smoothing: an average over ~1 / (1 - beta) steps
    stop_factor: float = 4.0  # stop once the smoothed loss exceeds this times its minimum
    skip_begin: int = 5

    def validate(self) -> None:
        from .errors import UsageError

        if not (0 < self.min_lr < self.max_lr) or not math.isfinite(self.max_lr):
            raise UsageError(f"LR range test: need 0 < min_lr < max_lr, got {self.min_lr} and {self.max_lr}")
        if self.steps < 2 * self.skip_begin + 2:
            raise UsageError(f"LR range test: --lr-find-steps must be at least {2 * self.skip_begin + 2}")
        if not 0 <= self.beta < 1:
            raise UsageError(f"LR range test: beta must be in [0, 1), got {self.beta}")


@dataclass
class LRFindResult:
    lr: float  # the chosen learning rate of R
    rule: str  # the rule that chose it: "valley", or "min/10" where there is no valley
    suggestions: dict = field(default_factory=dict)  # every rule's rate (RULES), for comparison
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # raw loss of each mini-step
    smoothed: list[float] = field(default_factory=list)
    stopped_early: bool = False
    settings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What config.yaml records (the curve goes to metrics.jsonl)."""
        return {k: v for k, v in asdict(self).items() if k not in ("lrs", "losses", "smoothed")}

    def row(self) -> dict:
        """The metrics.jsonl row: the whole curve (a diverged loss as null: JSON has no infinity)."""
        document = asdict(self)
        for key in ("losses", "smoothed"):
            document[key] = [v if math.isfinite(v) else None for v in document[key]]
        return {"step": 0, "kind": "lr_find", "lr_find": document}


def schedule(settings: LRFindSettings) -> list[float]:
    """The exponentially spaced rates of the test, min_lr first and max_lr last."""
    ratio = settings.max_lr / settings.min_lr
    n = settings.steps
    return [settings.min_lr * ratio ** (i / (n - 1)) for i in range(n)]


def smooth(losses: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as fastai and Lightning smooth the test's loss)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


RULES = ("valley", "steepest", "min/10")


def suggestions(lrs: Sequence[float], smoothed: Sequence[float], settings: LRFindSettings) -> dict:
    """Each rule's rate from a finished test (None where a rule finds nothing), over the points after
    the first `skip_begin`, where the average has not settled:

    valley    fastai's default: the longest run of falling loss (the longest decreasing subsequence of
              the smoothed curve), and the rate half-way through it
    steepest  Lightning's: the most negative slope of the smoothed loss against log lr
    min/10    fastai's older rule: the rate of the lowest smoothed loss, divided by 10
    """
    points = [(lr, loss) for lr, loss in zip(lrs, smoothed, strict=True) if math.isfinite(loss)]
    points = points[settings.skip_begin :]
    found: dict[str, float | None] = dict.fromkeys(RULES)
    if not points:
        return found
    found["min/10"] = max(min(points, key=lambda p: p[1])[0] / 10, settings.min_lr)
    values = [loss for _, loss in points]
    # Longest decreasing subsequence ending at each point (n is small: O(n^2) is fine).
    longest = [1] * len(values)
    for i in range(1, len(values)):
        longest[i] = 1 + max((longest[j] for j in range(i) if values[j] > values[i]), default=0)
    end = max(range(len(values)), key=longest.__getitem__)
    if longest[end] >= 3:
        begin = end - longest[end] + 1
        found["valley"] = points[begin + (end - begin) // 2][0]
    if len(points) >= 3:
        logs = [math.log(lr) for lr, _ in points]
        slopes = [
            (values[i + 1] - values[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, len(values) - 1)
        ]
        index = min(range(len(slopes)), key=slopes.__getitem__)
        if slopes[index] < 0:
            found["steepest"] = points[index + 1][0]
    return found


def choose(found: dict, settings: LRFindSettings) -> tuple[float, str]:
    """The valley rule's rate, else min/10's, else min_lr (a test with no finite loss)."""
    for rule in ("valley", "min/10"):
        if found.get(rule) is not None:
            return found[rule], rule
    return settings.min_lr, "min_lr"


def lr_range_test(
    params: Sequence[torch.nn.Parameter],
    make_optimizer: Callable[[float], torch.optim.Optimizer],
    set_lr: Callable[[torch.optim.Optimizer, float], None],
    step_loss: Callable[[int], float],
    *,
    settings: LRFindSettings | None = None,
    max_grad_norm: float = 0.0,
    all_reduce_grads: Callable[[list[torch.Tensor]], None] | None = None,
    broadcast: Callable[[float], float] | None = None,
    on_step: Callable[[int, float, float], None] | None = None,
) -> LRFindResult:
    """Run the range test and restore `params` (values and gradients) and the random states exactly.

    `step_loss(k)` runs the forward and backward passes of mini-step k (gradients accumulate into
    `params`) and returns its loss, the same value on every process. `make_optimizer(lr)` builds the
    test's own optimizer; `set_lr(optimizer, lr)` sets R's rate (a head keeps its own).
    """
    settings = settings or LRFindSettings()
    settings.validate()
    saved = [p.detach().clone() for p in params]
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    rng = rng_state()
    lrs = schedule(settings)
    tried, losses, smoothed_losses = [], [], []
    stopped = False
    try:
        optimizer = make_optimizer(lrs[0])
        best = math.inf
        for k, lr in enumerate(lrs):
            set_lr(optimizer, lr)
            optimizer.zero_grad(set_to_none=True)
            loss = float(step_loss(k))
            if all_reduce_grads is not None:  # every process reduces the same tensors, in the same order
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                all_reduce_grads([p.grad for p in params])
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            tried.append(lr)
            losses.append(loss if math.isfinite(loss) else math.inf)
            smoothed_losses = smooth(losses, settings.beta)
            if on_step is not None:
                on_step(k, lr, loss)
            current = smoothed_losses[-1]
            if not math.isfinite(current) or (
                k >= settings.skip_begin and current > settings.stop_factor * best
            ):
                stopped = k < len(lrs) - 1
                break
            best = min(best, current)
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    finally:
        with torch.no_grad():
            for p, value, grad in zip(params, saved, saved_grads, strict=True):
                p.copy_(value)
                p.grad = grad
        set_rng_state(rng)
    found = suggestions(tried, smoothed_losses, settings)
    lr, rule = choose(found, settings)
    lr = min(max(lr, settings.min_lr), settings.max_lr)
    if broadcast is not None:  # every process trains with rank 0's choice
        lr = broadcast(lr)
    return LRFindResult(
        lr=lr,
        rule=rule,
        suggestions=found,
        lrs=tried,
        losses=losses,
        smoothed=smoothed_losses,
        stopped_early=stopped,
        settings=asdict(settings),
    )
