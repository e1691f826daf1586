"""PASCAL-Context multi-task dense prediction on Swin: MTLoRA's vision benchmark (methods.md §7, metrics.md §4.1).

Data. The ASTMT release ``PASCAL_MT`` (Maninis et al. 2019) of PASCAL-Context (Mottaghi et al. 2014) with PASCAL-Part
person parts (Chen et al. 2014) and distilled saliency and normals: 4,998 train / 5,105 val images, evaluated on val
(there is no separate test split). ``task.data_root`` (else ``$MTBENCH_DATA``, else ``<cache>/data``) holds the
``PASCAL_MT`` folder or is it; ``mtbench prefetch --task pascal`` downloads and verifies it when online. The file
layout and encodings are described in ``_pascal_data``. The ``smoke`` and ``cpu`` profiles read generated scenes
written in the same layout and encodings (into ``$MTBENCH_CACHE`` or ``~/.cache/mtbench``) with the same loader.

Subtasks: ``semseg`` (21 classes), ``human_parts`` (7), ``sal`` (binary saliency), ``normals`` (unit vectors). Every
image carries every subtask. Training batches hold whole images with all labels, and ``task_ids`` lists their
(image, subtask) pairs, image-major (``B·T`` ids); an evaluation batch comes from one subtask's loader and holds that
subtask's label only (``B`` ids). The training loss is the paper's ``Σ_t w_t L_t`` with ``w`` = semseg 1,
human_parts 2, sal 5, normals 10 (methods.md §7.8) for any number ``T`` of subtasks: the runner multiplies each
subtask's mean loss by its share of the pairs (``1/T``), so :meth:`Pascal.loss_weights` gives it ``T·w_t``. Settings
defined on that loss therefore mean what the paper means whatever ``T`` is: every profile clips the gradient norm at
the paper's 5, and a single-task run (to build Δm baselines) clips and steps exactly as the paper's single-task
models did.

Model (§7.4, §7.6). Swin features after patch merging at 4 scales (core ``backbones.swin_stage_features``): with
MTLoRA each subtask gets its own multi-scale features from the task-specific LoRA streams, otherwise the shared
features. Per subtask: 1×1 convolutions without bias to 18/36/72/144 channels, bilinear upsampling to the first
scale, concatenation, 1×1 conv 270→1080, BatchNorm, ReLU, 1×1 conv to the outputs, bilinear upsampling to the input.
Losses (§7.8): pixel cross-entropy ignoring 255 (semseg, human_parts); batch-balanced BCE on logits (sal); L1 between
the L2-normalised prediction and the label over valid pixels (normals). Besides the adapters every PEFT method trains
the patch embedding, all LayerNorms, the relative-position tables and the PatchMerging reductions (§7.7, §10).

Metrics (``_pascal_metrics``): dataset-level mIoU (semseg, human_parts), saliency max-over-thresholds mIoU (primary)
and maxF (empty prediction / ground truth scored as the reference does, ``task.sal_empty``), normals mean angular
error (primary, lower is better) with median, RMSE and % under 11.25/22.5/30°. mIoUs are fractions in [0, 1], angles
in degrees.

Δm. ``val/delta_m`` is Δm (%) of the primary metrics against single-task baselines measured under the run's own
protocol: a baseline file (``mtbench/baselines/``) records the task version and the task settings its values were
measured under (data source and size, backbone, pretraining, input size, augmentation), and Δm is computed only when
they all equal the run's. By default the shipped file that matches is used: the paper's single-task Swin-T numbers
(``pascal_swin_t_stl.json``: the release, Swin-T pretrained, 448 px) or the single-task ``full_ft`` runs of the
``smoke`` and ``cpu`` profiles on their generated scenes (``pascal_smoke_stl.json``, ``pascal_cpu_stl.json``);
with no match (say ``source=synthetic`` at 448 px) no Δm is logged. ``task.baseline_file=PATH`` names your own file
(its protocol must match the run's, else the run is refused before it starts), ``task.baseline_file=none`` turns Δm
off.
To make one, run each subtask alone with the same profile (``--set task.subtasks=[semseg] --set
task.baseline_file=none``, ...), copy each run's primary metric (``val/semseg/miou``, ..., ``val/normals/mean``) into
``{"metrics": {"semseg": {"miou": ...}, ...}, "protocol": {"task": "pascal", "task_version": ..., "config": {...}}}``
(copy the ``protocol`` of a shipped file and edit the settings that differ). Δm's metric version carries a digest of
the baseline values, so runs against different baselines are never merged.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from annotated_types import Ge, MultipleOf
from torch import Tensor, nn

from mtbench.backbones import build, swin_feature_channels, swin_stage_features
from mtbench.errors import ConfigError, DataError
from mtbench.interfaces import MetricSpec, MultiTaskModel, Task, TaskConfig
from mtbench.metrics import BASELINES_DIR, baseline_protocol, load_baselines, protocol_mismatch
from mtbench.registry import backbones, did_you_mean, register_task

from ._files import data_folder, is_folder
from ._pascal_data import (
    IGNORE,
    SPLIT_SIZES,
    Border,
    PascalMT,
    cache_dir,
    normalise,
    normals_target,
    split_ids,
    synthetic_release,
)


if TYPE_CHECKING:
    import torchmetrics

    from mtbench.data import LoaderConfig, MultiTaskDataModule

    from ._pascal_metrics import NormalsStat


VERSION = "2"
"""Task version. 2: the reference's OpenCV augmentation and resizing, saliency maxF's empty-case convention, scenes
with every class; 1: one composed pixel-centred resampling with ignored borders."""
SUBTASKS = ("semseg", "human_parts", "sal", "normals")
OUTPUTS = {"semseg": 21, "human_parts": 7, "sal": 1, "normals": 3}
LOSS_WEIGHTS = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0}
DECODER_CHANNELS = (18, 36, 72, 144)
TARGETS = ("qkv", "proj", "fc1", "fc2")
_BUDGET = {"r": 64, "alpha": 256.0, "dropout": 0.05}
"""The LoRA-family budget of the paper profile: MTLoRA's shared rank 64 and scale 4 (alpha = 4 r), dropout 0.05."""
RELEASE_URL = "https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz"
UNFROZEN = (r"^patch_embed\.|(?:^|\.)norm\d?\.(?:weight|bias)$|\.relative_position_bias_table$"
            r"|\.downsample\.reduction\.weight$")
"""Patch embedding, every LayerNorm, relative-position tables, PatchMerging reductions (not an adapter's ``.base``)."""


@dataclass(frozen=True, kw_only=True)
class PascalConfig(TaskConfig):
    """PASCAL-Context multi-task options."""

    backbone: str = "swin_t"
    """Backbone: swin_t (Swin-T), swin_mini (reduced, CPU runs) or swin_micro (smoke tests)."""
    data_root: str = ""
    """Folder holding PASCAL_MT (or PASCAL_MT itself); empty = $MTBENCH_DATA, then <cache>/data (mtbench prefetch)."""
    checkpoint: str = ""
    """Local Swin checkpoint (official release, e.g. swin_tiny_patch4_window7_224.pth, or timm layout); empty = hub."""
    pretrained: bool = True
    """Load pretrained Swin-T weights (task.checkpoint, else the hub); false = random init."""
    image_size: Annotated[int, Ge(32), MultipleOf(32)] = 448
    """Side of the square network input; images and labels are resized to it ignoring the aspect ratio."""
    source: Literal["local", "synthetic"] = "local"
    """``local``: the PASCAL_MT release; ``synthetic``: generated scenes in the same layout (smoke / cpu)."""
    synthetic_train: Annotated[int, Ge(1)] = 16
    """Generated training scenes (source=synthetic)."""
    synthetic_val: Annotated[int, Ge(1)] = 8
    """Generated validation scenes (source=synthetic)."""
    train_limit: Annotated[int, Ge(0)] = 0
    """Use only the first N training images (0 = all)."""
    eval_limit: Annotated[int, Ge(0)] = 0
    """Evaluate on the first N validation images (0 = all)."""
    augment: bool = True
    """Training augmentation: flip, rotation ±20°, scale 0.75-1.25 (methods.md §7.13)."""
    augment_border: Border = "background"
    """Labels of pixels the augmentation brings in from outside the image: background (0: background, not salient,
    no person part; the reference's) or ignore (255, left out of the losses)."""
    sal_empty: Literal["zero", "one"] = "zero"
    """Saliency maxF: precision of an empty prediction and recall of an empty ground truth, zero (the reference's) or
    one (mtbench pascal v1); maxF's metric version records the choice."""
    baseline_file: str = ""
    """Δm baselines: empty = the shipped file whose protocol matches the run (none matching: no Δm), a JSON path of
    the same shape and protocol, or none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.subtasks:
            if name not in SUBTASKS:
                raise ConfigError(f"task.subtasks: {did_you_mean(name, SUBTASKS, 'pascal subtask')}")
        if len(set(self.subtasks)) != len(self.subtasks):
            raise ConfigError(f"task.subtasks must not repeat a subtask, got {list(self.subtasks)}")
        if self.baseline_file and self.baseline_file.lower() != "none":
            self._check_baseline_file()

    def _check_baseline_file(self) -> None:
        """The named baseline file exists and was measured under this config's protocol (else ConfigError)."""
        if not Path(self.baseline_file).is_file():
            raise ConfigError(f"task.baseline_file={self.baseline_file!r} is not a file (or use 'none')")
        try:
            mismatch = protocol_mismatch(baseline_protocol(self.baseline_file), "pascal", VERSION,
                                         dataclasses.asdict(self))
        except DataError as exc:
            raise ConfigError(f"task.baseline_file: {exc}") from exc
        if mismatch:
            raise ConfigError(f"task.baseline_file={self.baseline_file!r} was measured under another protocol "
                              f"({mismatch}); Δm compares only runs of the same protocol (or use 'none')")


class PascalHead(nn.Module):
    """One subtask's decoder (methods.md §7.6): per-scale 1×1 downsamplers and an HRNet-style head.

    Args:
        in_channels: channels of the backbone's 4 feature maps.
        outputs: output channels (classes, 1 for saliency, 3 for normals).
        widths: downsampled channels per scale (HRNet-W18).
    """

    def __init__(self, in_channels: Sequence[int], outputs: int, widths: Sequence[int] = DECODER_CHANNELS) -> None:
        super().__init__()
        self.downsample = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(in_channels, widths))
        total = sum(widths)
        self.head = nn.Sequential(nn.Conv2d(total, 4 * total, 1), nn.BatchNorm2d(4 * total, momentum=0.1),
                                  nn.ReLU(inplace=True), nn.Conv2d(4 * total, outputs, 1))

    def forward(self, features: Sequence[Tensor], projected: bool = False) -> Tensor:
        """Logits at the first scale's resolution from ``B×C_i×H_i×W_i`` maps; ``projected``: the maps already went
        through :attr:`downsample` (``B×widths_i×H_i×W_i``, as ``swin_stage_features(..., project=...)`` returns
        them)."""
        maps = list(features) if projected else [down(f) for down, f in zip(self.downsample, features)]
        size = maps[0].shape[-2:]
        maps = [maps[0], *(F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:])]
        return self.head(torch.cat(maps, 1))


def _image_score(name: str, out: Tensor, batch: Mapping[str, Tensor]) -> float:
    """Per-image score of one image's output ``(1, C, S, S)``; NaN where it has no label."""
    if name == "sal":
        target = batch["sal"][0]
        valid = target != IGNORE
        if not bool(valid.any()):
            return math.nan
        pred, gold = out[0, 0].sigmoid()[valid] > 0.5, target[valid] > 0
        union = (pred | gold).sum().item()
        return (pred & gold).sum().item() / union if union else 1.0
    if name == "normals":
        target, valid = normals_target(batch["normals"])
        if not bool(valid.any()):
            return math.nan
        pred = F.normalize(out[0], dim=0)
        cos = (pred * target[0]).sum(0).clamp(-1, 1)[valid[0]]
        return float(torch.rad2deg(torch.acos(cos)).mean())
    target = batch[name][0]
    valid = target != IGNORE
    if not bool(valid.any()):
        return math.nan
    pred = out[0].argmax(0)[valid]
    gold = target[valid].long()
    ious = [((pred == c) & (gold == c)).sum().item() / ((pred == c) | (gold == c)).sum().item()
            for c in torch.unique(torch.cat([pred, gold])).tolist()]
    return sum(ious) / len(ious)


@register_task("pascal")
class Pascal(Task):
    """PASCAL-Context 4-task dense prediction (semseg, human parts, saliency, normals) on Swin with HRNet heads.

    Batches hold ``image`` ``(B, 3, S, S)`` (uint8 RGB, normalised in :meth:`forward`), the labels of the subtasks
    they carry (``semseg``, ``human_parts``, ``sal``: ``(B, S, S)`` uint8, 255 = ignore; ``normals``
    ``(B, 3, S, S)``, zero where there is none, made unit vectors with their validity mask on the device by
    ``normals_target``) and
    ``task_ids``: one id per (image, subtask) pair (see the module docstring), and ``present``, the batch's subtask
    indices as a host-side list (the training step never reads them off the device).
    """

    config_cls = PascalConfig
    version = VERSION
    default_subtasks = SUBTASKS
    unfrozen_with_peft = UNFROZEN
    # Every method adapts qkv, proj, fc1 and fc2 of every block (methods.md §10); methods whose own default names
    # separate q/v projections (MoSLD) would otherwise match nothing in Swin's fused qkv.
    profiles: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "smoke": {
            "method": {"target_modules": list(TARGETS)},
            "task": {"backbone": "swin_micro", "pretrained": False, "image_size": 64, "source": "synthetic",
                     "synthetic_train": 16, "synthetic_val": 8},
            "train": {"lr": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "schedule": "constant", "batch_size": 4,
                      "eval_batch_size": 8},
            "trainer": {"max_steps": 6, "gradient_clip_val": 5.0, "num_sanity_val_steps": 0},
        },
        "cpu": {
            "method": {"target_modules": list(TARGETS)},
            "task": {"backbone": "swin_mini", "pretrained": False, "image_size": 128, "source": "synthetic",
                     "synthetic_train": 192, "synthetic_val": 48},
            "train": {"lr": 1e-3, "weight_decay": 0.01, "warmup_ratio": 0.05, "schedule": "cosine", "batch_size": 8,
                      "eval_batch_size": 16},
            "trainer": {"max_steps": 150, "val_check_interval": 75, "gradient_clip_val": 5.0,
                        "num_sanity_val_steps": 0},
        },
        "paper": {
            "method": {"target_modules": list(TARGETS)},
            "task": {"backbone": "swin_t", "pretrained": True, "image_size": 448, "source": "local",
                     "subtasks": list(SUBTASKS)},
            # methods.md §7.8 / §10: lr 5e-4·32/512, 20 warm-up epochs of 156 steps then cosine to 1 %, wd 0.05.
            "train": {"lr": 3.125e-5, "weight_decay": 0.05, "warmup_steps": 3120, "schedule": "cosine",
                      "min_lr_ratio": 0.01, "batch_size": 32, "eval_batch_size": 32, "num_workers": 8},
            # The paper's clipping at 5 of Σ_t w_t L_t, the loss the runner sees for any T (module docstring);
            # validation every 5 epochs (780 steps) and at the end.
            "trainer": {"max_epochs": 300, "max_steps": -1, "precision": "16-mixed", "gradient_clip_val": 5.0,
                        "val_check_interval": 780, "num_sanity_val_steps": 0},
            # methods.md §10: every method at MTLoRA's budget (shared rank 64, scale 4, dropout 0.05; MTLoRA's own
            # defaults), so the trainable-parameter column compares like with like.
            "methods": {
                "lora": {"method": _BUDGET},
                "lora_plus": {"method": _BUDGET},
                # 10 stages of 30 epochs (156 steps each): §10's 3-10 stages for a 300-epoch run.
                "lorasc": {"method": {**_BUDGET, "stage_steps": 30 * 156}},
                # r_i = r / n, the same factor budget as one LoRA of rank 64 (n = 4: 64 is not divisible by 3).
                "multilora": {"method": {**_BUDGET, "n": 4, "equal_budget": True}},
                # Shared A of rank 64 and experts (2, 4, 6, 8) by stage; DropConnect 0.1 is its own regulariser.
                "mosld": {"method": {"r": 64, "alpha": 256.0}},
            },
        },
    }

    cfg: PascalConfig

    def __init__(self, cfg: PascalConfig) -> None:
        super().__init__(cfg)
        self._baselines: dict[str, dict[str, float]] | None | bool = False

    # model --------------------------------------------------------------------------------------------------------

    def backbone(self) -> nn.Module:
        """A timm Swin from ``task.backbone`` at ``task.image_size``."""
        name = self.cfg.backbone
        if not name.startswith("swin") or name not in backbones:
            raise ConfigError(did_you_mean(name, [n for n in backbones.names() if n.startswith("swin")],
                                           "pascal backbone (task.backbone)"))
        return build(name, img_size=self.cfg.image_size, pretrained=self.cfg.pretrained,
                     checkpoint=self.cfg.checkpoint)

    def heads(self, backbone: nn.Module) -> nn.ModuleDict:
        """One :class:`PascalHead` per subtask."""
        channels = swin_feature_channels(backbone)
        return nn.ModuleDict({t: PascalHead(channels, OUTPUTS[t]) for t in self.subtasks})

    def loss_weights(self) -> dict[str, float]:
        """``T·w_t`` with the paper's ``w`` = semseg 1, human_parts 2, sal 5, normals 10 (methods.md §7.8): the runner
        multiplies each by the subtask's share of the (image, subtask) pairs, ``1/T``, so its total is the paper's
        ``Σ_t w_t L_t`` for any number ``T`` of subtasks, and the gradient clipping (and AdamW's ε) apply to the
        quantity the paper applies them to."""
        return {t: LOSS_WEIGHTS[t] * len(self.subtasks) for t in self.subtasks}

    def _present(self, batch: Mapping[str, Any]) -> list[str]:
        # The collate lists them on the host; reading them off the device ids would wait for the device every step.
        return [self.subtasks[i] for i in batch["present"]]

    def forward(self, model: MultiTaskModel, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Per present subtask, outputs at input resolution: logits ``(B, C, S, S)``, raw normals ``(B, 3, S, S)``."""
        present = self._present(batch)
        images = normalise(batch["image"])
        # The heads' 1×1 downsamplers go in with the features: on a task's own stream the backbone applies each
        # together with the patch merging's reduction before it, as one product.
        downsamplers = {t: list(model.heads[t].downsample) for t in present}
        maps = swin_stage_features(model.backbone, images, tasks=present, project=downsamplers)
        assert isinstance(maps, dict)
        return {t: F.interpolate(model.heads[t](maps[t], projected=True), size=images.shape[-2:], mode="bilinear",
                                 align_corners=False) for t in present}

    def loss(self, outputs: Mapping[str, Tensor], batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Mean loss per present subtask (fp32); a batch without any labelled pixel gives a zero loss."""
        losses = {}
        for name, out in outputs.items():
            out = out.float()
            if name == "sal":
                losses[name] = balanced_bce(out[:, 0], batch["sal"])
            elif name == "normals":
                losses[name] = normals_l1(out, *normals_target(batch["normals"]))
            else:
                target = batch[name]
                # The mean over labelled pixels, written as sum / count so that a batch without any is 0 (not
                # 0/0) without asking the device whether it has one.
                labelled = (target != IGNORE).sum().clamp_min(1)
                losses[name] = F.cross_entropy(out, target.long(), ignore_index=IGNORE, reduction="sum") / labelled
        return losses

    # metrics ------------------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, dict[str, MetricSpec]]:
        """See the module docstring; versions name the accumulation, thresholds and units."""
        # torchmetrics: not at the top
        from ._pascal_metrics import MAXF_VERSIONS, DatasetMIoU, NormalsAngularError, SaliencyScores

        empty = 1.0 if self.cfg.sal_empty == "one" else 0.0
        normals: dict[NormalsStat, bool] = {"mean": True, "median": False, "rmse": False, "pct_11_25": False,
                                            "pct_22_5": False, "pct_30": False}
        table: dict[str, dict[str, MetricSpec]] = {
            "semseg": {"miou": MetricSpec(partial(DatasetMIoU, 21), True, True, "dataset-confmat-21")},
            "human_parts": {"miou": MetricSpec(partial(DatasetMIoU, 7), True, True, "dataset-confmat-7")},
            "sal": {"miou": MetricSpec(partial(SaliencyScores, "miou"), True, True, "astmt-15thr-b1"),
                    "maxf": MetricSpec(partial(SaliencyScores, "maxf", empty_score=empty), True, False,
                                       MAXF_VERSIONS[empty])},
            "normals": {stat: MetricSpec(partial(NormalsAngularError, stat), stat.startswith("pct"), primary,
                                         "pooled-deg-v1") for stat, primary in normals.items()},
        }
        return {t: table[t] for t in self.subtasks}

    def update_metrics(
        self,
        metrics: Mapping[str, Mapping[str, torchmetrics.Metric]],
        model: MultiTaskModel,
        batch: Mapping[str, Any],
        outputs: Mapping[str, Any],
    ) -> None:
        """Update each present subtask's metrics."""
        for name, out in outputs.items():
            if name not in metrics:
                continue
            out = out.detach().float()
            args: tuple[Tensor, ...]
            if name == "sal":
                args = (out[:, 0].sigmoid(), batch["sal"])
            elif name == "normals":
                args = (out, *normals_target(batch["normals"]))
            else:
                args = (out.argmax(1), batch[name])
            for metric in metrics[name].values():
                metric.update(*args)

    def example_records(self, batch: Mapping[str, Any], outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Per evaluated image (``example_id``: its PASCAL id) and subtask: the image's loss (the training loss on
        that image alone) and a per-image ``score``: mIoU over the classes present in its prediction or labels
        (segmentation), IoU of the 0.5-thresholded map (saliency), mean angular error in degrees (normals). The
        headline metrics accumulate over the whole split (confusion matrices, thresholds maximised over the mean),
        so these rows are ``aggregate`` ``none``: shown and tested per image, never re-aggregated into a headline."""
        ids = getattr(self, "_val_ids", [])
        records: list[dict[str, Any]] = []
        for name, out in outputs.items():
            out = out.detach().float()
            for row, index in enumerate(batch["index"].tolist()):
                one = {k: v[row : row + 1] for k, v in batch.items() if isinstance(v, Tensor) and v.dim() > 0}
                score = _image_score(name, out[row : row + 1], one)
                loss = float(self.loss({name: out[row : row + 1]}, one)[name]) if math.isfinite(score) else math.nan
                records.append({"subtask": name, "example_id": ids[index] if index < len(ids) else str(index),
                                "score": score, "loss": loss, "aggregate": "none"})
        return records

    def baselines(self) -> dict[str, dict[str, float]] | None:
        """Single-task baselines of the run's protocol: ``task.baseline_file`` (checked by the config), else the
        shipped file whose protocol matches (:func:`shipped_baseline`); ``None`` with none or with
        ``baseline_file=none``."""
        if self._baselines is False:
            spec = self.cfg.baseline_file
            path = None if spec.lower() == "none" else Path(spec) if spec else shipped_baseline(self.cfg)
            data = load_baselines(path) if path is not None else {}
            self._baselines = {t: data[t] for t in self.subtasks if t in data} or None
        return self._baselines  # type: ignore[return-value]

    def batch_size(self, batch: Mapping[str, Any]) -> tuple[int, int]:
        """(images, 0): throughput counts images, each serving every subtask it carries."""
        return int(batch["image"].shape[0]), 0

    # data ---------------------------------------------------------------------------------------------------------

    def datamodule(self, loader: LoaderConfig, seed: int = 0) -> MultiTaskDataModule:
        """Whole-image training batches; one evaluation loader per subtask reading only that subtask's labels."""
        root, size = self.data_root(), self.cfg.image_size
        train_ids, val_ids = split_ids(root, "train"), split_ids(root, "val")
        if self.cfg.train_limit:
            train_ids = train_ids[: self.cfg.train_limit]
        if self.cfg.eval_limit:
            val_ids = val_ids[: self.cfg.eval_limit]
        train = PascalMT(root, "train", self.subtasks, size, self.cfg.augment, ids=train_ids,
                         border=self.cfg.augment_border)
        val = {t: PascalMT(root, "val", (t,), size, False, ids=val_ids) for t in self.subtasks}
        self._val_ids = list(val_ids)
        from ._pascal_loader import AllTasksDataModule  # Lightning: imported by a run, not by listing

        return AllTasksDataModule(self.subtasks, train, val, self.collate, loader, seed)

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Stack examples; ``task_ids`` per (image, subtask): the example's own subtask (evaluation) or all;
        ``present``: the subtask indices in the batch, sorted, as a host-side list."""
        batch: dict[str, Any] = {k: torch.stack([ex[k] for ex in examples]) for k in examples[0] if k != "task_id"}
        if "task_id" in examples[0]:
            ids = [ex["task_id"] for ex in examples]
            batch["task_ids"] = torch.tensor(ids, dtype=torch.long)
            batch["present"] = sorted(set(ids))
        else:
            batch["task_ids"] = torch.arange(len(self.subtasks)).repeat(len(examples))
            batch["present"] = list(range(len(self.subtasks)))
        return batch

    def data_root(self) -> Path:
        """The PASCAL_MT folder: generated (source=synthetic), else found under task.data_root / $MTBENCH_DATA /
        ``<cache>/data``.

        Raises:
            DataError: no PASCAL_MT folder there; the message says how to get it.
        """
        cfg = self.cfg
        if cfg.source == "synthetic":
            return synthetic_release(cfg.synthetic_train, cfg.synthetic_val, seed=0, size=scene_size(cfg.image_size))
        bases = [Path(b).expanduser() for b in (cfg.data_root, os.environ.get("MTBENCH_DATA", "")) if b]
        for base in [*bases, default_data_dir()]:
            if os.path.lexists(base):  # a file, or a folder that cannot be read, is named as such
                data_folder(base, "point task.data_root or $MTBENCH_DATA at the folder holding PASCAL_MT")
            for folder in (base / "PASCAL_MT", base):
                if is_folder(folder / "ImageSets" / "Context"):
                    return folder
        where = bases[0] if bases else default_data_dir()
        raise DataError(f"PASCAL_MT not found in {where}: run `mtbench prefetch --task pascal` (online), or download "
                        f"{RELEASE_URL} and extract it into {where} (set task.data_root or $MTBENCH_DATA)")

    def prefetch(self, root: Path | None = None) -> str:
        """Download, verify and extract ``PASCAL_MT.tgz`` into ``root`` (default: task.data_root, $MTBENCH_DATA, else
        ``<cache>/data``)."""
        if root is None:
            root = Path(self.cfg.data_root or os.environ.get("MTBENCH_DATA", "") or default_data_dir()).expanduser()
        return prefetch_release(root)


def scene_size(image_size: int) -> tuple[int, int]:
    """(W, H) of generated scenes for an input side: 1.5 × 1.125 times it, at most the release's typical 500 × 375."""
    return min(image_size * 3 // 2, 500), min(image_size * 9 // 8, 375)


def shipped_baseline(cfg: PascalConfig) -> Path | None:
    """The shipped pascal baseline file whose protocol matches ``cfg`` (first by name), else ``None``."""
    config = dataclasses.asdict(cfg)
    for path in sorted(BASELINES_DIR.glob("*.json")):
        protocol = baseline_protocol(path)
        if protocol["task"] == "pascal" and protocol_mismatch(protocol, "pascal", VERSION, config) is None:
            return path
    return None


def balanced_bce(logits: Tensor, target: Tensor) -> Tensor:
    """HED-style class-balanced BCE: positives weighted by the batch's negative fraction, negatives by the positive
    fraction, summed and divided by the number of labelled pixels (255 = ignore)."""
    valid = target != IGNORE
    # count >= 1 keeps a batch without labelled pixels at 0 (every weight is 0) without a host-device sync.
    count = valid.sum().clamp_min(1)
    positive = (target == 1) & valid
    w = 1.0 - positive.sum() / count
    per_pixel = F.binary_cross_entropy_with_logits(logits, positive.float(), reduction="none")
    weights = torch.where(positive, w, 1.0 - w) * valid
    return (per_pixel * weights).sum() / count


def normals_l1(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    """L1 between the L2-normalised prediction and the label over valid pixels, per valid element."""
    count = (valid.sum() * pred.shape[1]).clamp_min(1)  # no valid pixel: 0, without a host-device sync
    diff = (F.normalize(pred, dim=1) - target).abs() * valid[:, None]
    return diff.sum() / count


def default_data_dir() -> Path:
    """Where ``mtbench prefetch`` puts data when no data root is configured: ``<cache>/data``."""
    return cache_dir() / "data"


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE",
                                                                                     "HF_DATASETS_OFFLINE"))


def verify_release(folder: Path, expected: Mapping[str, int] = SPLIT_SIZES) -> str:
    """Check a PASCAL_MT folder's structure: split sizes, every listed image, every label folder.

    Raises:
        DataError: naming what is missing or which split has the wrong size.
    """
    counts = {split: len(split_ids(folder, split)) for split in expected}
    wrong = {s: n for s, n in counts.items() if n != expected[s]}
    if wrong:
        raise DataError(f"{folder}: split sizes {wrong} differ from the release's {dict(expected)}")
    for sub in ("semseg", "human_parts", "sal_distill", "normals_distill", "pascal-context/trainval"):
        if not (folder / sub).is_dir():
            raise DataError(f"{folder / sub}: missing folder of the PASCAL_MT release")
    return ", ".join(f"{n} {s}" for s, n in counts.items())


def prefetch_release(root: Path, url: str = RELEASE_URL, expected: Mapping[str, int] = SPLIT_SIZES) -> str:
    """Download ``url`` into ``root``, extract it to ``root/PASCAL_MT`` and verify it; a no-op if already there.

    Raises:
        DataError: offline (``HF_HUB_OFFLINE=1``), no network, or the archive does not verify; the message says
            where to put the data by hand.
    """
    target = root / "PASCAL_MT"
    by_hand = f"download {url} and extract it into {root} so that {target}/ImageSets/Context/train.txt exists"
    if (target / "ImageSets" / "Context").is_dir():
        return f"PASCAL_MT already in {target} ({verify_release(target, expected)})"
    if _offline():
        raise DataError(f"offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set): {by_hand}")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "PASCAL_MT.tgz.part"
    try:
        try:
            with urllib.request.urlopen(url, timeout=30) as response, archive.open("wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        except (urllib.error.URLError, OSError) as exc:
            raise DataError(f"cannot download {url} ({getattr(exc, 'reason', exc)}): {by_hand}") from exc
        with tempfile.TemporaryDirectory(dir=root, prefix=".extract-", ignore_cleanup_errors=True) as tmp:
            _extract(archive, Path(tmp), f"{url}: not a readable .tgz archive; {by_hand}")
            extracted = Path(tmp) / "PASCAL_MT" if (Path(tmp) / "PASCAL_MT").is_dir() else Path(tmp)
            summary = verify_release(extracted, expected)
            extracted.rename(target)
    finally:
        archive.unlink(missing_ok=True)
    return f"PASCAL_MT ({summary}) extracted into {target}"


def _extract(archive: Path, folder: Path, message: str) -> None:
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(folder, filter="data")
            else:  # Python without extraction filters: refuse absolute or parent-relative member paths
                if any(m.name.startswith("/") or ".." in Path(m.name).parts for m in tar.getmembers()):
                    raise DataError(f"{message} (unsafe member paths)")
                tar.extractall(folder)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{message} ({type(exc).__name__})") from exc
