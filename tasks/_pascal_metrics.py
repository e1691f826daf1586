"""PASCAL-Context multi-task metrics (metrics.md §4.1, methods.md §7.9), torchmetrics ``Metric`` s (for pascal.py).

All are accumulated over the whole evaluation split at the label resolution the loader yields (the resized labels,
like the reference online evaluation), and their states sum across processes:

- :class:`DatasetMIoU`: confusion matrix over the split, ``IoU_c = TP / max(TP + FP + FN, 1e-8)``, mean over all
  classes including background (absent classes count as 0), pixels labelled 255 ignored;
- :class:`SaliencyScores`: ASTMT protocol, 15 thresholds ``linspace(0.2, 0.9)`` on the sigmoid probability,
  per-image Jaccard / precision / recall; ``miou`` = max over thresholds of the mean per-image IoU, ``maxf`` = max
  over thresholds of ``F_β(mean P, mean R)`` with β² = 1; an empty prediction has precision 0 and an empty ground
  truth recall 0, as in the reference (``evaluation/jaccard.py``), or 1 in both cases (``empty_score=1``);
- :class:`NormalsAngularError`: angle in degrees between the L2-normalised prediction and label, pooled over every
  valid pixel of the split: mean (the headline, lower is better), median (from a 0.01° histogram), RMSE, and the
  percentage of pixels under 11.25°, 22.5° and 30°.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torchmetrics
from torch import Tensor


IGNORE = 255


class DatasetMIoU(torchmetrics.Metric):
    """Dataset-level mean IoU from a confusion matrix accumulated over the split (not a mean of per-image IoUs).

    Args:
        num_classes: number of classes (semseg 21, human parts 7).
        ignore_index: label of pixels left out.
    """

    full_state_update = False
    higher_is_better = True
    confmat: Tensor

    def __init__(self, num_classes: int, ignore_index: int = IGNORE) -> None:
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confmat", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            preds: class indices ``(B, H, W)`` or logits ``(B, C, H, W)``.
            target: class indices ``(B, H, W)``, ``ignore_index`` for pixels left out.
        """
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(1)
        keep = target != self.ignore_index
        gt, pred = target[keep].long(), preds[keep].long()
        if gt.numel() and int(gt.max()) >= self.num_classes:
            raise ValueError(f"target class {int(gt.max())} out of range for {self.num_classes} classes")
        self.confmat += torch.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2).view_as(
            self.confmat)

    def compute(self) -> Tensor:
        """Mean over classes of ``TP / max(TP + FP + FN, 1e-8)``."""
        cm = self.confmat.double()
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - tp
        return (tp / union.clamp_min(1e-8)).mean().float()


class SaliencyScores(torchmetrics.Metric):
    """Saliency mIoU or maxF over a grid of thresholds, from per-image scores averaged over the split.

    Per image and threshold τ, with ``P = prob > τ`` and ``G`` the binary label over its valid pixels: Jaccard
    ``|P∧G| / |P∨G|`` (1 when both are empty), precision ``|P∧G| / |P|`` and recall ``|P∧G| / |G|``. An empty ``P``
    has precision ``empty_score`` and an empty ``G`` recall ``empty_score``: 0 in the MTLoRA / ASTMT reference
    (``evaluation/jaccard.py`` divides by ``count + 1e-12``), 1 in mtbench's pascal v1 ("no pixel wrongly marked").
    The choice changes maxF only (an image with an empty ``G`` scores recall 0 at every threshold under the
    reference), so it is part of maxF's metric version (:data:`MAXF_VERSIONS`). Images without a valid pixel are
    skipped.

    Args:
        kind: ``"miou"`` (max over τ of the mean IoU) or ``"maxf"`` (max over τ of ``F_β(mean P, mean R)``).
        thresholds: number of thresholds in ``linspace(low, high)``.
        low: smallest threshold.
        high: largest threshold.
        beta_sq: β² of the F-measure.
        empty_score: precision of an empty prediction and recall of an empty ground truth, 0 or 1.

    Raises:
        ValueError: an unknown ``kind`` or an ``empty_score`` other than 0 or 1.
    """

    full_state_update = False
    higher_is_better = True
    taus: Tensor
    iou: Tensor
    precision: Tensor
    recall: Tensor
    images: Tensor

    def __init__(self, kind: Literal["miou", "maxf"] = "miou", thresholds: int = 15, low: float = 0.2,
                 high: float = 0.9, beta_sq: float = 1.0, empty_score: float = 0.0) -> None:
        super().__init__()
        if kind not in ("miou", "maxf"):
            raise ValueError(f"kind must be 'miou' or 'maxf', got {kind!r}")
        if empty_score not in (0.0, 1.0):
            raise ValueError(f"empty_score must be 0 (reference) or 1, got {empty_score!r}")
        self.kind, self.beta_sq, self.empty_score = kind, beta_sq, float(empty_score)
        self.register_buffer("taus", torch.linspace(low, high, thresholds, dtype=torch.float64), persistent=False)
        for name in ("iou", "precision", "recall"):
            self.add_state(name, torch.zeros(thresholds, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            probs: saliency probabilities ``(B, H, W)`` in [0, 1].
            target: ``(B, H, W)``, 1 salient, 0 not, 255 ignored.
        """
        valid = (target != IGNORE).flatten(1)
        keep = valid.any(1)
        valid, gt = valid[keep], (target == 1).flatten(1)[keep]
        probs = probs.flatten(1)[keep].double()
        if not len(probs):
            return
        pred = (probs[:, None, :] > self.taus[None, :, None].to(probs.device)) & valid[:, None, :]  # (B, T, N)
        gt = (gt & valid)[:, None, :]
        inter = (pred & gt).sum(-1).double()
        n_pred, n_gt = pred.sum(-1).double(), gt.sum(-1).double()
        union = n_pred + n_gt - inter
        one, empty = torch.ones_like(inter), torch.full_like(inter, self.empty_score)
        self.iou += torch.where(union > 0, inter / union.clamp_min(1), one).sum(0)
        self.precision += torch.where(n_pred > 0, inter / n_pred.clamp_min(1), empty).sum(0)
        self.recall += torch.where(n_gt > 0, inter / n_gt.clamp_min(1), empty).sum(0)
        self.images += len(probs)

    def compute(self) -> Tensor:
        """The best score over thresholds."""
        n = self.images.clamp_min(1).double()
        if self.kind == "miou":
            return (self.iou / n).max().float()
        p, r = self.precision / n, self.recall / n
        f = (1 + self.beta_sq) * p * r / (self.beta_sq * p + r).clamp_min(1e-12)
        return f.max().float()


MAXF_VERSIONS = {0.0: "astmt-15thr-b1-empty0", 1.0: "astmt-15thr-b1"}
"""Saliency maxF's metric version per ``empty_score``: the reference's convention (0) and mtbench pascal v1's (1)."""


NormalsStat = Literal["mean", "median", "rmse", "pct_11_25", "pct_22_5", "pct_30"]
_WITHIN = {"pct_11_25": 11.25, "pct_22_5": 22.5, "pct_30": 30.0}


class NormalsAngularError(torchmetrics.Metric):
    """One statistic of the per-pixel angular error (degrees) of surface normals, pooled over the split.

    The angle is ``2·atan2(|n̂ − g|, |n̂ + g|)`` between the unit prediction ``n̂`` and unit label ``g``, which equals
    ``arccos(n̂·g)`` without its loss of precision near 0° and 180°.

    Args:
        stat: ``mean``, ``median`` (to 0.01°), ``rmse`` (``sqrt(mean θ²)``), or ``pct_11_25`` / ``pct_22_5`` /
            ``pct_30`` (percentage of pixels with θ below the bound).
        bins: histogram bins over [0°, 180°] for the median.
    """

    full_state_update = False
    higher_is_better = None  # depends on ``stat``: errors are lower-is-better, ``pct_*`` higher (see MetricSpec)
    total: Tensor
    squares: Tensor
    count: Tensor
    within: Tensor
    hist: Tensor

    def __init__(self, stat: NormalsStat = "mean", bins: int = 18000) -> None:
        super().__init__()
        if stat not in ("mean", "median", "rmse", *_WITHIN):
            raise ValueError(f"unknown normals statistic {stat!r}")
        self.stat, self.bins = stat, bins
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squares", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(3, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hist", torch.zeros(bins, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, valid: Tensor) -> None:
        """Add a batch.

        Args:
            preds: predicted normals ``(B, 3, H, W)`` (any length; normalised here).
            target: label normals ``(B, 3, H, W)``.
            valid: ``(B, H, W)`` bool, pixels with a label.
        """
        mask = valid.bool() & (target.norm(dim=1) > 0)
        n = torch.nn.functional.normalize(preds.double(), dim=1).movedim(1, -1)[mask]
        g = torch.nn.functional.normalize(target.double(), dim=1).movedim(1, -1)[mask]
        theta = torch.rad2deg(2 * torch.atan2((n - g).norm(dim=-1), (n + g).norm(dim=-1)))
        self.total += theta.sum()
        self.squares += (theta**2).sum()
        self.count += theta.numel()
        self.within += torch.stack([(theta < b).sum() for b in _WITHIN.values()])
        idx = (theta / 180.0 * self.bins).long().clamp_(0, self.bins - 1)
        self.hist += torch.bincount(idx, minlength=self.bins)

    def compute(self) -> Tensor:
        """The statistic (``nan`` before any valid pixel)."""
        count = int(self.count)
        if count == 0:
            return torch.tensor(math.nan)
        if self.stat == "mean":
            return (self.total / count).float()
        if self.stat == "rmse":
            return (self.squares / count).sqrt().float()
        if self.stat == "median":
            cdf = self.hist.cumsum(0)
            k = int(torch.searchsorted(cdf, torch.tensor((count + 1) // 2, device=cdf.device)))
            return torch.tensor((k + 0.5) * 180.0 / self.bins)
        return (100.0 * self.within[list(_WITHIN).index(self.stat)] / count).float()
