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

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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


def transform(image: np.ndarray, labels: dict[str, Any], size: int, augment: bool) -> dict[str, Tensor]:
    """Training: draw a horizontal flip (p 0.5), a rotation U(−20°, 20°) and a scale U(0.75, 1.25) about the centre
    from torch's global generator, then :func:`warp`; evaluation: :func:`warp` with no augmentation (resize only)."""
    if not augment:
        return warp(image, labels, size)
    flip = bool(torch.rand(()) < 0.5)
    angle, scale = float(torch.empty(()).uniform_(-20, 20)), float(torch.empty(()).uniform_(0.75, 1.25))
    return warp(image, labels, size, flip, angle, scale)


def warp(image: np.ndarray, labels: dict[str, Any], size: int, flip: bool = False, angle: float = 0.0,
         scale: float = 1.0) -> dict[str, Tensor]:
    """Flip, rotate and scale about the centre, resize to ``size × size`` ignoring the aspect ratio, and normalise.

    The warp and the resize are composed into one resampling from the original image (bicubic for the image and
    normals, nearest for labels and the normals mask). Pixels the warp brings in from outside the image are ignored
    (255 / invalid). Normals follow the geometry: the flip negates x and the rotation turns the in-plane (x, y)
    components, taken in image axes (x right, y down); they are then re-normalised.

    Args:
        image: ``(H, W, 3)`` uint8.
        labels: subtask -> ``(H, W)`` uint8 label, and for ``normals`` the pair (normals, mask).
        size: output side.
        flip: mirror left-right first.
        angle: rotation in degrees, counter-clockwise as displayed.
        scale: zoom factor (> 1 enlarges).
    """
    h, w = image.shape[:2]
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    # Output pixel centres -> the warped image (source size) -> inverse rotation/scale about the centre -> unflip.
    ys = (torch.arange(size, dtype=torch.float64) + 0.5) * (h / size) - h / 2
    xs = (torch.arange(size, dtype=torch.float64) + 0.5) * (w / size) - w / 2
    dy, dx = torch.meshgrid(ys, xs, indexing="ij")
    sx = (cos * dx - sin * dy) / scale + w / 2
    sy = (sin * dx + cos * dy) / scale + h / 2
    sx = w - sx if flip else sx
    grid = torch.stack([2 * sx / w - 1, 2 * sy / h - 1], -1).float()[None]

    def sample(array: np.ndarray, mode: str) -> Tensor:
        t = torch.from_numpy(np.array(array, dtype=np.float32))
        t = t[None, None] if t.ndim == 2 else t.permute(2, 0, 1)[None]
        return F.grid_sample(t, grid, mode=mode, padding_mode="zeros", align_corners=False)[0]

    img = sample(image, "bicubic").clamp_(0, 255) / 255.0
    out = {"image": (img - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]}
    for name, label in labels.items():
        if name == "normals":
            normals, mask = label
            vec = sample(normals, "bicubic")
            valid = sample(mask.astype(np.float32), "nearest")[0] > 0.5
            nx = -vec[0] if flip else vec[0]
            # The forward warp maps a displacement (x, y) to (cos·x + sin·y, −sin·x + cos·y) (y down).
            vec = torch.stack([cos * nx + sin * vec[1], -sin * nx + cos * vec[1], vec[2]])
            norm = vec.norm(dim=0)
            valid &= norm > 1e-6
            out["normals"] = torch.where(valid, vec / norm.clamp_min(1e-6), torch.zeros(()))
            out["normals_valid"] = valid
        else:
            # Shifted by one so that zero padding (outside the image) becomes 255 = ignore.
            shifted = sample(label.astype(np.float32) + 1, "nearest")[0].round().long() - 1
            out[name] = torch.where(shifted < 0, IGNORE, shifted)
    return out


class PascalMT(Dataset):
    """One split of a PASCAL_MT folder: ``{"image", <subtask>: target, ...}`` per image, transformed.

    Targets: ``semseg`` / ``human_parts`` / ``sal`` ``(S, S)`` long with 255 ignore; ``normals`` ``(3, S, S)`` unit
    vectors with ``normals_valid`` ``(S, S)`` bool.
    """

    readers = {"semseg": read_semseg, "human_parts": read_human_parts, "sal": read_sal, "normals": read_normals}

    def __init__(self, root: Path, split: str, subtasks: Sequence[str], size: int, augment: bool,
                 ids: Sequence[str] | None = None) -> None:
        self.root, self.subtasks, self.size, self.augment = root, tuple(subtasks), size, augment
        self.ids = list(ids) if ids is not None else split_ids(root, split)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        pid = self.ids[i]
        image = read_image(self.root, pid)
        labels = {t: self.readers[t](self.root, pid, image.shape[:2]) for t in self.subtasks}
        return transform(image, labels, self.size, self.augment)


# Scene generator (smoke and cpu profiles) ---------------------------------------------------------------------------

_OBJECTS = ((8, 65, (200, 150, 60)), (12, 113, (120, 80, 40)), (7, 59, (40, 60, 200)), (9, 72, (150, 40, 150)),
            (20, 427, (30, 30, 30)), (3, 25, (220, 220, 40)), (4, 31, (240, 240, 240)))
"""(VOC class, Context id, colour) of generated objects; bird and boat have no normals (no NYUv2 class)."""
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


def _scene(rng: np.random.Generator, h: int, w: int) -> dict[str, Any]:
    """One scene: image and every label, drawn from the same objects so that the tasks correlate."""
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
    for _ in range(rng.integers(1, 3)):
        voc, ctx, colour = _OBJECTS[rng.integers(len(_OBJECTS))]
        mask, nrm = _ellipse(h, w, rng.uniform(0.3, 0.8) * h, rng.uniform(0.15, 0.85) * w, rng.uniform(0.1, 0.25) * h,
                             rng.uniform(0.1, 0.25) * w)
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
    """Write one scene in the release layout and encodings (``voc``: semseg under VOC12, else pascal-context)."""
    import scipy.io

    def png(sub: str, array: np.ndarray) -> None:
        (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / sub / f"{pid}.png")

    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene["image"]).save(root / "JPEGImages" / f"{pid}.jpg", quality=92)
    png("semseg/VOC12" if voc else "semseg/pascal-context", scene["semseg"])
    png("sal_distill", scene["sal"])
    png("normals_distill", np.round((scene["normals"] + 1) * 127.5).clip(0, 255).astype(np.uint8))
    (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / "pascal-context" / "trainval" / f"{pid}.mat", {"LabelMap": scene["context"]})
    if with_parts:
        objects = [{**o, "class": np.array([o["class"]]), "class_ind": np.array([[o["class_ind"]]]),
                    "mask": o["mask"].astype(np.uint8),
                    "parts": _struct([{"part_name": np.array([p["part_name"]]), "mask": p["mask"].astype(np.uint8)}
                                      for p in o["parts"]], ("part_name", "mask"))} for o in scene["objects"]]
        (root / "human_parts").mkdir(parents=True, exist_ok=True)
        anno = {"imname": np.array([pid]), "objects": _struct(objects, ("class", "class_ind", "mask", "parts"))}
        scipy.io.savemat(root / "human_parts" / f"{pid}.mat", {"anno": anno})


def cache_dir() -> Path:
    """mtbench's cache folder: ``$MTBENCH_CACHE``, else ``~/.cache/mtbench``."""
    return Path(os.environ.get("MTBENCH_CACHE") or Path.home() / ".cache" / "mtbench").expanduser()


def synthetic_release(n_train: int, n_val: int, seed: int = 0, size: tuple[int, int] = (96, 72)) -> Path:
    """A generated PASCAL_MT folder of ``n_train`` + ``n_val`` scenes of ``size`` (W, H) in the cache (made once).

    Scenes vary in size around ``size``; most images carry a person with parts, a few have no ``human_parts`` file,
    semseg alternates between ``VOC12`` and ``pascal-context``.
    """
    root = cache_dir() / "pascal_synthetic" / f"v1-{n_train}-{n_val}-{seed}-{size[0]}x{size[1]}" / "PASCAL_MT"
    if (root / ".complete").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".partial-"))
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:05d}" for i in range(n)]
        for i, pid in enumerate(ids):
            w, h = (int(s * rng.uniform(0.8, 1.2)) for s in size)
            write_scene(tmp, pid, _scene(rng, h, w), voc=i % 2 == 0, with_parts=i % 5 != 4)
        (tmp / "ImageSets" / "Context").mkdir(parents=True, exist_ok=True)
        (tmp / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return root
