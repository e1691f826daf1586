"""torchmetrics metrics of the text tasks that torchmetrics lacks: grouped exact match (MultiRC), token NLL and
perplexity, a micro accuracy over 0/1 items, and Matthews correlation with the reference convention for a
confusion matrix with an empty row or column.

Kept apart from the data helpers so that importing a task (``mtbench ls tasks``) does not import torchmetrics, which
loads torchvision, scipy and transformers; a task imports this module from ``metrics()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torchmetrics
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat


class MatthewsCorrCoef(torchmetrics.classification.BinaryMatthewsCorrCoef):
    """Binary Matthews correlation, 0 when the denominator is 0 (only one class predicted, or only one in the gold).

    That is the limit of the coefficient and the convention of scikit-learn's ``matthews_corrcoef``, which the GLUE
    reference evaluation (CoLA) uses. torchmetrics 1.x instead perturbs such a confusion matrix by an epsilon and
    returns a small non-zero value: 0.0256 for a model that answers "acceptable" to every sentence of CoLA's dev set,
    which would credit a collapsed model with +2.56 MCC points. Accumulates torchmetrics' confusion matrix (so
    batches and DDP ranks reduce as before) and only the final formula differs.
    """

    def compute(self) -> Tensor:
        """MCC in [-1, 1] from the accumulated ``(2, 2)`` confusion matrix (float64 products: counts up to 1e9)."""
        (tn, fp), (fn, tp) = self.confmat.double()
        denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
        if denominator == 0:
            return torch.zeros((), dtype=torch.float32, device=self.confmat.device)
        return ((tp * tn - fp * fn) / denominator.sqrt()).float()


class GroupExactMatch(torchmetrics.Metric):
    """Share of groups (MultiRC questions) whose every member (answer option) is predicted right.

    torchmetrics' ``ExactMatch`` wants a whole group in one row, but a question's answers are separate rows that can
    straddle evaluation batches and DDP ranks, so we keep (group, correct) pairs and group them only in ``compute``.
    """

    full_state_update = False
    higher_is_better = True
    groups: list[Tensor]
    correct: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("groups", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor, groups: Tensor) -> None:
        """Add predicted and true labels ``(N,)`` with their group ids ``(N,)``."""
        self.groups.append(groups.long())
        self.correct.append((preds.long() == target.long()).long())

    def compute(self) -> Tensor:
        """Exact match over groups (0 when nothing was seen)."""
        # A list of batches on one process; one tensor once torchmetrics has gathered the ranks' lists under DDP.
        if isinstance(self.groups, list) and not self.groups:
            return torch.tensor(0.0, device=self.device)
        groups, correct = dim_zero_cat(self.groups), dim_zero_cat(self.correct)
        if not groups.numel():
            return torch.tensor(0.0, device=self.device)
        _, index = torch.unique(groups, return_inverse=True)
        wrong = torch.zeros(int(index.max()) + 1, dtype=torch.long, device=groups.device)
        wrong.scatter_add_(0, index, 1 - correct)
        return (wrong == 0).float().mean()


class TokenNLL(torchmetrics.Metric):
    """Mean negative log-likelihood per token over everything seen (micro over tokens), or its exponential.

    Args:
        exp: report ``exp(mean NLL)`` (perplexity) instead of the mean NLL (loss).
    """

    full_state_update = False
    higher_is_better = False
    nll: Tensor
    tokens: Tensor

    def __init__(self, exp: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.exp = exp
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: Tensor) -> None:
        """Add summed token NLLs and their token counts (any shapes; summed)."""
        self.nll += nll_sum.detach().double().sum()
        self.tokens += tokens.detach().double().sum()

    def compute(self) -> Tensor:
        """Mean NLL per token (or perplexity); NaN when no token was seen."""
        mean = self.nll / self.tokens if self.tokens > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return (mean.exp() if self.exp else mean).float()


class Accuracy(torchmetrics.MeanMetric):
    """Share of correct items, micro-averaged over every item seen (``update`` takes 0/1 values)."""

    higher_is_better = True  # type: ignore[assignment]
