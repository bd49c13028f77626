"""A site's images kept as PNG files, read into arrays (no Django; Pillow only when called).

Hospitals export scans as image files, not NumPy arrays, so :func:`training.fl.data.load_site_data`
also reads a folder ``<data_root>/<dataset_key>/`` laid out as

* classification: one sub-folder per class, named by its class index, holding that class's
  images: ``0/*.png``, ``1/*.png``, ... (a class a site has no images of may be left out);
* segmentation: ``images/<name>.png`` with its mask ``masks/<name>.png`` (same file name, same
  size), whose pixel values are the class indices (0 background, 1, 2, ...).

Images are 8-bit greyscale (mode ``L``: 1 channel), 8-bit RGB (``RGB``: 3 channels) or 16-bit
greyscale (``I;16``: 1 channel, as scanners often export); every image of a set has the same size
and mode. Pixel values are scaled to [0, 1] (divided by 255, or 65535 for 16-bit), giving
float32 ``[N, C, H, W]``. A mask is one channel (``L``, ``P``, ``1`` or ``I;16``) of class indices.
Records come in a fixed order: classes in numeric order, files by name within a folder (for
segmentation, ``images/`` by name), so a site's validation share is the same at every task.

Files whose name starts with a dot (``.DS_Store``) and Windows' ``Thumbs.db`` and ``desktop.ini``
are ignored; anything else that does not fit the layout is refused with a ``ValueError`` naming
the file and what is wrong, rather than skipped: a steward should learn of a JPEG or a stray
folder before a job, not find fewer records than registered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["IMAGE_MODES", "MASK_MODES", "PngFolder", "read_png_folder"]

#: The image modes read: channels, and the pixel value that becomes 1.0.
IMAGE_MODES: dict[str, tuple[int, float]] = {
    "L": (1, 255.0),
    "RGB": (3, 255.0),
    "I;16": (1, 65535.0),
}
#: The mask modes read: one channel whose values are class indices.
MASK_MODES: tuple[str, ...] = ("L", "P", "1", "I;16")

_CLASS_FOLDER_RE = re.compile(r"^(0|[1-9][0-9]*)$")
_IGNORED = frozenset({"Thumbs.db", "desktop.ini"})
_LAYOUT = (
    "one sub-folder of PNG images per class, named 0, 1, 2, ... (classification), or "
    "images/ with masks/ (segmentation)"
)


@dataclass(frozen=True)
class PngFolder:
    """What :func:`read_png_folder` read: ``images`` float32 ``[N, C, H, W]`` in [0, 1];
    ``target`` int64 ``[N]`` (class indices) or ``[N, H, W]`` (masks)."""

    images: np.ndarray
    target: np.ndarray
    segmentation: bool


def read_png_folder(folder: Path) -> PngFolder:
    """The images (and labels or masks) of ``folder`` (module docstring for the layout).

    ``ValueError`` names the file and what is wrong: no images, a folder name that is not a
    class index, a file that is not a PNG, images of different sizes or modes, an unsupported
    mode, a mask without its image or an image without its mask."""
    entries = _entries(folder)
    if (folder / "images").is_dir():
        return _segmentation(folder, entries)
    return _classification(folder, entries)


def _entries(folder: Path) -> list[Path]:
    """``folder``'s entries by name, less the hidden ones and the desktops' caches."""
    return sorted(
        (
            entry
            for entry in folder.iterdir()
            if not entry.name.startswith(".") and entry.name not in _IGNORED
        ),
        key=lambda entry: entry.name,
    )


def _png_files(folder: Path) -> list[Path]:
    files = []
    for entry in _entries(folder):
        if not entry.is_file() or entry.suffix.lower() != ".png":
            kind = "a folder" if entry.is_dir() else "not a .png file"
            raise ValueError(f"{entry}: {kind}; {folder} holds PNG images only")
        files.append(entry)
    return files


def _no_images(folder: Path) -> str:
    return (
        f"{folder}: no images: expected PNG files in class folders ({folder / '0'}/*.png, "
        f"{folder / '1'}/*.png, ...) or in {folder / 'images'}/ with their masks in "
        f"{folder / 'masks'}/"
    )


def _classification(folder: Path, entries: list[Path]) -> PngFolder:
    classes: list[tuple[int, Path]] = []
    for entry in entries:
        if not entry.is_dir():
            hint = f" ({folder} has no images.npy beside it)" if entry.suffix == ".npy" else ""
            raise ValueError(f"{entry}: a file where {folder} holds {_LAYOUT}{hint}")
        if entry.name == "masks":
            raise ValueError(
                f"{entry}: masks/ without images/ beside it: a segmentation set needs both"
            )
        if not _CLASS_FOLDER_RE.fullmatch(entry.name):
            raise ValueError(
                f"{entry}: the folder name {entry.name!r} is not a class index; name each "
                "class's folder by its index: 0, 1, 2, ..."
            )
        classes.append((int(entry.name), entry))
    classes.sort()
    files: list[Path] = []
    labels: list[int] = []
    for index, class_folder in classes:
        for path in _png_files(class_folder):
            files.append(path)
            labels.append(index)
    if not files:
        raise ValueError(_no_images(folder))
    return PngFolder(
        images=_stack(files), target=np.asarray(labels, dtype=np.int64), segmentation=False
    )


def _segmentation(folder: Path, entries: list[Path]) -> PngFolder:
    images_dir, masks_dir = folder / "images", folder / "masks"
    for entry in entries:
        if entry.name not in ("images", "masks") or not entry.is_dir():
            raise ValueError(
                f"{entry}: unexpected beside images/ and masks/ (a segmentation set holds "
                "only those two folders)"
            )
    if not masks_dir.is_dir():
        raise ValueError(
            f"{folder}: images/ without masks/: each images/<name>.png needs its mask "
            "masks/<name>.png"
        )
    images, masks = _png_files(images_dir), _png_files(masks_dir)
    image_names = {path.name for path in images}
    mask_names = {path.name for path in masks}
    for path in masks:
        if path.name not in image_names:
            raise ValueError(
                f"{path}: a mask without its image ({images_dir / path.name} does not exist)"
            )
    for path in images:
        if path.name not in mask_names:
            raise ValueError(
                f"{path}: an image without its mask ({masks_dir / path.name} does not exist)"
            )
    if not images:
        raise ValueError(_no_images(folder))
    x = _stack(images)
    height, width = x.shape[2], x.shape[3]
    y = np.empty((len(images), height, width), dtype=np.int64)
    for i, image_path in enumerate(images):
        path = masks_dir / image_path.name
        array, mode = _read(path)
        if mode not in MASK_MODES:
            raise ValueError(
                f"{path}: a mask in mode {mode}; a mask is one channel whose pixel values are "
                f"class indices (mode {', '.join(MASK_MODES)})"
            )
        if array.shape != (height, width):
            raise ValueError(
                f"{path}: {_size(array)} pixels, but its image {image_path} is "
                f"{width}x{height}: a mask has its image's size"
            )
        y[i] = array
    return PngFolder(images=x, target=y, segmentation=True)


def _size(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}"


def _read(path: Path) -> tuple[np.ndarray, str]:
    """The pixels of the PNG file ``path`` (``[H, W]`` or ``[H, W, C]``) and its mode."""
    from PIL import Image  # lazy: only a site that keeps PNG files needs Pillow

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(
                    f"{path}: a {image.format or 'non-PNG'} image, not a PNG file; save it as PNG"
                )
            image.load()
            return np.asarray(image), image.mode
    except (OSError, Image.DecompressionBombError) as exc:
        # Pillow's UnidentifiedImageError (not an image at all) is an OSError too.
        raise ValueError(f"{path}: not a readable PNG image: {exc}") from None


def _stack(files: list[Path]) -> np.ndarray:
    """``files`` as float32 ``[N, C, H, W]`` in [0, 1]; all of one size and mode."""
    first, mode = _read(files[0])
    _check_mode(files[0], mode)
    channels, scale = IMAGE_MODES[mode]
    height, width = first.shape[0], first.shape[1]
    out = np.empty((len(files), channels, height, width), dtype=np.float32)
    for i, path in enumerate(files):
        array, this_mode = (first, mode) if i == 0 else _read(path)
        _check_mode(path, this_mode)
        if this_mode != mode or array.shape[:2] != (height, width):
            raise ValueError(
                f"{path}: {_size(array)} pixels in mode {this_mode}, but {files[0]} is "
                f"{width}x{height} in mode {mode}: every image of a data set has the same "
                "size and mode"
            )
        pixels = array.astype(np.float32) / np.float32(scale)
        out[i] = pixels.transpose(2, 0, 1) if pixels.ndim == 3 else pixels[None]
    return out


def _check_mode(path: Path, mode: str) -> None:
    if mode not in IMAGE_MODES:
        raise ValueError(
            f"{path}: mode {mode} is not read; save images as 8-bit greyscale (L), RGB or "
            "16-bit greyscale (I;16), without an alpha channel or a palette"
        )
