"""PASCAL-Context multi-task data (``PASCAL_MT`` release): reading, transforms, a scene generator (for pascal.py).

Release layout (relative to the ``PASCAL_MT`` folder) and encodings, read exactly as released:

- ``ImageSets/Context/{train,val}.txt``: one image id per line; ``JPEGImages/<id>.jpg``: the RGB image;
- ``semseg/VOC12/<id>.png`` where it exists, else ``semseg/pascal-context/<id>.png``: 8-bit class indices 0-20
  (background + the 20 VOC classes), 255 = ignore;
- ``human_parts/<id>.mat``: the PASCAL-Part MATLAB struct ``anno`` whose ``objects`` carry ``class_ind`` (person =
  15), ``mask`` and ``parts`` (``part_name``, ``mask``); person parts are grouped into 6 classes + background
  (:data:`PART_GROUPS`); an image with no person part (or no file) is all 255;
- ``sal_distill/<id>.png``: grey saliency, ``v / 255 > 0.5`` is salient;
- ``normals_distill/<id>.png``: RGB normals, ``2·v / 255 − 1``, kept only where the PASCAL-Context class of
  ``pascal-context/trainval/<id>.mat`` (``LabelMap``) has an NYUv2 counterpart (:data:`NORMALS_CLASSES`).

Nothing is ever written into the data folder. A missing or corrupt file raises :class:`DataError` naming it.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mtbench.errors import DataError

from ._files import is_file, read_text


IGNORE = 255
PERSON = 15
SPLIT_SIZES = {"train": 4998, "val": 5105}
"""Images per split in the released ``ImageSets/Context`` files."""
PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(("head", "hair", "lear", "rear", "lebrow", "rebrow", "leye", "reye", "mouth", "nose"), 1),
    **dict.fromkeys(("torso", "neck"), 2), **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4), **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
"""PASCAL-Part person part name -> group: 1 head, 2 torso, 3 upper arm, 4 lower arm, 5 upper leg, 6 lower leg."""
NORMALS_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56, 59,
    61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124, 135,
    141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213, 215,
    216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269, 272,
    273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329,
    330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405,
    407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))
"""The 170 PASCAL-Context label ids with surface normals: classes named in both the Context (459) and the NYUv2 (894)
class tables except ``unknown``, plus ``tvmonitor`` (NYUv2 says ``television``)."""
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# Reading ------------------------------------------------------------------------------------------------------------


def split_ids(root: Path, split: str) -> list[str]:
    """Image ids of ``ImageSets/Context/<split>.txt``; every listed JPEG must exist."""
    path = root / "ImageSets" / "Context" / f"{split}.txt"
    text = read_text(path, "the split file of the PASCAL_MT release (one image id a line)")
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    missing = [i for i in ids if not is_file(root / "JPEGImages" / f"{i}.jpg")]
    if missing or not ids:
        raise DataError(f"{path}: {len(missing)} of {len(ids)} listed images missing from {root / 'JPEGImages'} "
                        f"(first: {missing[0] if missing else 'the split is empty'})")
    return ids


def _image(path: Path, what: str, convert: str | None = None, modes: Sequence[str] = ()) -> np.ndarray:
    """Pixels of an image file, converted to mode ``convert`` or required to be one of ``modes``."""
    if not is_file(path):
        raise DataError(f"{path}: missing ({what})")
    try:
        with Image.open(path) as img:
            img.load()
            if convert and img.mode != convert:
                return np.asarray(img.convert(convert))
            if modes and img.mode not in modes:
                raise DataError(f"{path}: image mode {img.mode} is not one of {', '.join(modes)} ({what})")
            return np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: corrupt or unreadable image ({type(exc).__name__}; {what})") from exc


def _mat(path: Path, what: str) -> dict[str, Any]:
    import scipy.io

    if not is_file(path):
        raise DataError(f"{path}: missing ({what})")
    try:
        return scipy.io.loadmat(str(path))
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError or MatReadError on bad files
        raise DataError(f"{path}: corrupt or unreadable .mat file ({type(exc).__name__}; {what})") from exc


def _check_shape(path: Path, array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if array.shape[:2] != shape:
        raise DataError(f"{path}: label size {array.shape[:2]} differs from its image's {shape}")
    return array


def read_image(root: Path, pid: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB."""
    return _image(root / "JPEGImages" / f"{pid}.jpg", "RGB JPEG image", convert="RGB")


def read_semseg(root: Path, pid: str, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` uint8 class ids 0-20, 255 ignore."""
    path = root / "semseg" / "VOC12" / f"{pid}.png"
    if not is_file(path):
        path = root / "semseg" / "pascal-context" / f"{pid}.png"
    label = _check_shape(path, _image(path, "8-bit class-index PNG", modes=("L", "P")), shape)
    bad = (label > 20) & (label != IGNORE)
    if bad.any():
        raise DataError(f"{path}: class index {int(label[bad][0])} outside 0-20 (255 = ignore)")
    return label


def read_human_parts(root: Path, pid: str, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` uint8: 0 background, 1-6 part groups; all 255 without person parts (or without a file)."""
    path = root / "human_parts" / f"{pid}.mat"
    if not is_file(path):
        return np.full(shape, IGNORE, np.uint8)
    mat = _mat(path, "PASCAL-Part annotation")
    target = None
    try:
        for obj in mat["anno"][0, 0]["objects"].ravel():
            parts = obj["parts"]
            if int(np.asarray(obj["class_ind"]).ravel()[0]) != PERSON or parts.size == 0:
                continue
            target = np.zeros(shape, np.uint8) if target is None else target
            for part in parts.ravel():
                name = str(np.asarray(part["part_name"]).ravel()[0])
                if name not in PART_GROUPS:
                    raise DataError(f"{path}: unknown person part '{name}'")
                target[_check_shape(path, np.asarray(part["mask"]), shape).astype(bool)] = PART_GROUPS[name]
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a PASCAL-Part struct (anno.objects with class_ind, parts.part_name, "
                        f"parts.mask): {type(exc).__name__}: {exc}") from exc
    return target if target is not None else np.full(shape, IGNORE, np.uint8)


def read_sal(root: Path, pid: str, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` uint8, 1 where ``v / 255 > 0.5``."""
    path = root / "sal_distill" / f"{pid}.png"
    grey = _check_shape(path, _image(path, "grey saliency PNG", convert="L"), shape)
    return (grey.astype(np.float32) / 255.0 > 0.5).astype(np.uint8)


def read_normals(root: Path, pid: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(H, W, 3)`` float32 normals ``2·v/255 − 1`` and the ``(H, W)`` bool mask of pixels that keep them."""
    path = root / "normals_distill" / f"{pid}.png"
    encoded = _check_shape(path, _image(path, "RGB normals PNG", convert="RGB"), shape)
    normals = encoded.astype(np.float32) * (2 / 255) - 1
    lpath = root / "pascal-context" / "trainval" / f"{pid}.mat"
    try:
        labels = np.asarray(_mat(lpath, "PASCAL-Context LabelMap")["LabelMap"])
    except KeyError as exc:
        raise DataError(f"{lpath}: no 'LabelMap' variable (PASCAL-Context label file expected)") from exc
    valid = np.isin(_check_shape(lpath, labels, shape), list(NORMALS_CLASSES))
    normals[~valid] = 0.0
    return normals, valid


# Transforms (methods.md §7.13) -------------------------------------------------------------------------------------

@functools.cache
def _cv2() -> ModuleType:
    """OpenCV, imported on first use (listing commands never pay for it) and single-threaded: the loader parallelises
    over samples with DataLoader workers, and OpenCV's own thread pool in each worker would oversubscribe the cores."""
    import cv2

    cv2.setNumThreads(1)
    return cv2

Border = Literal["background", "ignore"]
"""Label of pixels an augmentation brings in from outside the image: ``background`` (0: background, not salient, no
person part; the reference's ``cv2.warpAffine`` constant border) or ``ignore`` (255, left out of losses)."""


def transform(image: np.ndarray, labels: dict[str, Any], size: int, augment: bool,
              border: Border = "background") -> dict[str, Tensor]:
    """Training: draw a horizontal flip (p 0.5), a rotation U(−20°, 20°) and a scale U(0.75, 1.25) about the centre
    from torch's global generator, then :func:`warp`; evaluation: :func:`warp` with no augmentation (resize only)."""
    if not augment:
        return warp(image, labels, size, border=border)
    flip = bool(torch.rand(()) < 0.5)
    angle, scale = float(torch.empty(()).uniform_(-20, 20)), float(torch.empty(()).uniform_(0.75, 1.25))
    return warp(image, labels, size, flip, angle, scale, border)


def warp(image: np.ndarray, labels: dict[str, Any], size: int, flip: bool = False, angle: float = 0.0,
         scale: float = 1.0, border: Border = "background") -> dict[str, Tensor]:
    """Flip, rotate and scale about the centre, and resize to ``size × size`` ignoring the aspect ratio.

    The steps and interpolations of the MTLoRA / ASTMT reference (``data/custom_transforms.py``:
    ``RandomHorizontalFlip``, ``ScaleNRotate``, ``FixedResize``, ``AddIgnoreRegions``), each an OpenCV call on the
    source-size array:

    1. a horizontal flip (normals: x negated);
    2. ``cv2.warpAffine`` with ``cv2.getRotationMatrix2D((W/2, H/2), angle, scale)`` at the source size, constant
       border (skipped without augmentation; the flip is folded into it); normals are turned in-plane by ``angle``:
       ``(x, y) -> (cos·x + sin·y, −sin·x + cos·y)`` in image axes (x right, y down);
    3. ``cv2.resize`` to ``size × size``: bicubic for the image (edge pixels replicated) and normals, nearest
       neighbour (``INTER_NEAREST``) for labels, which therefore are resampled twice when augmented;
    4. normals are divided by their length; a normal is valid where its vector is non-zero (the zero vectors that
       mark pixels without normals stay exactly zero under both interpolations; the cubic kernel lets valid values
       reach up to two source pixels into such regions, where its negative lobe can even turn them around, as in
       the reference). This step runs on the device, after collation (:func:`normals_target`);
    5. human parts that end up all background are all ignored (the reference's mark of an image without parts);
       an image decoded without parts (all 255) stays all 255.

    The border fills with 0 (image black; labels background / not salient; normals invalid), or with 255 for the
    labels when ``border="ignore"``. The image is resampled in uint8 (rounded and saturated; the reference casts its
    float64 result to uint8, which truncates and wraps the cubic overshoot) and normalised later, on the device
    (:func:`normalise`).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        labels: subtask -> ``(H, W)`` uint8 label, and for ``normals`` the pair (normals ``(H, W, 3)`` float32 with
            zeros where invalid, mask); the decoded mask is not needed (it equals "non-zero").
        size: output side.
        flip: mirror left-right first.
        angle: rotation in degrees, counter-clockwise as displayed.
        scale: zoom factor (> 1 enlarges).
        border: label of pixels brought in from outside the image (:data:`Border`).

    Returns:
        ``image`` ``(3, S, S)`` uint8 RGB; ``semseg`` / ``human_parts`` / ``sal`` ``(S, S)`` uint8 (255 ignore);
        ``normals`` ``(3, S, S)`` float32 resampled vectors, not yet of unit length (0 where invalid: step 4 is
        :func:`normals_target`). Channel-first views of channel-last arrays (not contiguous); labels stay uint8 (8×
        less to copy and move to the device; the losses cast them).
    """
    cv2 = _cv2()
    h, w = image.shape[:2]
    matrix = None
    if flip or angle or scale != 1.0:
        # One cv2.warpAffine per array does the flip and the reference's warp: the mirror x -> W − 1 − x is folded
        # into the matrix (flip first, then rotate/scale about (W/2, H/2)), which moves no pixel differently.
        matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        if flip:
            matrix[:, 2] += matrix[:, 0] * (w - 1)
            matrix[:, 0] *= -1

    def geometry(array: np.ndarray, interpolation: int, fill: Any) -> np.ndarray:
        if matrix is not None:
            array = cv2.warpAffine(array, matrix, (w, h), flags=interpolation, borderMode=cv2.BORDER_CONSTANT,
                                   borderValue=fill)
        return cv2.resize(array, (size, size), interpolation=interpolation)

    # Image: resampled in uint8 and normalised on the device (:func:`normalise`). Every output below is an (S, S, C)
    # array returned as a channel-first view: the batch's collate copies it once anyway.
    out = {"image": torch.from_numpy(geometry(np.ascontiguousarray(image), cv2.INTER_CUBIC, 0)).permute(2, 0, 1)}
    # Class labels: stacked as channels of one uint8 array, so that one warp and one resize serve them all.
    names = [n for n in ("semseg", "human_parts", "sal") if n in labels]
    if names:
        stack = np.dstack([labels[n] for n in names]).astype(np.uint8, copy=False)
        fill = 0 if border == "background" else IGNORE
        warped = geometry(stack, cv2.INTER_NEAREST, (fill,) * 4).reshape(size, size, len(names))
        for k, name in enumerate(names):
            plane = warped[..., k]
            if name == "human_parts" and (bool((labels[name] == IGNORE).all()) or not plane.any()):
                plane = np.full((size, size), IGNORE, np.uint8)
            out[name] = torch.from_numpy(plane)
    if "normals" in labels:
        out["normals"] = _warp_normals(labels["normals"][0], flip, angle, geometry)
    return out


def normalise(images: Tensor) -> Tensor:
    """uint8 RGB images ``(..., 3, H, W)`` -> float32 ``(v / 255 − mean) / std`` with ImageNet's mean and std, on the
    images' device (the loader hands over uint8: a quarter of the bytes to copy between processes and to the
    device, and no float pass on the loader's CPUs).

    Raises:
        TypeError: the images are not uint8.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"pascal images are uint8 RGB as the loader yields them, got {images.dtype}")
    mean, inv_std = _normalisation(images.device)
    return (images.float() - mean) * inv_std


@functools.cache
def _normalisation(device: torch.device) -> tuple[Tensor, Tensor]:
    """``255·mean`` and ``1 / (255·std)``, ``(3, 1, 1)`` each, made once per device: building them from Python
    numbers in every step would copy host to device, which makes the host wait for the GPU."""
    mean = torch.tensor(MEAN, device=device)[:, None, None] * 255
    return mean, 1 / (torch.tensor(STD, device=device)[:, None, None] * 255)


def _warp_normals(normals: np.ndarray, flip: bool, angle: float, geometry: Any) -> Tensor:
    """Steps 1-3 of :func:`warp` for normals: the resampled ``(3, S, S)`` vectors (step 4: :func:`normals_target`).

    The flip's sign and the in-plane turn are linear in the vector, so they commute with the (linear) resampling and
    are applied after it, as one 3×3 matrix per pixel (``cv2.transform``).
    """
    cv2 = _cv2()
    vec = geometry(np.ascontiguousarray(normals, dtype=np.float32), cv2.INTER_CUBIC, 0)
    if flip or angle:
        cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        sign = -1.0 if flip else 1.0  # (x, y) -> (cos·x + sin·y, −sin·x + cos·y) of the flipped vector (−x, y)
        vec = cv2.transform(vec, np.array([[sign * cos, sin, 0], [-sign * sin, cos, 0], [0, 0, 1]], np.float32))
    return torch.from_numpy(vec).permute(2, 0, 1)


def normals_target(normals: Tensor) -> tuple[Tensor, Tensor]:
    """Step 4 of :func:`warp`, run on the batch's device: resampled normals ``(B, 3, H, W)`` -> unit vectors
    ``(B, 3, H, W)`` (0 where invalid) and the validity ``(B, H, W)`` bool, true where the vector is non-zero.

    Rotations and flips keep lengths, so normalising after them (and after collation) equals the reference's
    normalisation at the end of its ``FixedResize``; a zero vector stays exactly zero through both resamplings.
    """
    norm = torch.linalg.vector_norm(normals, dim=1, keepdim=True)
    return normals / norm.clamp_min(torch.finfo(normals.dtype).tiny), norm[:, 0] > 0


class PascalMT(Dataset):
    """One split of a PASCAL_MT folder: ``{"image", <subtask>: target, ...}`` per image, transformed.

    Targets: ``semseg`` / ``human_parts`` / ``sal`` ``(S, S)`` uint8 with 255 ignore; ``normals`` ``(3, S, S)``
    resampled vectors, zero where invalid (:func:`normals_target` makes unit vectors and the validity mask on the
    device). ``border``: see :data:`Border`.
    """

    readers = {"semseg": read_semseg, "human_parts": read_human_parts, "sal": read_sal, "normals": read_normals}

    def __init__(self, root: Path, split: str, subtasks: Sequence[str], size: int, augment: bool,
                 ids: Sequence[str] | None = None, border: Border = "background") -> None:
        self.root, self.subtasks, self.size, self.augment, self.border = root, tuple(subtasks), size, augment, border
        self.ids = list(ids) if ids is not None else split_ids(root, split)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        pid = self.ids[i]
        image = read_image(self.root, pid)
        labels = {t: self.readers[t](self.root, pid, image.shape[:2]) for t in self.subtasks}
        # ``index`` (position in ``ids``) names the image in per-example predictions.
        return {**transform(image, labels, self.size, self.augment, self.border),
                "index": torch.tensor(i, dtype=torch.long)}


# Scene generator (smoke and cpu profiles) ---------------------------------------------------------------------------

_OBJECTS = ((1, 2, (170, 170, 190)), (2, 23, (20, 120, 20)), (3, 25, (220, 220, 40)), (4, 31, (240, 240, 240)),
            (5, 34, (20, 160, 140)), (6, 45, (250, 160, 0)), (7, 59, (40, 60, 200)), (8, 65, (200, 150, 60)),
            (9, 72, (150, 40, 150)), (10, 98, (90, 60, 30)), (11, 397, (160, 110, 60)), (12, 113, (120, 80, 40)),
            (13, 207, (70, 30, 10)), (14, 258, (180, 20, 90)), (16, 308, (30, 180, 60)), (17, 347, (235, 235, 215)),
            (18, 368, (110, 20, 40)), (19, 416, (60, 60, 90)), (20, 427, (30, 30, 30)))
"""(VOC class, PASCAL-Context id, colour) of the 19 object classes besides person; those whose Context class has no
NYUv2 counterpart (e.g. aeroplane, bird, boat) carry no normals, as in the release."""
OBJECTS_PER_SCENE = 3
"""Objects per scene: scene ``i`` draws classes ``3i .. 3i + 2`` (mod 19), so any 7 consecutive scenes hold every
class the semseg mIoU averages over (with background and person)."""
_BODY = (("head", (0.00, 0.00, 0.13, 0.13), (230, 180, 150)), ("hair", (-0.09, 0.00, 0.06, 0.11), (60, 40, 20)),
         ("neck", (0.12, 0.00, 0.04, 0.04), (220, 170, 140)), ("torso", (0.28, 0.00, 0.16, 0.11), (200, 40, 40)),
         ("luarm", (0.24, -0.16, 0.10, 0.04), (190, 50, 50)), ("ruarm", (0.24, 0.16, 0.10, 0.04), (190, 50, 50)),
         ("llarm", (0.42, -0.18, 0.09, 0.035), (225, 175, 145)), ("rlarm", (0.42, 0.18, 0.09, 0.035), (225, 175, 145)),
         ("lhand", (0.52, -0.18, 0.03, 0.03), (235, 185, 155)), ("rhand", (0.52, 0.18, 0.03, 0.03), (235, 185, 155)),
         ("luleg", (0.55, -0.06, 0.12, 0.05), (40, 40, 120)), ("ruleg", (0.55, 0.06, 0.12, 0.05), (40, 40, 120)),
         ("llleg", (0.76, -0.06, 0.11, 0.045), (50, 50, 140)), ("rlleg", (0.76, 0.06, 0.11, 0.045), (50, 50, 140)),
         ("lfoot", (0.88, -0.08, 0.03, 0.05), (20, 20, 20)), ("rfoot", (0.88, 0.08, 0.03, 0.05), (20, 20, 20)))
"""Person parts: (name, (centre row, centre column offset, half height, half width) in person heights, colour)."""


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask of an ellipse and the outward unit normals of the ellipsoid cap over it ``(H, W, 3)``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx - cx) / max(rx, 0.5), (yy - cy) / max(ry, 0.5)
    inside = u**2 + v**2 <= 1
    normal = np.stack([u, v, np.sqrt(np.clip(1 - u**2 - v**2, 0, 1)) + 0.3], -1)
    return inside, normal / np.linalg.norm(normal, axis=-1, keepdims=True)


def _scene(rng: np.random.Generator, h: int, w: int, index: int = 0) -> dict[str, Any]:
    """Scene number ``index``: image and every label, drawn from the same objects so that the tasks correlate.

    Three objects (:data:`OBJECTS_PER_SCENE`), one per third of the width, then most often a person with all six
    part groups on top; the first object and the person are salient.
    """
    horizon = int(h * rng.uniform(0.4, 0.7))
    sky = rng.random() < 0.3
    context = np.full((h, w), 360 if sky else 440, np.int32)  # sky (no normals) or wall
    context[horizon:] = 158  # floor
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 2], normals[horizon:] = 1.0, (0.0, -1.0, 0.0)  # wall faces the camera, floor points up
    image = np.zeros((h, w, 3), np.float32)
    image[:horizon], image[horizon:] = (135, 180, 230) if sky else (200, 190, 170), (110, 90, 70)
    semseg, parts, sal = np.zeros((h, w), np.uint8), np.full((h, w), IGNORE, np.uint8), np.zeros((h, w), np.uint8)
    objects = []
    for k in range(OBJECTS_PER_SCENE):
        voc, ctx, colour = _OBJECTS[(OBJECTS_PER_SCENE * index + k) % len(_OBJECTS)]
        mask, nrm = _ellipse(h, w, rng.uniform(0.35, 0.8) * h, (k + rng.uniform(0.3, 0.7)) * w / OBJECTS_PER_SCENE,
                             rng.uniform(0.1, 0.2) * h, rng.uniform(0.08, 0.15) * w)
        semseg[mask], context[mask], normals[mask], image[mask] = voc, ctx, nrm[mask], colour
        objects.append({"class": "object", "class_ind": voc, "mask": mask, "parts": []})
        sal[mask] = 255 if len(objects) == 1 else 0
    if rng.random() < 0.7:
        tall, cx, top = rng.uniform(0.5, 0.8) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.05, 0.2) * h
        person, parts = np.zeros((h, w), bool), np.zeros((h, w), np.uint8)
        person_parts = []
        for name, (py, px, ry, rx), colour in _BODY:
            mask, nrm = _ellipse(h, w, top + py * tall, cx + px * tall, ry * tall, rx * tall)
            person |= mask
            parts[mask], normals[mask], image[mask] = PART_GROUPS[name], nrm[mask], colour
            person_parts.append({"part_name": name, "mask": mask})
        semseg[person], context[person], sal[person] = PERSON, 284, 255
        objects.append({"class": "person", "class_ind": PERSON, "mask": person, "parts": person_parts})
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    normals[~np.isin(context, list(NORMALS_CLASSES))] = rng.uniform(-1, 1, 3)  # junk where the mask drops it
    return {"image": image, "semseg": semseg, "parts": parts, "sal": sal, "normals": normals, "context": context,
            "objects": objects}


def _struct(records: list[dict[str, Any]], fields: Sequence[str]) -> np.ndarray:
    """A 1×N MATLAB struct array (numpy record array of objects), empty 0×0 when there is no record."""
    if not records:
        return np.zeros((0, 0))
    out = np.empty((1, len(records)), dtype=[(f, object) for f in fields])
    for i, rec in enumerate(records):
        out[0, i] = tuple(rec[f] for f in fields)
    return out


def write_scene(root: Path, pid: str, scene: dict[str, Any], voc: bool, with_parts: bool) -> None:
    """Write one scene in the release layout and encodings (``voc``: semseg under VOC12, else pascal-context).

    Sizes as in the release: zlib-compressed MATLAB files (``scipy.io.savemat(do_compression=True)``), PNGs at
    PIL's default compression, JPEG quality 90.
    """
    import scipy.io

    def png(sub: str, array: np.ndarray) -> None:
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / sub / f"{pid}.png")

    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene["image"]).save(root / "JPEGImages" / f"{pid}.jpg", quality=90)
    png("semseg/VOC12" if voc else "semseg/pascal-context", scene["semseg"])
    png("sal_distill", scene["sal"])
    png("normals_distill", np.round((scene["normals"] + 1) * 127.5).clip(0, 255).astype(np.uint8))
    (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
    labels = {"LabelMap": scene["context"].astype(np.uint16)}
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{pid}.mat", labels, do_compression=True)
    if with_parts:
        objects = [{**o, "class": np.array([o["class"]]), "class_ind": np.array([[o["class_ind"]]]),
                    "mask": o["mask"].astype(np.uint8),
                    "parts": _struct([{"part_name": np.array([p["part_name"]]), "mask": p["mask"].astype(np.uint8)}
                                      for p in o["parts"]], ("part_name", "mask"))} for o in scene["objects"]]
        (root / "human_parts").mkdir(parents=True, exist_ok=True)
        anno = {"imname": np.array([pid]), "objects": _struct(objects, ("class", "class_ind", "mask", "parts"))}
        scipy.io.savemat(root / "human_parts" / f"{pid}.mat", {"anno": anno}, do_compression=True)


def cache_dir() -> Path:
    """mtbench's cache folder: ``$MTBENCH_CACHE``, else ``~/.cache/mtbench``."""
    return Path(os.environ.get("MTBENCH_CACHE") or Path.home() / ".cache" / "mtbench").expanduser()


def synthetic_release(n_train: int, n_val: int, seed: int = 0, size: tuple[int, int] = (96, 72)) -> Path:
    """A generated PASCAL_MT folder of ``n_train`` + ``n_val`` scenes of ``size`` (W, H) in the cache (made once).

    Scenes vary in size around ``size``; every 7 consecutive scenes hold all 21 semseg classes, most images carry a
    person with all 6 part groups, a few have no ``human_parts`` file, semseg alternates between ``VOC12`` and
    ``pascal-context``.
    """
    root = cache_dir() / "pascal_synthetic" / f"v2-{n_train}-{n_val}-{seed}-{size[0]}x{size[1]}" / "PASCAL_MT"
    if (root / ".complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".partial-"))
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:05d}" for i in range(n)]
        for i, pid in enumerate(ids):
            w, h = (int(s * rng.uniform(0.8, 1.2)) for s in size)
            write_scene(tmp, pid, _scene(rng, h, w, i), voc=i % 2 == 0, with_parts=i % 5 != 4)
        (tmp / "ImageSets" / "Context").mkdir(parents=True, exist_ok=True)
        (tmp / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root
