"""Image classification data: folder-per-class image folders, Hub datasets, and Debian's Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from .errors import DataError
from .sources import load_folder, load_hub

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def load_image_folder(root: str | Path, option: str = "--image-root") -> DatasetDict:
    """An image folder: ``root/<class>/<image>``, or ``root/<split>/<class>/<image>`` with ``train``,
    ``validation`` or ``test`` split folders; classes are named after their folders."""
    return load_folder(root, option, builder="imagefolder")


def load_image_task(repo: str, image_root: str | None = None) -> DatasetDict:
    """A Hub image dataset, or the same classes from a local image folder (offline)."""
    return load_hub(repo, None, "--image-root") if image_root is None else load_image_folder(image_root)


def load_fashion_mnist(data_dir: str | None = None) -> DatasetDict:
    """Fashion-MNIST's train and test splits from its IDX files (Debian package ``dataset-fashion-mnist``)."""
    folder = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    files = {split: (folder / f"{stem}-images-idx3-ubyte.gz", folder / f"{stem}-labels-idx1-ubyte.gz")
             for split, stem in FASHION_MNIST_FILES.items()}
    missing = [path.name for pair in files.values() for path in pair if not path.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST files {', '.join(missing)} not found in {folder}; install them with "
                        "`apt-get install dataset-fashion-mnist` or pass --data-dir with the IDX .gz files")
    features = Features({"image": Image(), "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})
    return DatasetDict({split: Dataset.from_dict({"image": list(read_idx(images)), "label": read_idx(labels)},
                                                 features=features)
                        for split, (images, labels) in files.items()})


def read_idx(path: Path) -> np.ndarray:
    """The unsigned-byte array of a gzipped IDX file (big-endian header: magic ``0 0 8 ndim``, then the sizes)."""
    raw = gzip.decompress(path.read_bytes())
    if raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path} is not an unsigned-byte IDX file; use the original Fashion-MNIST files")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * axis: 8 + 4 * axis], "big") for axis in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
