"""Site data for the federated engine (training/fl/data.py): bundled demo splits and the
adapters for a site's own CSV and NumPy files. Plain pytest, no database.
"""

import numpy as np
import pytest
import torch

from training.fl.data import (
    DEMO_SITES,
    MIN_SITE_RECORDS,
    demo_split,
    load_site_data,
    load_validation_set,
    site_fractions,
)

# Pinned sizes (also in the data module's docstring): training records per demo site, then the
# validation set. A change here changes every demo job's accounting: update both together.
EXPECTED_SIZES = {
    "breast-cancer": ([159, 123, 96, 77], 114),
    "digits": ([503, 388, 302, 244], 360),
    "lesions": ([140, 108, 84, 68], 100),
}
TOTALS = {"breast-cancer": 569, "digits": 1797, "lesions": 500}


@pytest.mark.parametrize("key", sorted(EXPECTED_SIZES))
def test_demo_split_sizes_are_unequal_stable_and_disjoint_from_validation(key, tmp_path):
    sites = demo_split(key, DEMO_SITES)
    x_val, y_val = load_validation_set(key)
    sizes = [sites[slug].num_records for slug in DEMO_SITES]
    print(f"{key}: sites {dict(zip(DEMO_SITES, sizes, strict=True))}, validation {len(y_val)}")
    assert (sizes, len(y_val)) == EXPECTED_SIZES[key]
    assert len(set(sizes)) == len(sizes)  # unequal
    assert sum(sizes) + len(y_val) == TOTALS[key]
    # Stable: the same again, and through load_site_data (no own files under tmp_path).
    again = demo_split(key, DEMO_SITES)
    for slug in DEMO_SITES:
        assert torch.equal(sites[slug].x_train, again[slug].x_train)
        loaded = load_site_data(data_root=tmp_path, dataset_key=key, site_slug=slug)
        assert torch.equal(loaded.x_train, sites[slug].x_train)
        assert torch.equal(loaded.y_train, sites[slug].y_train)
        assert loaded.num_records == len(loaded.y_train) == len(loaded.x_train)
        assert loaded.x_train.dtype == torch.float32 and loaded.y_train.dtype == torch.int64
    # Disjoint: no record (row of features / generated image) appears in two parts.
    parts = [sites[slug].x_train for slug in DEMO_SITES] + [x_val]
    rows = [tuple(row.flatten().tolist()) for part in parts for row in part]
    assert len(set(rows)) == len(rows)


@pytest.mark.parametrize("key", ["breast-cancer", "digits"])
def test_demo_splits_are_label_skewed(key):
    sites = demo_split(key, DEMO_SITES)
    n_classes = sites[DEMO_SITES[0]].n_classes
    props = np.stack(
        [
            np.bincount(sites[s].y_train.numpy(), minlength=n_classes) / sites[s].num_records
            for s in DEMO_SITES
        ]
    )
    for slug, row in zip(DEMO_SITES, props, strict=True):
        print(key, slug, np.round(row, 2).tolist())
    # Non-IID: some class's share differs by more than 30 points between two sites.
    assert (props.max(axis=0) - props.min(axis=0)).max() > 0.3
    _, y_val = load_validation_set(key)
    overall = np.bincount(y_val.numpy(), minlength=n_classes) / len(y_val)
    assert np.abs(props - overall).max() > 0.2


@pytest.mark.parametrize("key", sorted(EXPECTED_SIZES))
@pytest.mark.parametrize("count", [23, 30, 100])
def test_a_split_over_many_sites_leaves_none_without_records(key, count):
    """The geometric shares once left the 23rd site and later ones empty, and the draw failed
    ("Probabilities do not sum to 1") from about 25 sites: the round benchmark could not run
    its 100 sites. Every site now gets at least MIN_SITE_RECORDS."""
    slugs = [f"site-{i}" for i in range(count)]
    sites = demo_split(key, slugs)
    sizes = [sites[s].num_records for s in slugs]
    assert min(sizes) >= MIN_SITE_RECORDS
    assert all(len(sites[s].y_train) == sites[s].num_records for s in slugs)
    train_total = TOTALS[key] - EXPECTED_SIZES[key][1]
    if MIN_SITE_RECORDS * count <= train_total and key != "lesions":
        # Room for every floor: the shares are still disjoint and cover the training part.
        assert sum(sizes) == train_total
        rows = {
            tuple(r)
            for s in slugs
            for r in sites[s].x_train.reshape(len(sites[s].x_train), -1).tolist()
        }
        assert len(rows) == train_total
    # Each site still draws its own label skew.
    labels = [np.bincount(sites[s].y_train.numpy().ravel(), minlength=2)[:2] for s in slugs]
    assert len({tuple(label) for label in labels}) > 1
    assert demo_split(key, slugs)[slugs[-1]].y_train.equal(sites[slugs[-1]].y_train)


def test_demo_split_for_other_slugs_and_seeds():
    three = demo_split("breast-cancer", ["a", "b", "c"])
    sizes = [three[s].num_records for s in "abc"]
    assert sum(sizes) == 455 and sizes[0] > sizes[1] > sizes[2]
    other_seed = demo_split("breast-cancer", ["a", "b", "c"], seed=1)
    assert not torch.equal(three["a"].y_train, other_seed["a"].y_train)
    assert site_fractions(4) == (0.35, 0.27, 0.21, 0.17)
    assert sum(site_fractions(7)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="distinct site slugs"):
        demo_split("digits", ["a", "a"])
    with pytest.raises(ValueError, match="not a bundled demo data set"):
        demo_split("imagenet", ["a"])


def test_bundled_set_shapes_and_preprocessing():
    bc = demo_split("breast-cancer", DEMO_SITES)["st-thomas"]
    assert bc.input_shape == [30] and bc.n_classes == 2 and bc.modality == "tabular"
    digits = demo_split("digits", DEMO_SITES)["barts"]
    assert digits.input_shape == [64] and digits.n_classes == 10
    assert float(digits.x_train.min()) >= 0.0 and float(digits.x_train.max()) <= 1.0
    lesions = demo_split("lesions", DEMO_SITES)["maudsley"]
    assert lesions.modality == "segmentation" and lesions.input_shape == [1, 32, 32]
    assert lesions.n_classes == 2 and list(lesions.y_train.shape[1:]) == [32, 32]
    assert set(lesions.y_train.unique().tolist()) == {0, 1}
    fraction = lesions.y_train.float().mean().item()
    assert 0.02 < fraction < 0.3  # lesions present but not dominant
    # Every image has at least one lesion pixel, and lesions are brighter than background.
    assert (lesions.y_train.flatten(1).sum(1) > 0).all()
    x = lesions.x_train[:, 0]
    assert x[lesions.y_train == 1].mean() > x[lesions.y_train == 0].mean() + 0.4
    x_val, y_val = load_validation_set("lesions")
    assert x_val.shape == (100, 1, 32, 32) and y_val.shape == (100, 32, 32)


def test_bundled_set_for_a_site_that_is_not_a_demo_site(tmp_path):
    with pytest.raises(ValueError, match="split among the demo sites"):
        load_site_data(data_root=tmp_path, dataset_key="digits", site_slug="elsewhere")


# --- a site's own files ----------------------------------------------------------------------


def _write(path, text):
    path.write_text(text)
    return path


def test_csv_adapter_reads_features_and_labels(tmp_path):
    _write(tmp_path / "cohort.csv", "age,label,bmi\n61,1,22.5\n45,0,30\n\n70,2,27.25\n")
    data = load_site_data(data_root=str(tmp_path), dataset_key="cohort", site_slug="x")
    assert data.modality == "tabular" and data.input_shape == [2] and data.n_classes == 3
    assert data.num_records == 3
    assert torch.equal(data.x_train, torch.tensor([[61.0, 22.5], [45.0, 30.0], [70.0, 27.25]]))
    assert torch.equal(data.y_train, torch.tensor([1, 0, 2]))


def test_own_files_take_precedence_over_bundled_sets(tmp_path):
    _write(tmp_path / "digits.csv", "f,label\n0.5,1\n0.25,0\n")
    data = load_site_data(data_root=tmp_path, dataset_key="digits", site_slug="st-thomas")
    assert data.num_records == 2 and data.input_shape == [1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b\n1,2\n", "no 'label' column in the header"),
        ("a,label\n1,0\nx,1\n", "line 3: non-numeric value 'x' in column 'a'"),
        ("a,label\n1,0\n,1\n", "line 3: non-numeric value '' in column 'a'"),
        ("a,label\nnan,0\n", "line 2: NaN value in column 'a'"),
        ("a,label\n1,0\n2,NaN\n", "line 3: NaN value in column 'label'"),
        ("a,label\ninf,0\n", "infinite value"),
        ("a,label\n1,0,3\n", "expected 2 values, got 3"),
        ("a,label\n1,0.5\n", "is not a class index"),
        ("a,label\n1,-1\n", "is not a class index"),
        ("a,label\n", "no records after the header"),
        ("label\n1\n", "no feature columns"),
        ("", "the file is empty"),
    ],
)
def test_csv_adapter_errors(tmp_path, text, message):
    _write(tmp_path / "s.csv", text)
    with pytest.raises(ValueError, match=message):
        load_site_data(data_root=tmp_path, dataset_key="s", site_slug="x")


def test_missing_data_set_error(tmp_path):
    with pytest.raises(ValueError) as info:
        load_site_data(data_root=tmp_path, dataset_key="ct-scans", site_slug="x")
    assert str(info.value) == (
        f"no data set 'ct-scans' under {tmp_path}: expected ct-scans.csv, ct-scans/images.npy "
        "or a folder ct-scans/ of PNG images"
    )
    with pytest.raises(ValueError, match="invalid data set key"):
        load_site_data(data_root=tmp_path, dataset_key="../etc", site_slug="x")


def _npy_dir(tmp_path, **arrays):
    folder = tmp_path / "scans"
    folder.mkdir()
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return folder


def test_npy_classification_adapter(tmp_path):
    rng = np.random.default_rng(0)
    _npy_dir(tmp_path, images=rng.random((5, 12, 10)), labels=np.array([0, 1, 1, 0, 3]))
    data = load_site_data(data_root=tmp_path, dataset_key="scans", site_slug="x")
    assert data.modality == "image" and data.input_shape == [1, 12, 10]
    assert data.n_classes == 4 and data.num_records == 5
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64


def test_npy_segmentation_adapter(tmp_path):
    rng = np.random.default_rng(0)
    masks = (rng.random((4, 1, 8, 8)) > 0.5).astype(np.uint8)
    _npy_dir(tmp_path, images=rng.random((4, 2, 8, 8)).astype(np.float32), masks=masks)
    data = load_site_data(data_root=tmp_path, dataset_key="scans", site_slug="x")
    assert data.modality == "segmentation" and data.input_shape == [2, 8, 8]
    assert data.y_train.shape == (4, 8, 8) and data.n_classes == 2
    assert torch.equal(data.y_train, torch.from_numpy(masks[:, 0].astype(np.int64)))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"images": np.zeros((3, 4, 4)), "labels": np.zeros(4)},
            "shape mismatch: images.npy has 3",
        ),
        (
            {"images": np.zeros((3, 4, 4)), "masks": np.zeros((3, 4, 5))},
            r"shape mismatch: masks.npy has shape \[3, 4, 5\], expected \[3, 4, 4\]",
        ),
        ({"images": np.full((2, 4, 4), np.nan), "labels": np.zeros(2)}, "NaN values"),
        ({"images": np.zeros((2, 4, 4)), "labels": np.array([0.0, np.nan])}, "NaN values"),
        ({"images": np.array([["a"], ["b"]]), "labels": np.zeros(2)}, "non-numeric values"),
        ({"images": np.zeros((2, 4, 4)), "labels": np.array([0.5, 1])}, "class indices"),
        ({"images": np.zeros((2, 4, 4))}, "has neither labels.npy"),
        (
            {"images": np.zeros((2, 4, 4)), "labels": np.zeros(2), "masks": np.zeros((2, 4, 4))},
            "holds both labels.npy",
        ),
        ({"images": np.zeros((2,)), "labels": np.zeros(2)}, "expected \\[N, features\\]"),
    ],
)
def test_npy_adapter_errors(tmp_path, arrays, message):
    _npy_dir(tmp_path, **arrays)
    with pytest.raises(ValueError, match=message):
        load_site_data(data_root=tmp_path, dataset_key="scans", site_slug="x")


def test_npy_adapter_refuses_pickled_arrays(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    np.save(folder / "images.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.save(folder / "labels.npy", np.zeros(2))
    with pytest.raises(ValueError, match="without unpickling"):
        load_site_data(data_root=tmp_path, dataset_key="scans", site_slug="x")


def _settled(path, seconds_ago=120):
    """Date the file back, as a site's data file is long before a round reads it."""
    import os
    import time

    back = time.time_ns() - seconds_ago * 10**9
    os.utime(path, ns=(back, back))
    return path


def test_a_sites_csv_is_parsed_once_while_it_stays_the_same_file(tmp_path, monkeypatch):
    from training.fl import data as data_module

    data_module._parsed_csv.clear()
    _settled(_write(tmp_path / "cohort.csv", "age,label\n61,1\n45,0\n"))
    parses = []
    real = data_module._read_csv
    monkeypatch.setattr(data_module, "_read_csv", lambda *a, **k: parses.append(1) or real(*a, **k))
    load = lambda: load_site_data(data_root=tmp_path, dataset_key="cohort", site_slug="x")  # noqa: E731

    first = load()
    first.x_train.add_(1000)  # a caller that trains in place changes only its own copy
    first.y_train.zero_()
    second = load()
    assert len(parses) == 1
    assert torch.equal(second.x_train, torch.tensor([[61.0], [45.0]]))
    assert torch.equal(second.y_train, torch.tensor([1, 0]))

    # Another file's records (a new write moves the time; size and inode may stay):
    _settled(_write(tmp_path / "cohort.csv", "age,label\n62,0\n46,1\n"), seconds_ago=60)
    third = load()
    assert len(parses) == 2 and torch.equal(third.y_train, torch.tensor([0, 1]))


def test_a_csv_written_just_now_is_read_every_time(tmp_path, monkeypatch):
    """Written within the file system's last tick, a second write of the same size could leave
    its time as it was: such a file is not kept until it has settled."""
    from training.fl import data as data_module

    data_module._parsed_csv.clear()
    _write(tmp_path / "fresh.csv", "a,label\n1,0\n")
    parses = []
    real = data_module._read_csv
    monkeypatch.setattr(data_module, "_read_csv", lambda *a, **k: parses.append(1) or real(*a, **k))
    for _ in range(2):
        load_site_data(data_root=tmp_path, dataset_key="fresh", site_slug="x")
    assert len(parses) == 2
    # A malformed file is refused every time, never kept.
    _settled(_write(tmp_path / "bad.csv", "a,label\nx,0\n"))
    for _ in range(2):
        with pytest.raises(ValueError, match="non-numeric value 'x'"):
            load_site_data(data_root=tmp_path, dataset_key="bad", site_slug="x")
