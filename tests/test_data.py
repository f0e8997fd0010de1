from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import ArrayImages, Dataset, class_buckets, list_dataset, long_tail_counts, long_tailed_splits


def toy_dataset(per_class: int = 300, classes: int = 5) -> Dataset:
    labels = np.repeat(np.arange(classes), per_class)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
    test = ArrayImages(pixels[:50], labels[:50])
    return Dataset("toy", [f"c{i}" for i in range(classes)], {"train": ArrayImages(pixels, labels), "test": test})


def test_long_tail_profile_is_exponential_with_the_given_ratio() -> None:
    counts = long_tail_counts(5800, 10, 1000.0)
    assert counts[0] == 5800 and counts[-1] == 5  # 5800 / 1000, floored
    ratios = counts[:-1] / counts[1:]
    assert np.allclose(ratios[:6], 1000 ** (1 / 9), rtol=0.02)  # constant ratio between neighbours


def test_splits_are_disjoint_balanced_and_long_tailed() -> None:
    ds = toy_dataset()
    s = long_tailed_splits(ds, ratio=50.0, val_per_class=20, seed=3)
    train, val, rest = s.train.index, s.val.index, s.external.index  # type: ignore[union-attr]
    assert not (set(train) & set(val)) and not (set(train) & set(rest)) and not (set(val) & set(rest))
    assert len(train) + len(val) + len(rest) == len(ds.pools["train"])
    assert np.array_equal(np.bincount(ds.labels(s.val)), [20] * 5)
    assert np.array_equal(np.bincount(ds.labels(s.train)), long_tail_counts(280, 5, 50.0))
    again = long_tailed_splits(ds, ratio=50.0, val_per_class=20, seed=3)
    assert np.array_equal(again.train.index, train)  # a fixed seed gives the same split


def test_buckets_follow_the_paper_thresholds() -> None:
    assert list(class_buckets(np.array([101, 100, 20, 19, 0]))) == ["many", "mid", "mid", "few", "few"]


def test_list_files_load_an_image_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (10 + i, 12), (40 * i, 0, 0)).save(tmp_path / "imgs" / "a" / f"{i}.jpg")
    for name, rows in (("train", range(4)), ("val", [4]), ("test", [5])):
        (tmp_path / f"{name}.txt").write_text("".join(f"a/{i}.jpg {i % 2}\n" for i in rows) + "\n")
    (tmp_path / "classes.txt").write_text("even\nodd\n")
    ds, splits = list_dataset(
        tmp_path / "imgs", tmp_path / "train.txt", tmp_path / "val.txt", tmp_path / "test.txt", tmp_path / "classes.txt"
    )
    assert ds.classes == ["even", "odd"] and splits.external is None
    train = ds.pools["train"]
    assert len(train) == 4 and list(ds.labels(splits.train)) == [0, 1, 0, 1]
    assert train.image(3).size == (13, 12)
    assert train.fingerprint() == ds.pools["train"].fingerprint() != ds.pools["val"].fingerprint()


def test_malformed_list_lines_are_reported_with_their_line_number(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("a/0.jpg 1\na/1.jpg one\n")
    from models.data import read_list_file

    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_list_file(tmp_path / "bad.txt", tmp_path)
