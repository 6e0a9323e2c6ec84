"""Small models for the exercises and graders, each where a data-parallel wrapper tends to break.

- ``Plain``: two ``Linear`` layers. Catches no averaging, no initial broadcast, no
  communication at all.
- ``WithBatchNorm``: a ``BatchNorm1d`` that normalises with its running statistics (buffers).
  Catches buffers not broadcast at construction.
- ``WithFrozen``: a ``Parameter`` with ``requires_grad=False``. Catches all-reducing a parameter
  that has no gradient, and not broadcasting it.
- ``Tied``: an embedding and an output layer that share one ``Parameter``. Catches all-reducing
  that ``Parameter`` twice.
- ``WithUnused``: a branch that a step uses only when its data asks for it. Catches skipping a
  parameter whose ``grad`` is None on some ranks.
- ``MLP``: a plain stack of ``Linear`` layers of any widths, for measurements.

The tensors a grader names by their bytes (the frozen one, the tied one, the unused branch's)
have a size no other tensor of their model has, so an all-reduce's payload tells which of them it
carried. ``make(name, dtype)`` builds one, ``fill(model, generator)`` draws all its parameters
and buffers afresh (the graders give every rank different weights, so that only the initial
broadcast can make them equal), each model's ``batch(n, generator)`` draws inputs and targets for
n samples, and its ``loss(output, target)`` is the mean over the samples.

``WithBatchNorm`` keeps its ``BatchNorm1d`` in eval mode: normalising with the running statistics
makes each sample's output independent of the others in its batch, so N ranks with N shards
compute exactly the gradient of one process on the whole batch. In train mode BatchNorm
normalises with the statistics of the rank's own shard, and DDP is no longer the global batch
(``torch.nn.SyncBatchNorm`` computes the statistics over all ranks instead).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Regression(nn.Module):
    """Inputs of ``IN`` standard-normal features, ``OUT`` standard-normal targets, mean squared
    error."""
    IN, OUT = 5, 3

    def batch(self, n, generator, dtype=torch.float64):
        x = torch.randn(n, self.IN, generator=generator, dtype=dtype)
        return x, torch.randn(n, self.OUT, generator=generator, dtype=dtype)

    @staticmethod
    def loss(output, target):
        return F.mse_loss(output, target)


class Plain(_Regression):
    """Linear(5, 6) -> tanh -> Linear(6, 3): 30, 6, 18 and 3 elements."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class WithBatchNorm(_Regression):
    """Linear(5, 6) -> BatchNorm1d(6) on its running statistics -> tanh -> Linear(6, 3).

    Buffers: running_mean (6), running_var (6), num_batches_tracked (an int64 scalar)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)
        self.norm.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.norm.eval()     # always the running statistics: see the module docstring
        return self

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


class WithFrozen(_Regression):
    """Linear(5, 7) -> a frozen 7x7 mixing matrix -> tanh -> Linear(7, 3).

    ``mix`` (49 elements) has ``requires_grad=False``: it is used, it never gets a gradient, and
    it must still be the same on every rank (torch's DDP broadcasts it at construction)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)
        self.mix = nn.Parameter(torch.eye(7), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x) @ self.mix))


class Tied(nn.Module):
    """A tiny language model: Embedding(11, 4) -> Linear(4, 4) -> tanh -> Linear(4, 11), whose
    output weight IS the embedding's (one Parameter of 44 elements, used twice)."""
    VOCAB, DIM = 11, 4

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(self.VOCAB, self.DIM)
        self.mid = nn.Linear(self.DIM, self.DIM)
        self.head = nn.Linear(self.DIM, self.VOCAB)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.embed(tokens))))

    def batch(self, n, generator, dtype=torch.float64):
        tokens = torch.randint(self.VOCAB, (n,), generator=generator)
        return tokens, torch.randint(self.VOCAB, (n,), generator=generator)

    @staticmethod
    def loss(output, target):
        return F.cross_entropy(output, target)


class WithUnused(_Regression):
    """x -> x + gate * Linear(5, 5, bias=False)(x) if any gate is on -> Linear(5, 6) -> tanh ->
    Linear(6, 3). The input's last column is the gate (0 or 1).

    When no sample of a rank's batch has its gate on, the branch does not run and ``extra.weight``
    (25 elements) gets no gradient on that rank: its ``grad`` stays None. Samples whose gate is
    off contribute nothing to it, so one process on the whole batch computes the same gradient as
    the mean of the ranks' gradients with None read as zero. The branch comes first in forward,
    so its gradient is the last one backward computes."""
    IN = 6   # 5 features and the gate

    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(5, 5, bias=False)
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        x, gate = x[:, :5], x[:, 5:]
        if bool(gate.any()):
            x = x + gate * self.extra(x)
        return self.fc2(torch.tanh(self.fc1(x)))

    def batch(self, n, generator, dtype=torch.float64, gate=None):
        """``gate``: one 0/1 per sample (default: random, at least one on)."""
        x, y = super().batch(n, generator, dtype)
        if gate is None:
            gate = torch.randint(2, (n,), generator=generator)
            gate[0] = 1
        return torch.cat([x[:, :5], torch.as_tensor(gate, dtype=dtype)[:, None]], dim=1), y


class MLP(nn.Module):
    """Linear layers of the given widths with tanh between them, for measurements."""

    def __init__(self, *widths):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.tanh(x))
        return x

    def batch(self, n, generator, dtype=torch.float32):
        first, last = self.layers[0].in_features, self.layers[-1].out_features
        return (torch.randn(n, first, generator=generator, dtype=dtype),
                torch.randn(n, last, generator=generator, dtype=dtype))

    @staticmethod
    def loss(output, target):
        return F.mse_loss(output, target)


class Blocks(nn.Sequential):
    """An MLP as a sequence of blocks, each a Linear and (but the last) a tanh: ZeRO-3's units
    are the blocks, called one after another (``python -m labkit.train``)."""

    def __init__(self, *widths):
        pairs = list(zip(widths, widths[1:]))
        super().__init__(*[nn.Sequential(nn.Linear(a, b), *([nn.Tanh()] if i < len(pairs) - 1 else []))
                           for i, (a, b) in enumerate(pairs)])

    def batch(self, n, generator, dtype=torch.float32):
        first, last = self[0][0].in_features, self[-1][0].out_features
        return (torch.randn(n, first, generator=generator, dtype=dtype),
                torch.randn(n, last, generator=generator, dtype=dtype))

    @staticmethod
    def loss(output, target):
        return F.mse_loss(output, target)


GRADING = {"plain": Plain, "batchnorm": WithBatchNorm, "frozen": WithFrozen, "tied": Tied,
           "unused": WithUnused}


def make(name: str, dtype=torch.float64) -> nn.Module:
    """A fresh grading model by name (``GRADING``), in ``dtype``."""
    return GRADING[name]().to(dtype)


@torch.no_grad()
def fill(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draw every parameter and buffer of ``model`` afresh from ``generator``, in place.

    Matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.25) (BatchNorm's weight around 1), running
    variances in [0.5, 1.5], counters any small integer. A shared Parameter is drawn once."""
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
        else:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        if name.endswith("norm.weight"):
            p.add_(1.0)
    for name, b in model.named_buffers():
        if b.dtype == torch.long:
            b.copy_(torch.randint(100, b.shape, generator=generator))
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=generator) + 0.5)
        else:
            b.copy_(torch.randn(b.shape, generator=generator) * 0.5)
    return model
