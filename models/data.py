"""Labelled images: Fashion-MNIST from Debian's package, "path label" list files; long-tailed splits, buckets."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
BUCKETS = ("many", "mid", "few")


class ArrayImages:
    """Images held as one uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        self.pixels, self.labels = pixels, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i])

    def subset(self, index: np.ndarray) -> ArrayImages:
        return ArrayImages(self.pixels[index], self.labels[index])

    def fingerprint(self) -> str:
        return hashlib.blake2b(self.pixels.tobytes(), digest_size=8).hexdigest()


class FileImages:
    """Images as files under a root folder, named by a list file."""

    def __init__(self, root: Path, paths: list[str], labels: np.ndarray):
        self.root, self.paths, self.labels = root, paths, labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        with Image.open(self.root / self.paths[i]) as im:
            im.load()
            return im

    def subset(self, index: np.ndarray) -> FileImages:
        return FileImages(self.root, [self.paths[i] for i in index], self.labels[index])

    def fingerprint(self) -> str:
        h = hashlib.blake2b(str(self.root.resolve()).encode(), digest_size=8)
        for p in self.paths:
            h.update(p.encode())
            h.update(str((self.root / p).stat().st_mtime_ns).encode())
        return h.hexdigest()


class AugmentedImages:
    """A seeded random view of each image of a set, the same every time it is asked for (so that features of
    it can be cached): a mirror image with probability 1/2 ("flip"), a shift by up to `shift` pixels each way
    with black fill ("shift"), or both ("flip+shift")."""

    def __init__(self, base: ArrayImages | FileImages, kind: str, seed: int, shift: int = 3):
        if kind not in ("flip", "shift", "flip+shift"):
            raise ValueError(f"augmentation must be flip, shift or flip+shift, not {kind!r}")
        self.base, self.kind, self.seed, self.shift = base, kind, seed, shift
        self.labels = base.labels

    def __len__(self) -> int:
        return len(self.base)

    def image(self, i: int) -> Image.Image:
        im = self.base.image(i)
        rng = np.random.default_rng((self.seed, i))
        if "flip" in self.kind and rng.random() < 0.5:
            im = ImageOps.mirror(im)
        if "shift" in self.kind:
            dx, dy = (int(v) for v in rng.integers(-self.shift, self.shift + 1, 2))
            im = im.transform(im.size, Image.Transform.AFFINE, (1, 0, dx, 0, 1, dy))
        return im

    def subset(self, index: np.ndarray) -> AugmentedImages:
        return AugmentedImages(self.base.subset(index), self.kind, self.seed, self.shift)

    def fingerprint(self) -> str:
        key = f"{self.base.fingerprint()}|{self.kind}|{self.seed}|{self.shift}"
        return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


ImageSet = ArrayImages | FileImages | AugmentedImages


@dataclass
class Part:
    """Some images of one pool, by index."""

    pool: str
    index: np.ndarray  # (n,) int64 into dataset.pools[pool]


@dataclass
class Dataset:
    name: str
    classes: list[str]
    pools: dict[str, ImageSet]  # the source image sets; features are encoded and cached per pool

    def labels(self, part: Part) -> np.ndarray:
        return self.pools[part.pool].labels[part.index]

    def subsample(self, sizes: dict[str, int], seed: int = 0) -> Dataset:
        """A smaller dataset, each named pool cut to a random subset of that size (quick builds, tests)."""
        rng = np.random.default_rng(seed)
        pools = {
            name: p.subset(np.sort(rng.permutation(len(p))[: sizes[name]])) if name in sizes else p
            for name, p in self.pools.items()
        }
        return Dataset(self.name, self.classes, pools)


@dataclass
class Splits:
    train: Part  # the long-tailed training set: the head's training queries and the downstream memory
    val: Part  # for choosing hyperparameters; never in the memory
    test: Part  # touched only for final figures; never in the memory
    external: Part | None  # images for the external memory (stand-in for web image-text pairs)


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist(root: Path = FASHION_MNIST_DIR) -> Dataset:
    if not (root / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}: apt-get install -y dataset-fashion-mnist")
    pools: dict[str, ImageSet] = {}
    for pool, prefix in (("train", "train"), ("test", "t10k")):
        x = _idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = _idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
        pools[pool] = ArrayImages(x, y)
    return Dataset("fashion-mnist", list(FASHION_MNIST_CLASSES), pools)


def long_tail_counts(n_max: int, num_classes: int, ratio: float) -> np.ndarray:
    """The exponential profile of CIFAR-LT / ImageNet-LT: n_i = n_max * ratio^(-i / (C - 1))."""
    i = np.arange(num_classes)
    return np.floor(n_max * ratio ** (-i / max(num_classes - 1, 1))).astype(np.int64)


def long_tailed_splits(dataset: Dataset, ratio: float = 1000.0, val_per_class: int = 200, seed: int = 0) -> Splits:
    """Carve a balanced validation set out of the training pool, draw an exponentially long-tailed training
    set from what is left (class 0 the head), and keep the rest for the external memory."""
    labels = dataset.pools["train"].labels
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(len(dataset.classes))]
    n_max = min(len(ix) for ix in by_class) - val_per_class
    counts = long_tail_counts(n_max, len(dataset.classes), ratio)
    val = np.concatenate([ix[:val_per_class] for ix in by_class])
    train = np.concatenate([ix[val_per_class : val_per_class + n] for ix, n in zip(by_class, counts, strict=True)])
    rest = np.concatenate([ix[val_per_class + n :] for ix, n in zip(by_class, counts, strict=True)])
    test = np.arange(len(dataset.pools["test"]))
    return Splits(
        Part("train", np.sort(train)), Part("train", np.sort(val)), Part("test", test), Part("train", np.sort(rest))
    )


def class_buckets(train_counts: np.ndarray) -> np.ndarray:
    """Per class: 'many' (> 100 training images), 'mid' (20-100) or 'few' (< 20)."""
    return np.where(train_counts > 100, "many", np.where(train_counts >= 20, "mid", "few"))


# ---------------------------------------------------------------- "relative/path label" list files


def read_list_file(path: Path, root: Path) -> FileImages:
    """The ImageNet-LT / Places-LT split format: one 'relative/path.jpg label' per line."""
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        rel, _, label = line.strip().rpartition(" ")
        if not rel or not label.isdigit():
            raise ValueError(f"{path}:{n}: expected 'relative/path label', got {line!r}")
        paths.append(rel)
        labels.append(int(label))
    return FileImages(root, paths, np.asarray(labels, np.int64))


def list_dataset(
    root: Path,
    train: Path,
    val: Path,
    test: Path,
    classes: Path | None = None,
    external: Path | None = None,
) -> tuple[Dataset, Splits]:
    """A user's dataset from list files over an image folder; its splits are taken as given."""
    pools: dict[str, ImageSet] = {
        "train": read_list_file(train, root),
        "val": read_list_file(val, root),
        "test": read_list_file(test, root),
    }
    if external is not None:
        pools["external"] = read_list_file(external, root)
    num_classes = 1 + max(int(p.labels.max()) for p in pools.values())
    names = classes.read_text().splitlines() if classes else [f"class {c}" for c in range(num_classes)]
    if len(names) < num_classes:
        raise ValueError(f"{classes} names {len(names)} classes, the lists use {num_classes}")
    whole = {name: Part(name, np.arange(len(p))) for name, p in pools.items()}
    splits = Splits(whole["train"], whole["val"], whole["test"], whole.get("external"))
    return Dataset(root.name, names, pools), splits
