"""PASCAL-Context task: the release loader on hand-written files, metrics and Δm on hand-computed inputs, the Swin
checkpoint key mapping, MTLoRA's per-task streams on Swin, the paper's parameter counts, prefetch and a CLI run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mtbench.backbones import (
    build,
    load_swin_checkpoint,
    swin_checkpoint_to_timm,
    swin_feature_channels,
    swin_stage_features,
)
from mtbench.errors import ConfigError, DataError
from mtbench.interfaces import MetricSpec
from mtbench.metrics import BASELINES_DIR, delta_m, delta_m_metrics, load_baselines
from mtbench.tasks import _pascal_data as pdata
from mtbench.tasks._pascal_metrics import DatasetMIoU, NormalsAngularError, SaliencyScores
from mtbench.tasks.pascal import Pascal, PascalConfig, balanced_bce, normals_l1, prefetch_release, verify_release


ALL = ("semseg", "human_parts", "sal", "normals")
N = 8  # side of the hand-written images: square, so resizing to N keeps every pixel


# A hand-written PASCAL_MT folder ------------------------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _parts_struct(objects: list[tuple[int, np.ndarray, list[tuple[str, np.ndarray]]]]) -> np.ndarray:
    """PASCAL-Part ``anno.objects``: 1×N struct (class, class_ind, mask, parts 1×M struct of part_name, mask)."""
    out = np.empty((1, len(objects)), dtype=[(f, object) for f in ("class", "class_ind", "mask", "parts")])
    for i, (cls, mask, parts) in enumerate(objects):
        if parts:
            struct = np.empty((1, len(parts)), dtype=[("part_name", object), ("mask", object)])
            for j, (name, pmask) in enumerate(parts):
                struct[0, j] = (np.array([name]), pmask.astype(np.uint8))
        else:
            struct = np.zeros((0, 0))
        out[0, i] = (np.array(["person" if cls == 15 else "dog"]), np.array([[cls]]), mask.astype(np.uint8), struct)
    return out


def _box(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros((N, N), bool)
    mask[r0:r1, c0:c1] = True
    return mask


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    """Two images: 'a' (VOC12 semseg, a person with parts and a dog, sal, normals), 'b' (pascal-context semseg, no
    parts file), 'c' (parts file without a person part)."""
    root = tmp_path / "PASCAL_MT"
    (root / "ImageSets" / "Context").mkdir(parents=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("a\nb\nc\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text("b\n")
    rng = np.random.default_rng(0)
    for pid in "abc":
        image = rng.integers(0, 255, (N, N, 3), dtype=np.uint8)
        (root / "JPEGImages").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{pid}.jpg", quality=100)
        sem = np.zeros((N, N), np.uint8)
        sem[0, :] = 255
        sem[2:6, 1:4] = 15
        sem[5:8, 5:8] = 12
        _png(root / "semseg" / ("VOC12" if pid == "a" else "pascal-context") / f"{pid}.png", sem)
        sal = np.zeros((N, N), np.uint8)
        sal[:, 4], sal[:, 5], sal[:, 6] = 127, 128, 255
        _png(root / "sal_distill" / f"{pid}.png", sal)
        normals = np.zeros((N, N, 3), np.uint8)
        normals[...] = (255, 128, 0)
        _png(root / "normals_distill" / f"{pid}.png", normals)
        labels = np.full((N, N), 440, np.int32)  # wall: has normals
        labels[:2] = 360  # sky: no NYUv2 class, no normals
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(root / "pascal-context" / "trainval" / f"{pid}.mat", {"LabelMap": labels})
    person = _box(2, 8, 1, 4)
    parts = [("hair", _box(2, 3, 1, 4)), ("torso", _box(3, 5, 1, 4)), ("luarm", _box(3, 4, 0, 1)),
             ("rhand", _box(4, 5, 0, 1)), ("ruleg", _box(5, 6, 1, 4)), ("lfoot", _box(7, 8, 1, 4))]
    dog = (12, _box(5, 8, 5, 8), [("head", _box(5, 6, 5, 8))])  # non-person parts are not human parts
    (root / "human_parts").mkdir()
    for pid, objects in (("a", [(15, person, parts), dog]), ("c", [(15, person, []), dog])):
        scipy.io.savemat(root / "human_parts" / f"{pid}.mat",
                         {"anno": {"imname": np.array([pid]), "objects": _parts_struct(objects)}})
    return root


def _unit(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample's normals as the task sees them on the device: unit vectors ``(3, S, S)`` and validity ``(S, S)``."""
    normals, valid = pdata.normals_target(out["normals"][None])
    return normals[0], valid[0]


def test_loader_decodes_every_label(release: Path) -> None:
    ds = pdata.PascalMT(release, "train", ALL, N, augment=False)
    assert ds.ids == ["a", "b", "c"] and len(ds) == 3
    a = ds[0]
    sem = a["semseg"].numpy()
    assert (sem[0] == 255).all() and (sem[2:6, 1:4] == 15).all() and (sem[5:8, 5:8] == 12).all()
    assert sem[1, 0] == 0
    parts = a["human_parts"].numpy()
    assert (parts[2, 1:4] == 1).all() and (parts[3, 1:4] == 2).all() and parts[3, 0] == 3 and parts[4, 0] == 4
    assert (parts[5, 1:4] == 5).all() and (parts[7, 1:4] == 6).all()
    assert parts[6, 1] == 0 and (parts[5, 5:8] == 0).all() and parts[0, 7] == 0  # unlabelled person, dog, background
    assert (ds[1]["human_parts"] == 255).all() and (ds[2]["human_parts"] == 255).all()  # no file; no person part
    sal = a["sal"].numpy()
    assert (sal[:, :5] == 0).all() and (sal[:, 5:7] == 1).all() and (sal[:, 7] == 0).all()  # 127 -> 0, 128 -> 1
    raw, keep = pdata.read_normals(release, "a", (N, N))
    assert np.allclose(raw[3, 3], (1.0, 2 * 128 / 255 - 1, -1.0), atol=1e-6) and (raw[:2] == 0).all()
    assert (keep[:2] == 0).all() and keep[2:].all()
    unit, valid = _unit(a)
    assert (valid.numpy() == keep).all()
    expected = torch.tensor([1.0, 1 / 255, -1.0])
    assert torch.allclose(unit[:, 4, 4], expected / expected.norm(), atol=1e-5)
    assert (unit[:, :2] == 0).all()
    image = np.asarray(Image.open(release / "JPEGImages" / "a.jpg"))
    assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], torch.from_numpy(image).permute(2, 0, 1))
    mean, std = torch.tensor(pdata.MEAN)[:, None, None], torch.tensor(pdata.STD)[:, None, None]
    scaled = torch.from_numpy(image / np.float32(255)).permute(2, 0, 1)
    assert torch.allclose(pdata.normalise(a["image"][None])[0] * std + mean, scaled, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        pdata.normalise(a["image"].float())


def test_flip_negates_normals_x_and_rotation_turns_them(release: Path) -> None:
    image = pdata.read_image(release, "a")
    sem = pdata.read_semseg(release, "a", (N, N))
    normals, keep = pdata.read_normals(release, "a", (N, N))
    plain = pdata.warp(image, {"semseg": sem, "normals": (normals, keep)}, N)
    flipped = pdata.warp(image, {"semseg": sem, "normals": (normals, keep)}, N, flip=True)
    assert torch.equal(flipped["semseg"], plain["semseg"].flip(-1))
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert torch.allclose(_unit(flipped)[0][0], -_unit(plain)[0][0].flip(-1), atol=1e-6)
    assert torch.allclose(_unit(flipped)[0][1:], _unit(plain)[0][1:].flip(-1), atol=1e-6)
    # A normal pointing right, rotated 90° counter-clockwise with the image, points up (y down): (0, -1, 0).
    right = np.zeros((N, N, 3), np.float32)
    right[..., 0] = 1.0
    mark = np.zeros((N, N), np.uint8)
    mark[3, 6] = 1  # right of and above the reference's centre (x, y) = (W/2, H/2) = (4, 4)...
    out = pdata.warp(image, {"semseg": mark, "normals": (right, np.ones((N, N), bool))}, N, angle=90.0)
    assert out["semseg"][2, 3] == 1 and out["semseg"].sum() == 1  # ...lands above and left of it
    assert torch.allclose(_unit(out)[0][:, 4, 4], torch.tensor([0.0, -1.0, 0.0]), atol=1e-5)
    # A random training draw keeps every output finite and every label in its range.
    torch.manual_seed(0)
    ex = pdata.PascalMT(release, "train", ALL, 16, augment=True)[0]
    assert ex["image"].shape == (3, 16, 16) and torch.isfinite(ex["image"]).all()
    assert set(ex["semseg"].unique().tolist()) <= {0, 12, 15, 255}


def test_release_files_decode_exactly(release: Path) -> None:
    """The readers' output on hand-written files in the release's encodings, pinned value by value."""
    image = pdata.read_image(release, "a")
    jpeg = np.asarray(Image.open(release / "JPEGImages" / "a.jpg").convert("RGB"))
    assert image.dtype == np.uint8 and np.array_equal(image, jpeg)
    sem = np.zeros((N, N), np.uint8)
    sem[0, :], sem[2:6, 1:4], sem[5:8, 5:8] = 255, 15, 12
    for pid in "ab":  # VOC12 and pascal-context folders
        got = pdata.read_semseg(release, pid, (N, N))
        assert got.dtype == np.uint8 and np.array_equal(got, sem)
    parts = np.zeros((N, N), np.uint8)
    parts[2, 1:4], parts[3:5, 1:4], parts[3, 0], parts[4, 0], parts[5, 1:4], parts[7, 1:4] = 1, 2, 3, 4, 5, 6
    assert np.array_equal(pdata.read_human_parts(release, "a", (N, N)), parts)
    assert (pdata.read_human_parts(release, "b", (N, N)) == 255).all()  # no file
    assert (pdata.read_human_parts(release, "c", (N, N)) == 255).all()  # a person without parts
    sal = np.zeros((N, N), np.uint8)
    sal[:, 5:7] = 1  # 127 -> 0, 128 and 255 -> 1
    assert np.array_equal(pdata.read_sal(release, "a", (N, N)), sal)
    normals, keep = pdata.read_normals(release, "a", (N, N))
    expected = np.zeros((N, N, 3), np.float32)
    expected[2:] = (255 * (2 / 255) - 1, 128 * np.float32(2 / 255) - 1, -1.0)
    assert normals.dtype == np.float32 and np.array_equal(normals, expected)
    assert np.array_equal(keep, np.arange(N)[:, None].repeat(N, 1) >= 2)


def test_augmentation_borders_are_background_as_in_the_reference() -> None:
    """Pixels a rotation/zoom-out brings in from outside are background (0) for every label, not ignored."""
    image = np.full((N, N, 3), 200, np.uint8)
    labels = {"semseg": np.full((N, N), 12, np.uint8), "human_parts": np.full((N, N), 2, np.uint8),
              "sal": np.ones((N, N), np.uint8), "normals": (np.tile(np.float32([0, 0, 1]), (N, N, 1)), None)}
    out = pdata.warp(image, labels, N, angle=45.0, scale=0.5)
    inside = out["semseg"] == 12
    assert inside[4, 4] and not inside[0, 0] and 0 < int(inside.sum()) < N * N
    for name, value in (("semseg", 12), ("human_parts", 2), ("sal", 1)):
        assert set(out[name][~inside].unique().tolist()) == {0}, name  # background / not salient, never 255
        assert (out[name][inside] == value).all(), name
    unit, valid = _unit(out)
    assert not valid[0, 0] and valid[4, 4] and (unit[:, 0, 0] == 0).all()
    ignored = pdata.warp(image, labels, N, angle=45.0, scale=0.5, border="ignore")  # the named option
    for name in ("semseg", "human_parts", "sal"):
        assert set(ignored[name][~inside].unique().tolist()) == {255}, name
    # An image without person parts (all 255) stays all ignored; one whose parts all leave the frame becomes so.
    none = pdata.warp(image, {"human_parts": np.full((N, N), 255, np.uint8)}, N, angle=30.0, scale=0.8)
    assert (none["human_parts"] == 255).all()
    corner = np.zeros((N, N), np.uint8)
    corner[0, 0] = 3
    assert (pdata.warp(image, {"human_parts": corner}, N, angle=10.0, scale=1.25)["human_parts"] == 255).all()
    assert (pdata.warp(image, {"human_parts": corner}, N)["human_parts"] == corner).all()


def test_labels_resize_by_opencv_nearest_neighbour() -> None:
    """``INTER_NEAREST`` takes source column ``floor(x · W_in / W_out)``: 6 -> 4 keeps columns 0, 1, 3, 4 (a
    pixel-centred resampling would keep 0, 2, 3, 5)."""
    label = np.tile(np.arange(1, 7, dtype=np.uint8), (6, 1))
    out = pdata.warp(np.zeros((6, 6, 3), np.uint8), {"semseg": label, "sal": (label > 3).astype(np.uint8)}, 4)
    assert out["semseg"].tolist() == [[1, 2, 4, 5]] * 4
    assert out["sal"].tolist() == [[0, 0, 1, 1]] * 4
    up = pdata.warp(np.zeros((2, 2, 3), np.uint8), {"semseg": np.array([[1, 2], [3, 4]], np.uint8)}, 4)
    assert up["semseg"].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    # Augmented labels are resampled twice: warped at the source size (90° about (3, 3)), then resized (6 -> 4).
    mark = np.zeros((6, 6), np.uint8)
    mark[1, 5] = 7  # (x 5, y 1) -> (1, 1) -> output (1, 1)
    twice = pdata.warp(np.zeros((6, 6, 3), np.uint8), {"semseg": mark}, 4, angle=90.0)["semseg"]
    assert twice.tolist() == [[0, 0, 0, 0], [0, 7, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    mark = np.zeros((6, 6), np.uint8)
    mark[1, 4] = 7  # (x 4, y 1) -> (1, 2): source row 2 is not among the rows 0, 1, 3, 4 the resize keeps
    assert not pdata.warp(np.zeros((6, 6, 3), np.uint8), {"semseg": mark}, 4, angle=90.0)["semseg"].any()


def test_image_resize_replicates_edges_and_normals_keep_non_zero_vectors() -> None:
    flat = pdata.warp(np.full((N, N, 3), 200, np.uint8), {}, 2 * N)["image"]
    assert (flat == 200).all()  # no dark border
    normals = np.zeros((N, N, 3), np.float32)
    normals[:, : N // 2] = (0.0, 0.0, 1.0)
    out = pdata.warp(np.zeros((N, N, 3), np.uint8), {"normals": (normals, normals[..., 2] > 0)}, 2 * N)
    # Bicubic ×2: output column x reads source columns around (x + 0.5) / 2 − 0.5 with 4 taps; columns up to 10
    # still reach a valid source column (< 4) and stay valid, as in the reference; the vectors are unit length.
    unit, valid = _unit(out)
    assert valid.all(0).tolist() == [True] * 11 + [False] * 5
    assert torch.allclose(unit[:, :, :11].norm(dim=0), torch.ones(2 * N, 11), atol=1e-6)
    assert (unit[:, :, 11:] == 0).all()


@pytest.mark.parametrize(("path", "garbage"), [("JPEGImages/a.jpg", b"\xff\xd8\xff\xe0not a jpeg"),
                                                ("semseg/VOC12/a.png", b"\x89PNG\r\n\x1a\nbroken"),
                                                ("human_parts/a.mat", b"MATLAB 5.0 MAT-file garbage"),
                                                ("pascal-context/trainval/a.mat", b"\x00" * 200),
                                                ("normals_distill/a.png", b"")])
def test_corrupt_files_raise_data_error_naming_the_file(release: Path, path: str, garbage: bytes) -> None:
    (release / path).write_bytes(garbage)
    with pytest.raises(DataError, match=path.split("/")[-1]):
        pdata.PascalMT(release, "train", ALL, N, augment=False)[0]


def test_missing_and_malformed_data_raise(release: Path) -> None:
    (release / "sal_distill" / "a.png").unlink()
    with pytest.raises(DataError, match="a.png: missing"):
        pdata.PascalMT(release, "train", ("sal",), N, augment=False)[0]
    _png(release / "semseg" / "VOC12" / "a.png", np.full((N, N), 30, np.uint8))
    with pytest.raises(DataError, match="class index 30"):
        pdata.PascalMT(release, "train", ("semseg",), N, augment=False)[0]
    (release / "JPEGImages" / "b.jpg").unlink()
    with pytest.raises(DataError, match="train.txt: 1 of 3 listed images missing"):
        pdata.split_ids(release, "train")
    with pytest.raises(DataError, match="test.txt"):
        pdata.split_ids(release, "test")


def test_generated_scenes_use_the_release_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTBENCH_CACHE", str(tmp_path))
    root = pdata.synthetic_release(5, 2, seed=3, size=(40, 32))
    assert pdata.split_ids(root, "train") == [f"train_{i:05d}" for i in range(5)]
    ex = pdata.PascalMT(root, "train", ALL, 32, augment=False)[1]
    mat = scipy.io.loadmat(root / "human_parts" / "train_00001.mat")
    assert mat["anno"][0, 0]["objects"].shape[0] == 1  # a 1×N struct array, as in PASCAL-Part
    assert ex["normals"].shape == (3, 32, 32) and _unit(ex)[1].any()
    # The labels come from one scene: person pixels are salient and carry part labels.
    person = ex["semseg"] == 15
    if person.any():
        assert (ex["sal"][person] == 1).float().mean() > 0.9
        assert (ex["human_parts"][person] > 0).float().mean() > 0.5


# Metrics and losses -------------------------------------------------------------------------------------------------


def test_miou_is_dataset_level() -> None:
    metric = DatasetMIoU(2)
    metric.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [1, 1]]]))
    metric.update(torch.tensor([[[1, 1], [0, 1]]]), torch.tensor([[[0, 0], [0, 255]]]))
    # Summed confusion [[2, 2], [0, 3]]: IoU 2/4 and 3/5. Averaging per-image mIoUs would give (1 + 1/6) / 2.
    assert math.isclose(float(metric.compute()), (0.5 + 0.6) / 2, abs_tol=1e-6)
    three = DatasetMIoU(3)  # an absent class counts as 0
    three.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [1, 1]]]))
    assert math.isclose(float(three.compute()), 2 / 3, abs_tol=1e-6)
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [1, 1]]]), 3).permute(0, 3, 1, 2).float()
    three.update(logits, torch.tensor([[[0, 1], [1, 1]]]))
    assert math.isclose(float(three.compute()), 2 / 3, abs_tol=1e-6)


def test_saliency_miou_and_maxf() -> None:
    probs = torch.tensor([[[0.9, 0.5, 0.2, 0.1]], [[0.8, 0.6, 0.4, 0.1]]])
    target = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 0, 255]]])
    miou, maxf = SaliencyScores("miou", thresholds=2, low=0.3, high=0.7), SaliencyScores("maxf", 2, 0.3, 0.7)
    for metric in (miou, maxf):
        metric.update(probs[:1], target[:1])
        metric.update(probs[1:], target[1:])
    # τ=0.3: IoU (1, 1/3), P (1, 1/3), R (1, 1); τ=0.7: IoU (1/2, 1), P (1, 1), R (1/2, 1).
    assert math.isclose(float(miou.compute()), 0.75, abs_tol=1e-6)
    assert math.isclose(float(maxf.compute()), 2 * 1 * 0.75 / 1.75, abs_tol=1e-6)  # F(1, 0.75) beats F(2/3, 1) = 0.8
    default = SaliencyScores()
    assert default.empty_score == 0.0 and len(default.taus) == 15
    assert math.isclose(float(default.taus[0]), 0.2) and math.isclose(float(default.taus[-1]), 0.9)


def test_saliency_maxf_scores_empty_masks_as_the_reference() -> None:
    """An empty prediction has precision 0 and an empty ground truth recall 0 (reference); 1 and 1 as an option."""
    probs = torch.tensor([[[0.9, 0.1, 0.1, 0.1]], [[0.1, 0.1, 0.1, 0.1]], [[0.1, 0.1, 0.1, 0.1]]])
    target = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]]])
    scores = {}
    for empty in (0.0, 1.0):
        for kind in ("maxf", "miou"):
            metric = SaliencyScores(kind, thresholds=1, low=0.5, high=0.5, empty_score=empty)
            metric.update(probs, target)
            scores[kind, empty] = float(metric.compute())
    # Reference: P (1, 0, 0), R (1/2, 0, 0) -> F(1/3, 1/6) = 2/9. Option: P (1, 1, 1), R (1/2, 1, 0) -> F(1, 1/2).
    assert scores["maxf", 0.0] == pytest.approx(2 / 9) and scores["maxf", 1.0] == pytest.approx(2 / 3)
    assert scores["miou", 0.0] == scores["miou", 1.0] == pytest.approx(0.5)  # IoU: 1/2, 1 (both empty), 0
    with pytest.raises(ValueError, match="empty_score"):
        SaliencyScores("maxf", empty_score=0.5)
    specs = Pascal(PascalConfig()).metrics()["sal"]
    assert specs["maxf"].version == "astmt-15thr-b1-empty0" and specs["miou"].version == "astmt-15thr-b1"
    assert specs["maxf"].factory().empty_score == 0.0
    option = Pascal(PascalConfig(sal_empty="one")).metrics()["sal"]["maxf"]
    assert option.version == "astmt-15thr-b1" and option.factory().empty_score == 1.0


def test_normals_statistics() -> None:
    angles = [0.0, 10.0, 29.0, 45.0, 90.0]
    rad = torch.deg2rad(torch.tensor(angles))
    preds = torch.stack([torch.zeros(5), torch.sin(rad), torch.cos(rad)]) * 3.0  # any length
    preds = torch.cat([preds, torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[0.0], [1.0], [0.0]])], 1)
    target = torch.zeros(3, 7)
    target[2, :6] = 1.0  # the 7th pixel has a zero label, the 6th is masked out
    valid = torch.tensor([True] * 5 + [False, True])
    values = {}
    for stat in ("mean", "median", "rmse", "pct_11_25", "pct_22_5", "pct_30"):
        metric = NormalsAngularError(stat)
        metric.update(preds[None, :, None, :], target[None, :, None, :], valid[None, None, :])
        values[stat] = float(metric.compute())
    assert math.isclose(values["mean"], sum(angles) / 5, abs_tol=1e-3)
    assert abs(values["median"] - 29.0) < 0.011
    assert math.isclose(values["rmse"], math.sqrt(sum(a * a for a in angles) / 5), abs_tol=1e-3)
    assert values["pct_11_25"] == pytest.approx(40.0) and values["pct_22_5"] == pytest.approx(40.0)
    assert values["pct_30"] == pytest.approx(60.0)


def test_losses() -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0, 0.5]])
    target = torch.tensor([[1, 0, 0, 255]])
    # 1 positive of 3 labelled pixels: positives weigh 2/3, negatives 1/3; divided by 3.
    bce = [math.log(2), math.log(1 + math.exp(2)), math.log(1 + math.exp(-1))]
    expected = (2 / 3 * bce[0] + 1 / 3 * (bce[1] + bce[2])) / 3
    assert math.isclose(float(balanced_bce(logits, target)), expected, rel_tol=1e-5)
    assert float(balanced_bce(logits, torch.full_like(target, 255))) == 0.0
    pred = torch.tensor([[[[2.0]], [[0.0]], [[0.0]]]])
    gt = torch.tensor([[[[0.0]], [[1.0]], [[0.0]]]])
    assert math.isclose(float(normals_l1(pred, gt, torch.ones(1, 1, 1, dtype=torch.bool))), 2 / 3, rel_tol=1e-6)
    task = Pascal(PascalConfig(subtasks=("human_parts",)))
    out = {"human_parts": torch.randn(2, 7, 4, 4, requires_grad=True)}
    loss = task.loss(out, {"human_parts": torch.full((2, 4, 4), 255)})["human_parts"]
    assert float(loss) == 0.0 and loss.requires_grad  # images without person parts contribute nothing


# Δm and baselines ---------------------------------------------------------------------------------------------------


def test_delta_m_reproduces_mtlora_r64() -> None:
    lower = {"normals"}
    dm, deltas = delta_m({"semseg": 67.90, "human_parts": 59.84, "sal": 65.40, "normals": 16.60},
                         {"semseg": 67.21, "human_parts": 61.93, "sal": 62.35, "normals": 17.97}, lower)
    assert dm == pytest.approx(2.54, abs=0.01)
    assert deltas["normals"] > 0 and deltas["human_parts"] < 0
    base = load_baselines(BASELINES_DIR / "pascal_swin_t_stl.json")
    scores = {"semseg": 0.6790, "human_parts": 0.5984, "sal": 0.6540, "normals": 16.60}
    ours, _ = delta_m(scores, {t: next(iter(m.values())) for t, m in base.items()}, {"normals": True})
    assert ours == pytest.approx(2.54, abs=0.01)  # same Δm in mtbench's units
    with pytest.raises(ValueError, match="no baseline"):
        delta_m({"depth": 1.0}, {"semseg": 1.0}, ())


def test_baseline_file_and_runner_keys(tmp_path: Path) -> None:
    data = json.loads((BASELINES_DIR / "pascal_swin_t_stl.json").read_text())
    assert data["version"] and data["id"] == "pascal_swin_t_stl" and "units" in data
    task = Pascal(PascalConfig())
    base = task.baselines()
    assert base == {"semseg": {"miou": 0.6721}, "human_parts": {"miou": 0.6193}, "sal": {"miou": 0.6235},
                    "normals": {"mean": 17.97}}
    primaries = {sub: next(n for n, s in specs.items() if s.primary) for sub, specs in task.metrics().items()}
    assert {sub: set(m) for sub, m in base.items()} == {sub: {name} for sub, name in primaries.items()}
    values = {"val/semseg/miou": 0.6790, "val/human_parts/miou": 0.5984, "val/sal/miou": 0.6540,
              "val/normals/mean": 16.60}
    keys = delta_m_metrics(values, task.metrics(), base)
    assert keys["val/delta_m"] == pytest.approx(2.54, abs=0.01) and keys["val/normals/delta"] > 0
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"id": "mine", "metrics": {"semseg": {"miou": 0.5}}, "protocol": data["protocol"]}))
    assert Pascal(PascalConfig(baseline_file=str(own))).baselines() == {"semseg": {"miou": 0.5}}
    assert Pascal(PascalConfig(baseline_file="none")).baselines() is None
    assert delta_m_metrics({"val/sal/miou": 0.5}, {"sal": {"miou": MetricSpec(dict, True, True)}}, {}) == {}
    with pytest.raises(ConfigError, match="task.baseline_file"):
        PascalConfig(baseline_file=str(tmp_path / "absent.json"))
    own.write_text("{}")
    with pytest.raises(DataError, match="mine.json"):
        load_baselines(own)


def test_delta_m_only_against_baselines_of_the_same_protocol(tmp_path: Path) -> None:
    from mtbench.config import resolve
    from mtbench.tasks.pascal import VERSION, shipped_baseline

    def chosen(profile: str, *sets: str) -> str | None:
        path = shipped_baseline(resolve("mtlora", "pascal", profile, sets=list(sets)).task)
        return path.name if path else None

    assert chosen("paper") == "pascal_swin_t_stl.json"
    assert chosen("paper", "task.subtasks=[normals]") == "pascal_swin_t_stl.json"  # single-task runs: same protocol
    assert chosen("smoke") == "pascal_smoke_stl.json"
    assert chosen("cpu") == "pascal_cpu_stl.json"
    assert chosen("cpu", "task.image_size=96") is None  # not what the cpu file was measured at: no Δm, not a wrong one
    cpu = json.loads((BASELINES_DIR / "pascal_cpu_stl.json").read_text())
    assert cpu["measured_with"]["profile"] == "cpu" and {r["git_dirty"] for r in cpu["measured_with"]["runs"].values()
                                                       } == {"false"}
    # Generated scenes at 448 px, random init, another backbone, the ignore border, a cut evaluation set: no Δm.
    for sets in (["task.source=synthetic", "task.pretrained=false"], ["task.pretrained=false"],
                 ["task.augment_border=ignore"], ["task.eval_limit=100"]):
        assert chosen("paper", *sets) is None, sets
    assert chosen("smoke", "task.backbone=swin_mini") is None and chosen("smoke", "task.synthetic_val=9") is None
    smoke = Pascal(resolve("mtlora", "pascal", "smoke").task).baselines()
    assert smoke == load_baselines(BASELINES_DIR / "pascal_smoke_stl.json")
    assert smoke != load_baselines(BASELINES_DIR / "pascal_swin_t_stl.json")
    assert Pascal(resolve("mtlora", "pascal", "paper", sets=["task.source=synthetic"]).task).baselines() is None
    for path in BASELINES_DIR.glob("pascal_*.json"):  # every shipped file states the current protocol
        protocol = json.loads(path.read_text())["protocol"]
        assert protocol["task"] == "pascal" and protocol["task_version"] == VERSION, path.name
    # A file of your own must carry the protocol it was measured under, and it must be the run's.
    paper = json.loads((BASELINES_DIR / "pascal_swin_t_stl.json").read_text())
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"metrics": paper["metrics"]}))
    with pytest.raises(ConfigError, match="own.json.*needs \"protocol\""):
        PascalConfig(baseline_file=str(own))
    own.write_text(json.dumps({"metrics": paper["metrics"], "protocol": paper["protocol"]}))
    with pytest.raises(ConfigError, match="another protocol \\(task.source: baseline 'local', run 'synthetic'\\)"):
        resolve("mtlora", "pascal", "smoke", sets=[f"task.baseline_file={own}"])
    old = {**paper["protocol"], "task_version": "1"}
    own.write_text(json.dumps({"metrics": paper["metrics"], "protocol": old}))
    with pytest.raises(ConfigError, match="task version: baseline '1'"):
        PascalConfig(baseline_file=str(own))


def test_generated_scenes_hold_every_class_the_metrics_average_over(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The smoke profile's 8 validation scenes hold all 21 semseg and 7 part classes: a perfect prediction scores
    mIoU 1 (it scored 0.38 when the scenes held 8 classes)."""
    from mtbench.config import resolve

    monkeypatch.setenv("MTBENCH_CACHE", str(tmp_path))
    task = Pascal(resolve("mtlora", "pascal", "smoke").task)
    val = task.datamodule(resolve("mtlora", "pascal", "smoke").train).val_dataloader()
    metrics = {"semseg": DatasetMIoU(21), "human_parts": DatasetMIoU(7)}
    for loader, name in zip(val, task.subtasks):
        for batch in loader:
            if name in metrics:
                metrics[name].update(batch[name].clamp(max=20), batch[name])
    assert float(metrics["semseg"].compute()) == pytest.approx(1.0)
    assert float(metrics["human_parts"].compute()) == pytest.approx(1.0)


def test_training_forward_and_loss_never_wait_for_the_device(no_host_sync: Any) -> None:
    """The task's part of a training step (the all-subtask Swin forward, the heads, the four losses) turns no tensor
    into a Python value: on a GPU each would stall the host once per step. The losses keep their values. (With
    MTLoRA the all-tasks forward reads its stream ids, which live on the host whatever the device, so it cannot be
    told apart here on a CPU; LoRA runs the same task code.)"""
    from mtbench.config import resolve
    from mtbench.runner import build_module

    module = build_module(resolve("lora", "pascal", "smoke"))
    batch = next(iter(module.task.datamodule(module.train_cfg, seed=0).train_dataloader()))
    assert batch["present"] == [0, 1, 2, 3]
    module.method.set_task(module.model, batch["task_ids"])
    outputs = module.task.forward(module.model, batch)  # warm-up: constants are put on the device once

    with no_host_sync("the pascal training step"):
        losses = module.task.loss(module.task.forward(module.model, batch), batch)
    for name in ("semseg", "human_parts"):  # the mean over labelled pixels, as F.cross_entropy's own mean
        mean = F.cross_entropy(outputs[name].float(), batch[name].long(), ignore_index=255)
        assert torch.allclose(module.task.loss(outputs, batch)[name], mean, rtol=1e-6)
    assert set(losses) == set(ALL) and all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("method", ["mtlora", "lora"])
def test_forward_is_the_heads_on_the_stage_features(method: str) -> None:
    """The task's forward hands the heads' 1×1 downsamplers to the backbone (with MTLoRA each task stream's merge
    and downsampler run as one product): its outputs are the heads applied to the plain stage features."""
    from mtbench.config import resolve
    from mtbench.runner import build_module
    from mtbench.tasks.pascal import normalise

    module = build_module(resolve(method, "pascal", "smoke"))
    model, task = module.model.eval(), module.task
    _randomise(model, "mtlora_tasks_" if method == "mtlora" else "lora_B")
    batch = next(iter(task.datamodule(module.train_cfg, seed=0).train_dataloader()))
    with torch.no_grad():
        outputs = task.forward(model, batch)
        images = normalise(batch["image"])
        features = swin_stage_features(model.backbone, images, tasks=list(ALL))
        assert isinstance(features, dict)
        for t in ALL:
            expected = F.interpolate(model.heads[t](features[t]), size=images.shape[-2:], mode="bilinear",
                                     align_corners=False)
            assert torch.allclose(outputs[t], expected, rtol=1e-4, atol=1e-5), t


@pytest.mark.parametrize("subtasks", [ALL, ("semseg",), ("sal", "normals")])
def test_runner_loss_is_the_papers_weighted_sum_for_any_number_of_subtasks(subtasks: tuple[str, ...]) -> None:
    """The runner's total is Σ_t w_t L_t (w = 1, 2, 5, 10), so the gradient clipping at 5 is the paper's whatever T."""
    from mtbench.config import resolve
    from mtbench.runner import build_module

    exp = resolve("full_ft", "pascal", "smoke", sets=[f"task.subtasks=[{','.join(subtasks)}]"])
    module = build_module(exp)
    batch = next(iter(module.task.datamodule(module.train_cfg, seed=0).train_dataloader()))
    module.log = lambda *args, **kwargs: None  # outside a Trainer
    module.eval()  # BatchNorm in eval mode: both passes below see the same outputs
    total = module.training_step(module.on_before_batch_transfer(batch, 0), 0)
    losses = module.task.loss(module(batch), batch)
    paper = {"semseg": 1.0, "human_parts": 2.0, "sal": 5.0, "normals": 10.0}
    assert set(losses) == set(subtasks)
    assert torch.allclose(total, sum(paper[t] * loss for t, loss in losses.items()), rtol=1e-5)
    for profile in ("smoke", "cpu", "paper"):
        assert resolve("full_ft", "pascal", profile).trainer["gradient_clip_val"] == 5.0  # methods.md §7.8


# Swin: checkpoints, features, MTLoRA streams, parameter counts ------------------------------------------------------


def _micro() -> nn.Module:
    torch.manual_seed(0)
    return build("swin_micro").eval()


def test_official_checkpoint_keys_map_to_timm(tmp_path: Path) -> None:
    model = _micro()
    own = model.state_dict()
    official = {}
    for key, value in own.items():  # the official layout: PatchMerging at the end of the previous stage
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.downsample.", f"layers.{stage - 1}.downsample.")
        official[key] = value.clone()
    official.update({"head.weight": torch.zeros(5, 192), "head.bias": torch.zeros(5), "norm.weight": torch.ones(192),
                     "norm.bias": torch.zeros(192), "layers.0.blocks.0.attn.relative_position_index": torch.zeros(1)})
    assert "layers.0.downsample.reduction.weight" in official
    assert "layers.3.downsample.reduction.weight" not in official
    mapped = swin_checkpoint_to_timm({"model": official})
    assert set(mapped) == set(own) and all(torch.equal(mapped[k], own[k]) for k in own)
    assert swin_checkpoint_to_timm(own).keys() == own.keys()  # timm layout passes through
    # Both layouts concatenate the 2×2 patches in the same order: official-style merging = timm's PatchMerging.
    merge = model.layers[1].downsample
    x = torch.randn(2, 8, 8, 24)
    patches = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    assert torch.allclose(merge(x), merge.reduction(merge.norm(patches)), atol=1e-6)
    path = tmp_path / "swin.pth"
    torch.save({"model": official}, path)
    fresh = build("swin_micro")
    load_swin_checkpoint(fresh, path)
    assert all(torch.equal(fresh.state_dict()[k], own[k]) for k in own)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="swin.pth"):
        load_swin_checkpoint(fresh, path)
    torch.save({"model": {"layers.0.blocks.0.norm1.weight": torch.ones(3)}}, path)
    with pytest.raises(DataError, match="does not fit"):
        load_swin_checkpoint(fresh, path)


def test_stage_features_after_patch_merging() -> None:
    model = _micro()
    features = swin_stage_features(model, torch.randn(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 48, 8, 8), (2, 96, 4, 4), (2, 192, 2, 2), (2, 192, 2, 2)]
    assert swin_feature_channels(model) == [48, 96, 192, 192]


def _mtlora(tasks: tuple[str, ...] = ("semseg", "sal")) -> tuple[nn.Module, object]:
    from mtbench.methods.mtlora import MTLoRA, MTLoRAConfig

    method = MTLoRA(MTLoRAConfig(r=4, task_r=2), tasks)
    return method.apply(_micro()), method


def _randomise(model: nn.Module, match: str) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if match in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_a_swin_with_one_block_per_stage_is_a_swin() -> None:
    """Its four ``layers.N`` paths match LLaMA's block pattern as often as its ``layers.N.blocks.0`` match Swin's; the
    role layers decide, so its blocks, stages and qkv/proj/fc layers are found."""
    timm = pytest.importorskip("timm")
    from mtbench.backbones import blocks, family_of, find_linears, stages, tiny_bert, tiny_llama

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=16, depths=(1, 1, 1, 1),
                              num_heads=(1, 1, 2, 2), img_size=64, window_size=4, num_classes=0)
    assert family_of(model).name == "swin"
    assert blocks(model) == [f"layers.{i}.blocks.0" for i in range(4)] and len(stages(model)) == 4
    assert len(find_linears(model, ("qkv", "proj", "fc1", "fc2"))) == 16
    assert family_of(tiny_bert().model).name == "bert" and family_of(tiny_llama().model).name == "llama"


def test_mtlora_task_streams_on_swin() -> None:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = swin_stage_features(_micro(), images)
        model, method = _mtlora()
        at_init = swin_stage_features(model, images, tasks=("semseg", "sal", "normals"))
        for task in ("semseg", "sal", "normals"):  # identity at init, for every task's features
            assert all(torch.allclose(f, g, atol=1e-5) for f, g in zip(at_init[task], plain))
        _randomise(model, "mtlora_tasks_")
        method.set_task(model, torch.tensor([0, 1]))  # per-example ids set by the runner do not apply here
        out = swin_stage_features(model, images, tasks=("semseg", "sal", "normals"))
        shared = swin_stage_features(model, images)
    assert all(torch.allclose(f, g, atol=1e-5) for f, g in zip(shared, plain))  # task factors never reach it
    for i in range(4):
        assert not torch.allclose(out["semseg"][i], out["sal"][i], atol=1e-4)
        assert not torch.allclose(out["semseg"][i], shared[i], atol=1e-4)
        assert torch.equal(out["normals"][i], shared[i])  # a task without TS-LoRA gets the shared features
    with torch.no_grad():
        alone = swin_stage_features(model, images, tasks=("sal",))["sal"]
    assert all(torch.allclose(f, g, atol=1e-5) for f, g in zip(alone, out["sal"]))  # streams are independent


def test_mtlora_stream_block_follows_section_7_4() -> None:
    """The last Swin block's task stream, recomputed layer by layer with ``forward_tasks`` (§7.3-7.4)."""
    model, _ = _mtlora(("semseg", "sal"))
    _randomise(model, "mtlora_")
    block = model.layers[3].blocks[-1]  # one 2×2 window, no shift: window partition is a reshape
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, rows: int | None = None):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            seen.setdefault(name, args[0][:rows].clone())
        return hook

    hook = block.register_forward_pre_hook(keep("x", 2))  # the shared rows of the stacked input
    with torch.no_grad():
        out = swin_stage_features(model, torch.randn(2, 3, 64, 64), tasks=("semseg", "sal"))
        hook.remove()
        x = seen["x"]
        b, h, w, c = x.shape
        grab = block.attn.proj.register_forward_pre_hook(keep("z"))
        shared = block(x)
        grab.remove()
        y, proj = block.attn.proj.forward_tasks(seen["z"])
        a_sh = x + y.view(b, h, w, c)
        u = block.norm2(a_sh).reshape(b, -1, c)
        g = block.mlp.act(block.mlp.fc1(u))
        for task in ("semseg", "sal"):
            a_t = x + proj[task].view(b, h, w, c)
            h_t = block.mlp.fc1.forward_tasks(u, {task: block.norm2(a_t).reshape(b, -1, c)})[1][task]
            m_t = block.mlp.fc2.forward_tasks(g, {task: block.mlp.act(h_t)})[1][task]
            f_t = a_t + m_t.view(b, h, w, c)
            assert torch.allclose(out[task][3], f_t.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4), task
    assert not torch.allclose(shared, f_t, atol=1e-4)


def test_without_mtlora_tasks_share_features() -> None:
    from mtbench.methods.lora import LoRA, LoRAConfig

    model = LoRA(LoRAConfig(r=2), ("semseg", "sal")).apply(_micro())
    _randomise(model, "lora_")
    with torch.no_grad():
        out = swin_stage_features(model, torch.randn(1, 3, 64, 64), tasks=("semseg", "sal"))
    assert all(torch.equal(f, g) for f, g in zip(out["semseg"], out["sal"]))


@pytest.mark.parametrize(("rank", "expected"), [(16, 4_953_146), (32, 6_083_642), (64, 8_344_634)])
def test_paper_trainable_parameter_counts(rank: int, expected: int) -> None:
    from mtbench.config import resolve
    from mtbench.runner import build_module

    exp = resolve("mtlora", "pascal", "paper", sets=["task.pretrained=false", f"method.r={rank}", "method.task_r=4"])
    module = build_module(exp)
    trainable = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in module.model.heads.parameters()) == 1_946_624
    assert trainable == expected
    extras = [p.numel() for n, p in module.model.backbone.named_parameters()
              if p.requires_grad and "mtlora_" not in n]
    assert sum(extras) == 1_599_546


def test_peft_extras_and_mtlora_plus_reductions() -> None:
    from mtbench.config import resolve
    from mtbench.runner import build_module

    model = build_module(resolve("mtlora", "pascal", "smoke", sets=["method.plus=true"])).model.backbone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"patch_embed.proj.weight", "patch_embed.norm.bias", "layers.1.downsample.norm.weight",
            "layers.0.blocks.0.norm2.weight", "layers.3.blocks.0.attn.relative_position_bias_table"} <= trainable
    assert "layers.1.downsample.reduction.base.weight" not in trainable  # MTLoRA+ adapts the reduction instead
    assert "layers.1.downsample.reduction.mtlora_shared_A" in trainable
    assert not any(n.endswith(("qkv.base.weight", "qkv.base.bias", "fc1.base.bias")) for n in trainable)
    lora = build_module(resolve("lora", "pascal", "smoke")).model.backbone
    assert lora.get_submodule("layers.2.downsample.reduction").weight.requires_grad


# Task wiring, prefetch, CLI -----------------------------------------------------------------------------------------


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="task.subtasks"):
        PascalConfig(subtasks=("depth",))
    with pytest.raises(ConfigError, match="task.image_size"):
        PascalConfig(image_size=100)
    with pytest.raises(ConfigError, match="pascal backbone"):
        Pascal(PascalConfig(backbone="tiny_bert")).backbone()


def test_local_root_and_offline_prefetch(release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTBENCH_DATA", raising=False)
    assert Pascal(PascalConfig(data_root=str(release.parent))).data_root() == release
    with pytest.raises(DataError, match="mtbench prefetch --task pascal"):
        Pascal(PascalConfig()).data_root()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline.*PASCAL_MT.tgz.*extract it into"):
        Pascal(PascalConfig()).prefetch(tmp_path / "data")
    from mtbench.cli import main

    assert main(["prefetch", "--task", "pascal", "--data-root", str(tmp_path / "data")]) == 2
    assert not (tmp_path / "data").exists()


def test_prefetch_downloads_extracts_and_verifies(release: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    archive = tmp_path / "PASCAL_MT.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(release, arcname="PASCAL_MT")
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="split sizes"):
        prefetch_release(dest, archive.as_uri())  # the release's 4,998 / 5,105 images are expected
    summary = prefetch_release(dest, archive.as_uri(), expected={"train": 3, "val": 1})
    assert "3 train, 1 val" in summary and (dest / "PASCAL_MT" / "JPEGImages" / "a.jpg").is_file()
    assert verify_release(dest / "PASCAL_MT", {"train": 3, "val": 1}) == "3 train, 1 val"
    assert sorted(p.name for p in dest.iterdir()) == ["PASCAL_MT"]
    archive.write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable"):
        prefetch_release(tmp_path / "other", archive.as_uri(), expected={"train": 3, "val": 1})


def test_smoke_batches_carry_every_subtask() -> None:
    from mtbench.config import resolve

    exp = resolve("full_ft", "pascal", "smoke")
    task = Pascal(exp.task)
    dm = task.datamodule(exp.train, seed=0)
    batch = next(iter(dm.train_dataloader()))
    b = batch["image"].shape[0]
    assert batch["task_ids"].tolist() == list(range(4)) * b and task.batch_size(batch) == (b, 0)
    assert {"semseg", "human_parts", "sal", "normals"} <= set(batch)
    assert batch["image"].dtype == batch["semseg"].dtype == torch.uint8
    val = next(iter(dm.val_dataloader()[3]))
    assert set(val) == {"image", "normals", "task_ids", "index", "present"} and set(val["task_ids"].tolist()) == {3}
    assert val["present"] == [3] and batch["present"] == [0, 1, 2, 3]
    assert task.loss_weights() == {"semseg": 4.0, "human_parts": 8.0, "sal": 20.0, "normals": 40.0}  # T·w_t
    assert dataclasses.asdict(exp.method)["target_modules"] == ("qkv", "proj", "fc1", "fc2")


def test_cli_mtlora_smoke_run_records_delta_m(tmp_path: Path) -> None:
    from mtbench.cli import main
    from mtbench.leaderboard import load_runs

    uri = f"sqlite:///{tmp_path}/m.db"
    assert main(["run", "--method", "mtlora", "--task", "pascal", "--profile", "smoke", "--tracking-uri", uri,
                 "--set", "trainer.max_steps=3", "--no-progress"]) == 0
    run = load_runs(uri).iloc[0]
    for key in ("val/semseg/miou", "val/human_parts/miou", "val/sal/miou", "val/sal/maxf", "val/normals/mean",
                "val/normals/median", "val/delta_m", "val/normals/delta"):
        assert math.isfinite(run[f"metrics.{key}"]), key
    specs = json.loads(run["tags.mtbench.metric_specs"])
    assert specs["val/delta_m"]["higher_is_better"] and not specs["val/normals/mean"]["higher_is_better"]
    assert specs["val/sal/miou"]["version"] == "astmt-15thr-b1"
    # One per-image row per subtask, named by the image's PASCAL id, with a finite loss and per-image score.
    from mtbench.predictions import read_predictions

    frame = read_predictions(next(tmp_path.rglob("predictions.parquet")))
    assert set(frame["subtask"]) == {"semseg", "human_parts", "sal", "normals"} and set(frame["aggregate"]) == {"none"}
    for sub, rows in frame.groupby("subtask"):
        assert rows["example_id"].is_unique and rows["example_id"].str.startswith("val_").all(), sub
        assert rows["score"].notna().any() and rows["loss"].notna().any(), sub
    normals = frame[frame["subtask"] == "normals"]["score"].dropna()
    assert ((normals >= 0) & (normals <= 180)).all()  # degrees


def test_paper_profile_compares_methods_at_one_budget() -> None:
    """methods.md §10: LoRA, LoRA+, LoRASC and MultiLoRA at MTLoRA's shared rank 64, scale 4, dropout 0.05, so their
    adapters have as many parameters; MTLoRA keeps its own defaults."""
    from mtbench.backbones import build
    from mtbench.config import resolve
    from mtbench.interfaces import adapter_roles

    swin = build("swin_t", img_size=224, pretrained=False)  # Swin-T's layer widths; r = 64 fits no smaller one
    counts = {}
    for name in ("lora", "lora_plus", "lorasc", "multilora", "mtlora"):
        exp = resolve(name, "pascal", "paper")
        cfg = exp.method
        scale = cfg.scale if name == "mtlora" else cfg.alpha / cfg.r
        assert (cfg.r, scale, cfg.dropout) == (64, 4.0, 0.05), name
        model = exp.method_cls(cfg, exp.task_cls.default_subtasks).apply(copy.deepcopy(swin))
        params = dict(model.named_parameters())
        # Low-rank factors (MultiLoRA's per-channel branch scales are on top of them, as in its paper).
        counts[name] = sum(params[n].numel() for n, role in adapter_roles(model).items() if role.kind in ("A", "B"))
    assert resolve("lorasc", "pascal", "paper").method.stage_steps == 30 * 156  # 10 stages in 300 epochs
    assert counts["lora"] == counts["lora_plus"] == counts["lorasc"] == counts["multilora"] < counts["mtlora"]

