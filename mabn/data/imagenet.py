"""ImageNet ImageFolder datasets with the paper's (fb.resnet.torch-style) augmentation."""

from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from .faults import DEFAULT_MAX_BAD_FRACTION, SkipUnreadable

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels on the [0, 1] scale (AlexNet / fb.resnet.torch).
EIGVAL = (0.2175, 0.0188, 0.0045)
EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(v2.Transform):
    """AlexNet PCA lighting noise: add eigvec @ (alpha * eigval), alpha ~ N(0, alphastd), per image."""

    _transformed_types = (tv_tensors.Image, lambda x: type(x) is torch.Tensor)

    def __init__(self, alphastd: float = 0.1, eigval=EIGVAL, eigvec=EIGVEC):
        super().__init__()
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval)
        self.eigvec = torch.tensor(eigvec)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        alpha = torch.randn(3) * self.alphastd
        return {"rgb": self.eigvec @ (alpha * self.eigval)}

    def transform(self, inpt: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        if not inpt.is_floating_point() or inpt.shape[-3] != 3:
            raise TypeError(
                f"Lighting expects a float RGB image [..., 3, H, W], got {inpt.dtype} {tuple(inpt.shape)}; "
                "put it after ToDtype(torch.float32, scale=True)"
            )
        out = inpt.as_subclass(torch.Tensor) + params["rgb"].to(inpt).view(3, 1, 1)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


def train_transform() -> v2.Compose:
    """RandomResizedCrop(224, scale 0.08-1) + flip + lighting 0.1 + normalize."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            Lighting(0.1),
            v2.Normalize(MEAN, STD),
        ]
    )


def val_transform() -> v2.Compose:
    """Resize(256) + CenterCrop(224) + normalize."""
    return v2.Compose(
        [
            v2.Resize(256, antialias=True),
            v2.CenterCrop(224),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


class ImageFiles(ImageFolder):
    """An ImageFolder that names its files (for ``faults.SkipUnreadable``)."""

    def image_path(self, index: int) -> str:
        return self.samples[index][0]


def image_files(folder: Path, transform) -> ImageFiles:
    """ImageFiles of ``folder``; no class folder, or an empty one, is a one-line error."""
    try:
        return ImageFiles(folder, transform=transform)
    except FileNotFoundError as error:  # torchvision's message names the classes, not the folder
        raise FileNotFoundError(
            f"{folder}: {str(error).strip().rstrip('.')}. Images go in {folder}/<wnid>/; "
            "remove empty class folders from both splits"
        ) from None


def imagenet_datasets(
    root: str | Path, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, record_dir: Path | None = None
) -> tuple[SkipUnreadable, SkipUnreadable]:
    """(train, val) image folders from root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG,
    with the same classes (a missing or empty class folder is an error); an unreadable image
    is replaced by the next readable one, up to ``max_bad_fraction`` (``faults``), and listed
    in ``record_dir``/unreadable_{train,val}.txt."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(
                f"ImageNet folder {root / split} missing: expected {root}/train/<wnid>/*.JPEG and "
                f"{root}/val/<wnid>/*.JPEG; set data.root=/path/to/imagenet"
            )
    train, val = image_files(root / "train", train_transform()), image_files(root / "val", val_transform())
    if train.classes != val.classes:
        only = lambda a, b: sorted(set(a.classes) - set(b.classes))[:3]
        raise FileNotFoundError(
            f"ImageNet train and val have different class folders (only in train: {only(train, val)}, "
            f"only in val: {only(val, train)}): give both splits the same <wnid> folders"
        )
    record = lambda split: Path(record_dir, f"unreadable_{split}.txt") if record_dir else None
    return (
        SkipUnreadable(train, max_bad_fraction, record("train")),
        SkipUnreadable(val, max_bad_fraction, record("val")),
    )
