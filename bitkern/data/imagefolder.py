"""Image folders: root/<class>/*.png|jpg, or root/{train,test|val}/<class>/..., decoded by PIL with
a pixel ceiling checked against each header before decoding and PIL's decompression-bomb warning
turned into an error; every unreadable, truncated or oversized image is a DataError naming it."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .._checks import int_in
from . import _common
from ._common import DataError, byte_limit, check_split, fmt_bytes

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"}
# The PIL decoders an image folder may use (whatever a file's suffix): nothing that shells out
# (EPS) or parses exotic containers.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "PPM", "WEBP")

SPLIT_SEED = 0            # fixed seed of the stratified 80/20 split of a folder without split dirs
SPLIT_TEST_FRACTION = 0.2


def class_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"{root}: cannot list directory ({e.strerror or e})") from None


def _image_files(cdir: Path) -> list[Path]:
    try:
        return [f for f in sorted(cdir.iterdir())
                if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()]
    except OSError as e:
        raise DataError(f"{cdir}: cannot list directory ({e.strerror or e})") from None


def decode_image(path: Path, image_size: int, max_pixels: int | None = None) -> np.ndarray:
    """One image as float32 [3, image_size, image_size] in [0, 1]; DataError naming the file if it is
    unreadable, truncated, not one of PIL_FORMATS or has more than max_pixels pixels."""
    from PIL import Image

    limit = _common.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=PIL_FORMATS) as im:
                w, h = im.size
                if w * h > limit:
                    raise DataError(f"{path}: image header claims {w}x{h} = {w * h} pixels, more than the "
                                    f"{limit}-pixel ceiling (decompression bomb?)")
                im.load()
                rgb = im.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except DataError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise DataError(f"{path}: refused as a decompression bomb ({e})") from None
        except Exception as e:  # noqa: BLE001 - PIL's decoders raise many types on hostile input
            raise DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def load_imagefolder(root: Path, split: str, image_size: int, max_bytes: int | None = None):
    if not int_in(image_size, 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    limit = byte_limit(max_bytes)
    names = ("train",) if split == "train" else ("test", "val")
    split_root = next((root / n for n in names if (root / n).is_dir()), None)
    base = split_root or root
    classes = class_dirs(base)
    if not classes:
        raise DataError(f"{base}: no class sub-directories (expected {base}/<class>/*.png|jpg)")
    if split_root is not None and split != "train" and (root / "train").is_dir():
        train_classes = [p.name for p in class_dirs(root / "train")]
        if train_classes != [p.name for p in classes]:
            raise DataError(f"{base}: class directories {[p.name for p in classes]} differ from "
                            f"{root / 'train'}'s {train_classes} (labels would not match)")
    files, labels = [], []
    for label, cdir in enumerate(classes):
        found = _image_files(cdir)
        if not found:
            raise DataError(f"{cdir}: class directory has no image files "
                            f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += found
        labels += [label] * len(found)
    labels = np.asarray(labels, dtype=np.int64)
    if split_root is None:  # one folder for both splits: deterministic stratified 80/20 split
        rng = np.random.default_rng(SPLIT_SEED)
        keep = []
        for c in range(len(classes)):
            idx = np.flatnonzero(labels == c)
            idx = idx[rng.permutation(len(idx))]
            n_test = int(round(len(idx) * SPLIT_TEST_FRACTION))
            part = idx[n_test:] if split == "train" else idx[:n_test]
            if part.size == 0:
                raise DataError(f"{classes[c]}: {len(idx)} image(s) leave none for the {split} split of "
                                f"the 80/20 split of {root} (expected at least 3 per class, or "
                                "train/ and test/ directories)")
            keep.extend(part)
        keep = np.sort(np.asarray(keep, dtype=np.int64))
        files, labels = [files[i] for i in keep], labels[keep]
    check_split(base, labels, len(classes), split=split, class_names=[p.name for p in classes])
    need = len(files) * 3 * image_size * image_size * 4
    if need > limit:
        raise DataError(f"{base}: {len(files)} images at {image_size}x{image_size} need {fmt_bytes(need)} as "
                        f"float32, more than the {fmt_bytes(limit)} ceiling (set $BITKERN_DATA_MAX_BYTES "
                        "to raise it)")
    try:
        x = np.empty((len(files), 3, image_size, image_size), dtype=np.float32)
    except MemoryError:
        raise DataError(f"{base}: not enough memory for {fmt_bytes(need)} of images") from None
    for i, f in enumerate(files):
        x[i] = decode_image(f, image_size)
    return torch.from_numpy(x), torch.from_numpy(labels)


def imagefolder_classes(data_dir: str | os.PathLike) -> list[str]:
    """Class names of an image folder dataset, in label order."""
    root = Path(data_dir)
    base = root / "train" if (root / "train").is_dir() else root
    return [p.name for p in class_dirs(base)]
