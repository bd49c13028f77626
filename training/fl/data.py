"""A site's local data: bundled demo sets and adapters for a site's own files (no Django).

:func:`load_site_data` looks, in this order, for

1. ``<data_root>/<dataset_key>.csv``: a CSV file with a header row, a ``label`` column of class
   indices (0, 1, 2, ...) and numeric feature columns (tabular);
2. ``<data_root>/<dataset_key>/images.npy`` with ``labels.npy`` (classification) or
   ``masks.npy`` (segmentation): NumPy arrays, read with ``allow_pickle=False`` (a pickled
   array would run code). ``images`` is ``[N, F]`` (tabular), ``[N, H, W]`` (one channel) or
   ``[N, C, H, W]``; ``labels`` is ``[N]``; ``masks`` is ``[N, H, W]`` or ``[N, 1, H, W]`` of
   class indices per pixel;
3. a folder ``<data_root>/<dataset_key>/`` of PNG images (:mod:`training.fl.image_folder`):
   ``0/*.png``, ``1/*.png``, ... (one sub-folder per class, classification) or
   ``images/<name>.png`` with ``masks/<name>.png`` (segmentation); greyscale or RGB, all of one
   size and mode, pixel values scaled to [0, 1]: ``[N, C, H, W]``;
4. a bundled demo set, which needs no download: ``breast-cancer``, ``digits``, ``lesions``.

A site's own files take precedence over a bundled set of the same name.

Bundled demo sets
-----------------
Each set keeps 20% aside as the consortium's validation set (:func:`load_validation_set`,
stratified for the classification sets, with a fixed seed), and splits the rest across sites
with :func:`demo_split`: unequal sizes (fractions 0.35, 0.27, 0.21, 0.17 for four sites,
geometric with ratio 0.78 for other counts, every site at least :data:`MIN_SITE_RECORDS`, shares
overlapping only when the set cannot give every site that many) and, for the classification
sets, label skew: each
site draws its records without replacement with weights from its own Dirichlet(0.8) class
proportions, so label mixes differ from site to site (non-IID). The four demo sites
(:data:`DEMO_SITES`) get, with the default seed 0:

=============  ========  =========  ==============  ========  =====  ==========
set            training  st-thomas  kings-regional  maudsley  barts  validation
=============  ========  =========  ==============  ========  =====  ==========
breast-cancer  455       159        123             96        77     114
digits         1437      503        388             302       244    360
lesions        400       140        108             84        68     100
=============  ========  =========  ==============  ========  =====  ==========

(``tests/fl/test_fl_data.py`` pins these numbers and prints them.)

* ``breast-cancer``: scikit-learn's Wisconsin diagnostic set, 30 features, 2 classes. Features
  are standardised with the mean and standard deviation of the *whole* set, validation part
  included. That is a demo simplification: a real consortium would agree the statistics (or
  compute them federatedly) on training data only.
* ``digits``: scikit-learn's 8x8 digits, pixel values divided by 16, flattened to 64 features,
  10 classes.
* ``lesions``: generated lesion segmentation: images ``[1, 32, 32]`` with 1 to 3 bright ellipses
  on a noisy background, masks of the ellipses (class 0 background, 1 lesion). Each site's
  "scanner" has its own gain and noise level (feature skew); the validation images use a
  neutral one. Deterministic by seed.

Why one module: a site's own files and a central validation set uploaded by a data steward
(:func:`load_csv_bytes`, :func:`load_npz_bytes`) are read by the same parsers, with the same
checks and messages, next to the bundled sets they stand in for; split apart, an upload could
be accepted in a shape a site's worker would refuse.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import os
import re
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from training.fl.holdout import BUNDLED_DATASETS, validation_count
from training.fl.image_folder import read_png_folder

__all__ = [
    "BUNDLED_DATASETS",
    "DEMO_FRACTIONS",
    "DEMO_SITES",
    "MIN_SITE_RECORDS",
    "SiteData",
    "demo_split",
    "load_csv_bytes",
    "load_npz_bytes",
    "load_site_data",
    "load_validation_set",
    "site_fractions",
    "split_holdout",
]

DEMO_SITES: tuple[str, ...] = ("st-thomas", "kings-regional", "maudsley", "barts")
DEMO_FRACTIONS: tuple[float, ...] = (0.35, 0.27, 0.21, 0.17)
VALIDATION_FRACTION = 0.2
DIRICHLET_ALPHA = 0.8
#: The fewest training records a site of a demo split gets (``_site_sizes``): enough for its
#: holdout and a few batches.
MIN_SITE_RECORDS = 10
_HOLDOUT_SEED = 0
_LESION_TOTAL = 500
_LESION_SIZE = 32
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass
class SiteData:
    """One site's training data, ready for :func:`training.fl.local.train_local`.

    ``x_train`` is float32 ``[N, *input_shape]``; ``y_train`` is int64 ``[N]`` (classification)
    or ``[N, H, W]`` (segmentation). ``modality`` is ``tabular``, ``image`` or
    ``segmentation``. ``n_classes`` is what the data shows (largest label + 1, at least 2): the
    job's registered count builds the model.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    num_records: int
    modality: str
    input_shape: list[int]
    n_classes: int
    source: str = field(default="")


def site_fractions(count: int) -> tuple[float, ...]:
    """Unequal shares for ``count`` sites: :data:`DEMO_FRACTIONS` for four, else geometric."""
    if count < 1:
        raise ValueError("a demo split needs at least one site")
    if count == len(DEMO_FRACTIONS):
        return DEMO_FRACTIONS
    weights = [0.78**i for i in range(count)]
    total = sum(weights)
    return tuple(w / total for w in weights)


def _sizes(total: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of ``fractions * total``; sums to ``total``."""
    raw = [f * total for f in fractions]
    sizes = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - sizes[i]), i))
    for i in order[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


@functools.lru_cache(maxsize=4)
def _classification_arrays(key: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # lazy: about a second of imports

    if key == "breast-cancer":
        bunch = datasets.load_breast_cancer()
        x = bunch.data.astype(np.float64)
        # Demo simplification: statistics of the whole set (see the module docstring).
        x = (x - x.mean(axis=0)) / x.std(axis=0)
    else:
        bunch = datasets.load_digits()
        x = bunch.data.astype(np.float64) / 16.0
    return x.astype(np.float32), bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _holdout(key: str) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices) of a bundled classification set."""
    from sklearn.model_selection import train_test_split  # lazy, as above

    x, y = _classification_arrays(key)
    train, val = train_test_split(
        np.arange(len(y)),
        test_size=VALIDATION_FRACTION,
        stratify=y,
        random_state=_HOLDOUT_SEED,
    )
    return np.sort(train), np.sort(val)


def _ellipse_images(
    rng: np.random.Generator, count: int, *, gain: float, noise: float
) -> tuple[np.ndarray, np.ndarray]:
    size = _LESION_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((count, 1, size, size), dtype=np.float32)
    masks = np.zeros((count, size, size), dtype=np.int64)
    for i in range(count):
        image = np.zeros((size, size), dtype=np.float32)
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(5, size - 5, size=2)
            ry, rx = rng.uniform(2.0, 6.0, size=2)
            theta = rng.uniform(0, math.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * math.cos(theta) + dy * math.sin(theta)) / rx
            v = (-dx * math.sin(theta) + dy * math.cos(theta)) / ry
            inside = u * u + v * v <= 1.0
            image[inside] = np.maximum(image[inside], rng.uniform(0.6, 1.0))
            mask |= inside
        images[i, 0] = gain * image + rng.normal(0.0, noise, size=(size, size))
        masks[i] = mask
    return images, masks


def _lesion_sizes() -> tuple[int, int]:
    val = round(_LESION_TOTAL * VALIDATION_FRACTION)
    return _LESION_TOTAL - val, val


@functools.lru_cache(maxsize=16)
def _site_sizes(total: int, count: int) -> tuple[list[int], bool]:
    """How many records each of ``count`` sites gets from ``total``, and whether the shares can
    be disjoint.

    The geometric shares of :func:`site_fractions` shrink fast: past about twenty sites the
    last ones round to no record at all (and the draw then fails). Every site gets at least
    :data:`MIN_SITE_RECORDS`: from the geometric shares when they already give that (the demo's
    four sites, any small consortium: unchanged), else that floor plus a geometric share of
    what is left. When ``total`` cannot give every site its floor (hundreds of simulated sites
    on a set of a few hundred records), each site draws its floor on its own, so shares
    overlap: the sites still differ (each draws its own label skew), which is all a simulation
    at that scale needs of them.
    """
    sizes = _sizes(total, site_fractions(count))
    if min(sizes) >= MIN_SITE_RECORDS:
        return sizes, True
    spare = total - MIN_SITE_RECORDS * count
    if spare < 0:
        return [MIN_SITE_RECORDS] * count, False
    return [MIN_SITE_RECORDS + extra for extra in _sizes(spare, site_fractions(count))], True


def _split_arrays(
    key: str, slugs: tuple[str, ...], seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if key == "lesions":
        train_total, _ = _lesion_sizes()
        sizes, _disjoint = _site_sizes(train_total, len(slugs))  # generated: never shared
        for index, (slug, count) in enumerate(zip(slugs, sizes, strict=True)):
            rng = np.random.default_rng([seed, 1, index])
            gain, noise = rng.uniform(0.75, 1.15), rng.uniform(0.15, 0.35)
            out[slug] = _ellipse_images(rng, count, gain=gain, noise=noise)
        return out
    x, y = _classification_arrays(key)
    train_idx, _ = _holdout(key)
    n_classes = int(y.max()) + 1
    rng = np.random.default_rng([seed, 0])
    remaining = train_idx.copy()
    sizes, disjoint = _site_sizes(len(train_idx), len(slugs))
    for position, (slug, count) in enumerate(zip(slugs, sizes, strict=True)):
        if not disjoint:
            proportions = rng.dirichlet([DIRICHLET_ALPHA] * n_classes)
            weights = proportions[y[train_idx]] + 1e-3
            picked = rng.choice(
                len(train_idx), size=count, replace=False, p=weights / weights.sum()
            )
            chosen = train_idx[picked]
        elif position == len(slugs) - 1:
            chosen = remaining
        else:
            proportions = rng.dirichlet([DIRICHLET_ALPHA] * n_classes)
            # A small floor keeps every remaining record drawable when a class runs out.
            weights = proportions[y[remaining]] + 1e-3
            picked = rng.choice(
                len(remaining), size=count, replace=False, p=weights / weights.sum()
            )
            chosen = remaining[picked]
            remaining = np.delete(remaining, picked)
        chosen = np.sort(chosen)
        out[slug] = (x[chosen], y[chosen])
    return out


def _check_bundled(dataset_key: str) -> None:
    if dataset_key not in BUNDLED_DATASETS:
        raise ValueError(
            f"'{dataset_key}' is not a bundled demo data set (bundled: "
            f"{', '.join(BUNDLED_DATASETS)})"
        )


def _site_data(key: str, x: np.ndarray, y: np.ndarray, source: str) -> SiteData:
    modality = "segmentation" if key == "lesions" else "tabular"
    n_classes = 2 if key == "lesions" else int(_classification_arrays(key)[1].max()) + 1
    return SiteData(
        x_train=torch.from_numpy(x.copy()),
        y_train=torch.from_numpy(y.copy()),
        num_records=len(y),
        modality=modality,
        input_shape=list(x.shape[1:]),
        n_classes=n_classes,
        source=source,
    )


def demo_split(dataset_key: str, site_slugs: Sequence[str], seed: int = 0) -> dict[str, SiteData]:
    """Split a bundled set's training part across ``site_slugs`` (unequal, non-IID).

    The validation part (:func:`load_validation_set`) is the same whatever the slugs and
    ``seed``; ``seed`` only changes which records (or generated images) each site gets.
    """
    _check_bundled(dataset_key)
    slugs = tuple(site_slugs)
    if not slugs or len(set(slugs)) != len(slugs):
        raise ValueError(f"demo_split needs distinct site slugs, got {list(slugs)}")
    arrays = _split_arrays(dataset_key, slugs, int(seed))
    return {
        slug: _site_data(dataset_key, x, y, f"bundled:{dataset_key}:{slug}")
        for slug, (x, y) in arrays.items()
    }


def load_validation_set(dataset_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The consortium's validation part of a bundled set: ``(x, y)``, disjoint from every site."""
    _check_bundled(dataset_key)
    if dataset_key == "lesions":
        _, count = _lesion_sizes()
        rng = np.random.default_rng([_HOLDOUT_SEED, 2])
        x, y = _ellipse_images(rng, count, gain=1.0, noise=0.25)
    else:
        xs, ys = _classification_arrays(dataset_key)
        _, val_idx = _holdout(dataset_key)
        x, y = xs[val_idx], ys[val_idx]
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


# --- a site's own files -------------------------------------------------------------------------


def _class_count(labels: np.ndarray) -> int:
    return max(2, int(labels.max()) + 1) if labels.size else 2


#: A file changed less than this long ago is read but not kept: a write in the same tick of
#: the file system's clock as the read would leave its size and time as they were ("racy").
_CSV_SETTLED_NS = 2_000_000_000


class _ParsedCsv:
    """The last CSV file this process parsed, under its identity on disk.

    A site's worker reads the same file every round, and :func:`_read_csv` checks it value by
    value in Python (every error names its line): for the ten-site benchmark's files that is a
    third of a site's CPU per round, more than the training, and it grows with the file. The
    records are parsed again whenever the file is another one or changed (device, inode, size,
    modification time in nanoseconds), and every caller gets tensors of its own (a copy costs
    little beside the parse), so no caller can change what the next one reads. One file is
    kept: a worker serves one site, and a job reads one data set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int, int, int, int] | None = None
        self._data: SiteData | None = None

    def load(self, path: Path) -> SiteData:
        stat = path.stat()
        key = (
            os.path.realpath(path),
            stat.st_dev,
            stat.st_ino,
            stat.st_size,
            stat.st_mtime_ns,
        )
        with self._lock:
            data = self._data if self._key == key else None
        if data is None:
            with path.open(newline="", encoding="utf-8-sig") as handle:
                data = _read_csv(handle, str(path))
            settled = time.time_ns() - stat.st_mtime_ns > _CSV_SETTLED_NS
            with self._lock:
                self._key, self._data = (key, data) if settled else (None, None)
        return dataclasses.replace(data, x_train=data.x_train.clone(), y_train=data.y_train.clone())

    def clear(self) -> None:
        with self._lock:
            self._key, self._data = None, None


_parsed_csv = _ParsedCsv()


def _load_csv(path: Path) -> SiteData:
    return _parsed_csv.load(path)


def load_csv_bytes(data: bytes, *, source: str) -> SiteData:
    """Records from the bytes of a CSV file (an upload), read exactly as a site's own
    ``<key>.csv`` (module docstring): the same columns and checks, messages naming ``source``
    and the line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{source}: not UTF-8 text (byte {exc.start} cannot be read); save the CSV as UTF-8"
        ) from None
    return _read_csv(io.StringIO(text, newline=""), source)


def _read_csv(handle: TextIO, source: str) -> SiteData:
    rows = csv.reader(handle)
    header = next(rows, None)
    if not header:
        raise ValueError(f"{source}: the file is empty (expected a header row)")
    header = [name.strip() for name in header]
    if "label" not in header:
        raise ValueError(
            f"{source}: no 'label' column in the header (columns: {', '.join(header)})"
        )
    label_at = header.index("label")
    if len(header) < 2:
        raise ValueError(f"{source}: no feature columns besides 'label'")
    features, labels = [], []
    for row in rows:
        if not row or all(not cell.strip() for cell in row):
            continue
        line = rows.line_num
        if len(row) != len(header):
            raise ValueError(
                f"{source}, line {line}: expected {len(header)} values, got {len(row)}"
            )
        values = []
        for column, cell in zip(header, row, strict=True):
            try:
                value = float(cell)
            except ValueError:
                raise ValueError(
                    f"{source}, line {line}: non-numeric value {cell.strip()!r} in column "
                    f"{column!r}"
                ) from None
            if math.isnan(value):
                raise ValueError(f"{source}, line {line}: NaN value in column {column!r}")
            if math.isinf(value):
                raise ValueError(f"{source}, line {line}: infinite value in column {column!r}")
            values.append(value)
        label = values.pop(label_at)
        if label < 0 or not label.is_integer():
            raise ValueError(
                f"{source}, line {line}: label {row[label_at].strip()!r} is not a class "
                "index (0, 1, 2, ...)"
            )
        features.append(values)
        labels.append(int(label))
    if not labels:
        raise ValueError(f"{source}: no records after the header")
    x = torch.tensor(features, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.int64)
    return SiteData(
        x_train=x,
        y_train=y,
        num_records=len(labels),
        modality="tabular",
        input_shape=[x.shape[1]],
        n_classes=_class_count(y.numpy()),
        source=source,
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        array: np.ndarray = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise ValueError(
            f"{path}: cannot read it without unpickling (object arrays are refused; save "
            f"plain numeric arrays): {exc}"
        ) from None
    except OSError as exc:
        raise ValueError(f"{path}: not a readable .npy file: {exc}") from None
    return array


def _numeric(array: np.ndarray, path: Path | str) -> None:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{path}: non-numeric values (dtype {array.dtype})")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{path}: complex values are not supported")
    if np.issubdtype(array.dtype, np.floating):
        if np.isnan(array).any():
            raise ValueError(f"{path}: NaN values")
        if np.isinf(array).any():
            raise ValueError(f"{path}: infinite values")


def _class_indices(array: np.ndarray, path: Path | str, what: str) -> np.ndarray:
    _numeric(array, path)
    if array.size and (array.min() < 0 or not np.array_equal(array, np.floor(array))):
        raise ValueError(f"{path}: {what} must be class indices (0, 1, 2, ...)")
    return array.astype(np.int64)


def _load_image_dir(folder: Path) -> SiteData:
    images_path = folder / "images.npy"
    labels_path, masks_path = folder / "labels.npy", folder / "masks.npy"
    has_labels, has_masks = labels_path.is_file(), masks_path.is_file()
    if has_labels == has_masks:
        state = "holds both" if has_labels else "has neither"
        raise ValueError(
            f"{folder} {state} labels.npy (classification) and masks.npy (segmentation): "
            "put exactly one of them next to images.npy"
        )
    images = _load_npy(images_path)
    return _image_data(
        images,
        _load_npy(labels_path if has_labels else masks_path),
        segmentation=has_masks,
        where=lambda name: str(folder / f"{name}.npy"),
        short=lambda name: f"{name}.npy",
        source=str(folder),
    )


def load_npz_bytes(data: bytes, *, source: str) -> SiteData:
    """Records from the bytes of an ``.npz`` archive (an upload, ``numpy.savez``) holding the
    arrays of a site's image folder (module docstring): ``images`` with ``labels``
    (classification) or ``masks`` (segmentation), read without unpickling and checked the same
    way, messages naming ``source`` and the array."""
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{source}: not a readable .npz archive: {exc}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{source}: a single array, not an .npz archive: save images and labels (or masks) "
            "together with numpy.savez"
        )
    with archive:
        names = set(archive.files)
        has_labels, has_masks = "labels" in names, "masks" in names
        if "images" not in names or has_labels == has_masks:
            raise ValueError(
                f"{source}: expected the arrays 'images' and exactly one of 'labels' "
                f"(classification) or 'masks' (segmentation); it holds "
                f"{', '.join(repr(n) for n in sorted(names)) or 'none'}"
            )
        arrays = {}
        for name in ("images", "labels" if has_labels else "masks"):
            try:
                arrays[name] = archive[name]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise ValueError(
                    f"{source}[{name}]: cannot read it without unpickling (object arrays are "
                    f"refused; save plain numeric arrays): {exc}"
                ) from None
    return _image_data(
        arrays["images"],
        arrays["labels" if has_labels else "masks"],
        segmentation=has_masks,
        where=lambda name: f"{source}[{name}]",
        short=lambda name: f"'{name}'",
        source=source,
    )


def _image_data(
    images: np.ndarray,
    target: np.ndarray,
    *,
    segmentation: bool,
    where: Callable[[str], str],
    short: Callable[[str], str],
    source: str,
) -> SiteData:
    """Check an image folder's (or archive's) arrays and make them a :class:`SiteData`.
    ``where(name)`` names an array in full in a message, ``short(name)`` beside another."""
    _numeric(images, where("images"))
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim not in (2, 4) or images.shape[0] == 0:
        raise ValueError(
            f"{where('images')}: expected [N, features], [N, H, W] or [N, C, H, W] with N >= 1, "
            f"got shape {list(images.shape)}"
        )
    n = images.shape[0]
    if not segmentation:
        labels = target
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(
                f"shape mismatch: {short('images')} has {n} records but {short('labels')} has "
                f"shape {list(labels.shape)} (expected [{n}])"
            )
        target = _class_indices(labels, where("labels"), "labels")
        modality = "tabular" if images.ndim == 2 else "image"
    else:
        masks = target
        if images.ndim != 4:
            raise ValueError(
                f"{where('images')}: segmentation needs images [N, C, H, W] or [N, H, W]"
            )
        if masks.ndim == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        expected = [n, images.shape[2], images.shape[3]]
        if list(masks.shape) != expected:
            raise ValueError(
                f"shape mismatch: {short('masks')} has shape {list(masks.shape)}, expected "
                f"{expected} to match {short('images')}"
            )
        target = _class_indices(masks, where("masks"), "mask values")
        modality = "segmentation"
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return SiteData(
        x_train=x,
        y_train=torch.from_numpy(np.ascontiguousarray(target)),
        num_records=n,
        modality=modality,
        input_shape=list(x.shape[1:]),
        n_classes=_class_count(target),
        source=source,
    )


def load_site_data(*, data_root: str | Path, dataset_key: str, site_slug: str) -> SiteData:
    """This site's training data for ``dataset_key`` (see the module docstring for the order).

    ``ValueError`` says what is missing or wrong: no data set, no ``label`` column, non-numeric
    or NaN values, images and labels that do not match, PNG images of mixed sizes or modes (or
    in a folder not named by a class index, or a mask without its image), a bundled set asked
    for by a site that is not one of :data:`DEMO_SITES` (use :func:`demo_split` for other
    slugs).
    """
    if not isinstance(dataset_key, str) or not _KEY_RE.fullmatch(dataset_key):
        raise ValueError(f"invalid data set key {dataset_key!r}")
    root = Path(data_root)
    csv_path = root / f"{dataset_key}.csv"
    folder = root / dataset_key
    if csv_path.is_file():
        return _load_csv(csv_path)
    if (folder / "images.npy").is_file():
        return _load_image_dir(folder)
    if folder.is_dir():
        return _load_png_folder(folder)
    if dataset_key in BUNDLED_DATASETS:
        if site_slug not in DEMO_SITES:
            raise ValueError(
                f"the bundled demo set '{dataset_key}' is split among the demo sites "
                f"({', '.join(DEMO_SITES)}), not '{site_slug}'; put this site's own "
                f"{dataset_key}.csv or {dataset_key}/images.npy under {root} (or its PNG "
                f"images in {dataset_key}/)"
            )
        return demo_split(dataset_key, DEMO_SITES)[site_slug]
    raise ValueError(
        f"no data set '{dataset_key}' under {root}: expected {dataset_key}.csv, "
        f"{dataset_key}/images.npy or a folder {dataset_key}/ of PNG images"
    )


def _load_png_folder(folder: Path) -> SiteData:
    read = read_png_folder(folder)
    x = torch.from_numpy(read.images)
    return SiteData(
        x_train=x,
        y_train=torch.from_numpy(read.target),
        num_records=len(read.target),
        modality="segmentation" if read.segmentation else "image",
        input_shape=list(x.shape[1:]),
        n_classes=_class_count(read.target),
        source=str(folder),
    )


def split_holdout(
    data: SiteData, *, fraction: float, seed: int
) -> tuple[SiteData, torch.Tensor, torch.Tensor]:
    """Keep a site's validation share aside: ``(training part, x_val, y_val)``.

    The share has :func:`training.fl.holdout.validation_count` records, drawn by a permutation
    seeded with ``seed`` (:func:`training.fl.holdout.holdout_seed`: the job's spec digest and the
    site), so every task of the job at this site splits the same way and never trains on a
    record it evaluates on. Both parts keep the records' order in the file."""
    n = data.num_records
    k = validation_count(n, fraction)
    order = np.random.default_rng(int(seed)).permutation(n)
    held = np.sort(order[:k])
    kept = np.sort(order[k:])
    held_t = torch.from_numpy(held)
    kept_t = torch.from_numpy(kept)
    training_part = SiteData(
        x_train=data.x_train[kept_t],
        y_train=data.y_train[kept_t],
        num_records=len(kept),
        modality=data.modality,
        input_shape=list(data.input_shape),
        n_classes=data.n_classes,
        source=data.source,
    )
    return training_part, data.x_train[held_t], data.y_train[held_t]
