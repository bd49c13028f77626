"""A site's images as PNG files (training/fl/image_folder.py, through
training.fl.data.load_site_data): class folders and images/masks folders load with the right
shapes, dtypes, classes, scaling and order, and every way a folder can be wrong is refused with
a message naming the file. Plain pytest, no database.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from training.fl.data import load_site_data


def png(path, array, *, mode: str | None = None):
    """Write ``array`` as a PNG at ``path``: uint8 [H, W] is L, [H, W, 3] RGB, [H, W, 4] RGBA,
    uint16 [H, W] 16-bit greyscale, bool [H, W] mode 1; ``mode="P"`` a palette image whose
    indices are ``array``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
        image.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    else:
        image = Image.fromarray(array)
    image.save(path, format="PNG")
    return path


def load(root, key="scans"):
    return load_site_data(data_root=root, dataset_key=key, site_slug="x")


def grey(value, size=(4, 6)):
    return np.full(size, value, dtype=np.uint8)


# --- classification: one folder per class ----------------------------------------------------


def test_class_folders_load_in_class_then_name_order_scaled_to_unit_range(tmp_path):
    folder = tmp_path / "scans"
    # Written out of order: the order read is classes by number (10 after 2), files by name.
    png(folder / "10" / "z.png", grey(255))
    png(folder / "2" / "b.png", grey(102))
    png(folder / "2" / "a.png", grey(51))
    png(folder / "0" / "only.png", grey(0))
    (folder / "0" / ".DS_Store").write_bytes(b"\0junk")
    (folder / "2" / "Thumbs.db").write_bytes(b"junk")
    (folder / ".hidden-folder").mkdir()

    data = load(tmp_path)
    assert data.modality == "image" and data.source == str(folder)
    assert data.num_records == 4 and data.input_shape == [1, 4, 6]
    assert data.x_train.dtype == torch.float32 and data.x_train.shape == (4, 1, 4, 6)
    assert data.y_train.dtype == torch.int64
    assert data.y_train.tolist() == [0, 2, 2, 10]
    assert data.n_classes == 11  # largest class index + 1
    # a.png (51) before b.png (102); pixel values divided by 255.
    means = data.x_train.mean(dim=(1, 2, 3)).tolist()
    assert means == pytest.approx([0.0, 0.2, 0.4, 1.0])
    # Deterministic: the same tensors again.
    again = load(tmp_path)
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_train, data.y_train)


def test_rgb_images_have_three_channels_in_rgb_order(tmp_path):
    pixels = np.zeros((5, 3, 3), dtype=np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 0, 51
    pixels[0, 0] = (0, 255, 255)
    png(tmp_path / "scans" / "0" / "a.png", pixels)
    png(tmp_path / "scans" / "1" / "a.png", pixels)
    data = load(tmp_path)
    assert data.input_shape == [3, 5, 3] and data.x_train.shape == (2, 3, 5, 3)
    assert data.n_classes == 2
    assert data.x_train[0, :, 1, 1].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert data.x_train[0, :, 0, 0].tolist() == pytest.approx([0.0, 1.0, 1.0])


def test_sixteen_bit_greyscale_is_scaled_by_65535(tmp_path):
    png(tmp_path / "scans" / "1" / "a.png", np.full((8, 8), 65535, dtype=np.uint16))
    png(tmp_path / "scans" / "1" / "b.png", np.full((8, 8), 13107, dtype=np.uint16))
    data = load(tmp_path)
    assert data.input_shape == [1, 8, 8]
    assert data.x_train.amax(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 0.2])
    assert data.y_train.tolist() == [1, 1] and data.n_classes == 2


# --- segmentation: images/ with masks/ --------------------------------------------------------


def test_images_with_masks_load_as_segmentation_in_name_order(tmp_path):
    folder = tmp_path / "scans"
    masks = {
        "b.png": np.array([[0, 1, 1], [0, 0, 2]], dtype=np.uint8),
        "a.png": np.array([[2, 2, 0], [0, 1, 0]], dtype=np.uint8),
        "c.png": np.array([[1, 0, 0], [0, 0, 1]], dtype=bool),
    }
    for value, name in ((20, "b.png"), (10, "a.png"), (30, "c.png")):
        png(folder / "images" / name, grey(value, (2, 3)))
    png(folder / "masks" / "b.png", masks["b.png"], mode="P")  # palette indices
    png(folder / "masks" / "a.png", masks["a.png"])  # 8-bit greyscale
    png(folder / "masks" / "c.png", masks["c.png"])  # 1-bit

    data = load(tmp_path)
    assert data.modality == "segmentation" and data.input_shape == [1, 2, 3]
    assert data.num_records == 3 and data.n_classes == 3
    assert data.x_train.dtype == torch.float32 and data.x_train.shape == (3, 1, 2, 3)
    assert data.y_train.dtype == torch.int64 and data.y_train.shape == (3, 2, 3)
    assert data.x_train[:, 0, 0, 0].tolist() == pytest.approx([10 / 255, 20 / 255, 30 / 255])
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        assert data.y_train[i].tolist() == masks[name].astype(np.int64).tolist()


# --- precedence -------------------------------------------------------------------------------


def test_the_csv_and_the_arrays_come_before_a_png_folder_which_comes_before_a_bundled_set(
    tmp_path,
):
    png(tmp_path / "digits" / "3" / "a.png", grey(0, (8, 8)))
    data = load(tmp_path, "digits")
    assert data.modality == "image" and data.num_records == 1  # not the bundled digits
    np.save(tmp_path / "digits" / "images.npy", np.zeros((2, 5, 5)))
    np.save(tmp_path / "digits" / "labels.npy", np.array([0, 1]))
    assert load(tmp_path, "digits").input_shape == [1, 5, 5]
    (tmp_path / "digits.csv").write_text("f,label\n0.5,1\n")
    assert load(tmp_path, "digits").input_shape == [1]


# --- what is refused, and how it is said ------------------------------------------------------


def _jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(grey(9)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue())


def _text(path, text="not an image"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


CASES = {
    "empty folder": ([], "scans: no images: expected PNG files in class folders"),
    "class folders without images": (
        [lambda f: (f / "0").mkdir(), lambda f: (f / "1").mkdir()],
        "no images",
    ),
    "a class folder that is not a number": (
        [lambda f: png(f / "0" / "a.png", grey(1)), lambda f: png(f / "cat" / "a.png", grey(1))],
        r"scans/cat: the folder name 'cat' is not a class index",
    ),
    "a class folder with a leading zero": (
        [lambda f: png(f / "01" / "a.png", grey(1))],
        "the folder name '01' is not a class index",
    ),
    "mixed sizes": (
        [
            lambda f: png(f / "0" / "a.png", grey(1, (4, 6))),
            lambda f: png(f / "1" / "b.png", grey(1, (6, 4))),
        ],
        r"scans/1/b.png: 4x6 pixels in mode L, but .*scans/0/a.png is 6x4 in mode L: every "
        "image of a data set has the same size and mode",
    ),
    "mixed modes": (
        [
            lambda f: png(f / "0" / "a.png", grey(1)),
            lambda f: png(f / "0" / "b.png", np.zeros((4, 6, 3), dtype=np.uint8)),
        ],
        r"scans/0/b.png: 6x4 pixels in mode RGB, but .* in mode L",
    ),
    "an alpha channel": (
        [lambda f: png(f / "0" / "a.png", np.zeros((4, 4, 4), dtype=np.uint8))],
        r"scans/0/a.png: mode RGBA is not read; save images as 8-bit greyscale",
    ),
    "a JPEG named .png": (
        [lambda f: _jpeg(f / "0" / "a.png")],
        r"scans/0/a.png: a JPEG image, not a PNG file",
    ),
    "a .jpg file": (
        [lambda f: png(f / "0" / "a.png", grey(1)), lambda f: _jpeg(f / "0" / "b.jpg")],
        r"scans/0/b.jpg: not a .png file; .*scans/0 holds PNG images only",
    ),
    "a broken PNG": (
        [lambda f: _text(f / "1" / "a.png")],
        r"scans/1/a.png: not a readable PNG image",
    ),
    "a folder inside a class folder": (
        [lambda f: png(f / "0" / "deeper" / "a.png", grey(1))],
        r"scans/0/deeper: a folder; .*scans/0 holds PNG images only",
    ),
    "a stray file beside the class folders": (
        [lambda f: png(f / "0" / "a.png", grey(1)), lambda f: _text(f / "README.txt")],
        r"scans/README.txt: a file where .*scans holds one sub-folder of PNG images per class",
    ),
    "labels.npy without images.npy": (
        [lambda f: np.save(f / "labels.npy", np.zeros(2))],
        r"scans has no images.npy beside it",
    ),
    "a mask without its image": (
        [
            lambda f: png(f / "images" / "a.png", grey(1)),
            lambda f: png(f / "masks" / "a.png", grey(0)),
            lambda f: png(f / "masks" / "b.png", grey(0)),
        ],
        r"scans/masks/b.png: a mask without its image \(.*scans/images/b.png does not exist\)",
    ),
    "an image without its mask": (
        [
            lambda f: png(f / "images" / "a.png", grey(1)),
            lambda f: png(f / "images" / "b.png", grey(1)),
            lambda f: png(f / "masks" / "a.png", grey(0)),
        ],
        r"scans/images/b.png: an image without its mask \(.*scans/masks/b.png does not exist\)",
    ),
    "images without masks": (
        [lambda f: png(f / "images" / "a.png", grey(1))],
        r"scans: images/ without masks/",
    ),
    "masks without images": (
        [lambda f: png(f / "masks" / "a.png", grey(1))],
        r"scans/masks: masks/ without images/ beside it",
    ),
    "no segmentation images": (
        [lambda f: (f / "images").mkdir(), lambda f: (f / "masks").mkdir()],
        "no images",
    ),
    "an RGB mask": (
        [
            lambda f: png(f / "images" / "a.png", grey(1)),
            lambda f: png(f / "masks" / "a.png", np.zeros((4, 6, 3), dtype=np.uint8)),
        ],
        r"scans/masks/a.png: a mask in mode RGB; a mask is one channel whose pixel values are "
        "class indices",
    ),
    "a mask of another size": (
        [
            lambda f: png(f / "images" / "a.png", grey(1, (4, 6))),
            lambda f: png(f / "masks" / "a.png", grey(0, (4, 5))),
        ],
        r"scans/masks/a.png: 5x4 pixels, but its image .*scans/images/a.png is 6x4",
    ),
    "a third folder beside images and masks": (
        [
            lambda f: png(f / "images" / "a.png", grey(1)),
            lambda f: png(f / "masks" / "a.png", grey(0)),
            lambda f: png(f / "0" / "a.png", grey(0)),
        ],
        r"scans/0: unexpected beside images/ and masks/",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_folder_that_does_not_fit_is_refused_naming_the_file(tmp_path, case):
    steps, message = CASES[case]
    folder = tmp_path / "scans"
    folder.mkdir()
    for step in steps:
        step(folder)
    with pytest.raises(ValueError, match=message):
        load(tmp_path)
