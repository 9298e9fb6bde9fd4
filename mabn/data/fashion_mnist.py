"""Fashion-MNIST: IDX loading (local folder, Debian package or download) and a normalized dataset."""

import tempfile
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DOWNLOAD_DIR = Path("~/.cache/mabn")
CLASSES = (
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
)
# Pixel mean/std of the 60k training images on the [0, 1] scale.
MEAN, STD = 0.2860, 0.3530


def _idx_names(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find(folder: Path, name: str) -> Path | None:
    """The IDX file `name` in `folder`, plain or gzipped, or None."""
    return next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)


def _read_idx(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Images and labels from the IDX files in `folder`, or None if either file is missing."""
    paths = [_find(folder, name) for name in _idx_names(train)]
    if None in paths:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        plain = [extract_archive(p, tmp) if p.suffix == ".gz" else p for p in paths]
        return read_image_file(str(plain[0])), read_label_file(str(plain[1]))


def load_fashion_mnist(
    root: str | Path | None = None, train: bool = True, download_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as (uint8 images [N, 28, 28], int64 labels [N]).

    Looks in `root` if given, else the Debian package folder, else downloads with torchvision into
    `download_dir` (default ~/.cache/mabn).
    """
    if root is not None:
        data = _read_idx(Path(root), train)
        if data is None:
            images, labels = _idx_names(train)
            raise FileNotFoundError(
                f"Fashion-MNIST {images}[.gz] and {labels}[.gz] not found in {root}; "
                "point data.root=/path/with/idx/files at the folder holding them"
            )
        return data
    data = _read_idx(DEBIAN_DIR, train)
    if data is not None:
        return data
    download_dir = Path(download_dir or DEFAULT_DOWNLOAD_DIR).expanduser()
    try:
        dataset = torchvision.datasets.FashionMNIST(download_dir, train=train, download=True)
    except (OSError, RuntimeError) as err:
        raise FileNotFoundError(
            f"Fashion-MNIST not in {DEBIAN_DIR} and the download to {download_dir} failed; "
            "run `apt-get install dataset-fashion-mnist` or set data.root=/path/with/idx/files"
        ) from err
    return dataset.data, dataset.targets


class FashionMNIST(Dataset):
    """Fashion-MNIST as (normalized float image [1, 28, 28], int label); `augment` adds a random
    crop (padding 2) and a horizontal flip. The images stay one uint8 tensor in memory and a
    batch is made in a few tensor operations (``__getitems__``, which the DataLoader calls
    with a batch's indices): per-sample transforms cost more than the small ResNet's step."""

    num_classes = len(CLASSES)
    classes = CLASSES
    padding = 2

    def __init__(self, root: str | Path | None = None, train: bool = True, augment: bool = False):
        self.images, self.labels = load_fashion_mnist(root, train)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """The samples at ``indices``; augmentation draws from torch's global RNG."""
        images = self.images[indices]
        if self.augment:
            images = self._crop_and_flip(images)
        images = ((images.float() / 255 - MEAN) / STD).unsqueeze(1)
        return list(zip(images, self.labels[indices].tolist()))

    def _crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        """A random 28x28 crop of each zero-padded image, then a random horizontal flip."""
        n, size = len(images), images.shape[-1]
        padded = torch.nn.functional.pad(images, [self.padding] * 4)
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2))
        flips = torch.rand(n) < 0.5
        pixels = torch.arange(size)
        rows = (offsets[:, :1] + pixels)[:, :, None]
        cols = offsets[:, 1:] + torch.where(flips[:, None], pixels.flip(0), pixels)
        return padded[torch.arange(n)[:, None, None], rows, cols[:, None, :]]
