"""COCO instance segmentation datasets for torchvision's Mask R-CNN (CocoDetection + transforms v2)."""

import json
from pathlib import Path

import torch
from pycocotools.coco import COCO
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from ..config import first_line
from .faults import DEFAULT_MAX_BAD_FRACTION, SkipUnreadable

TARGET_KEYS = {"boxes", "labels", "masks", "image_id"}


def coco_split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image_dir, annotation_json) for `split` in root: the COCO 2017 layout or the fashion_scenes one."""
    root = Path(root)
    for name in (f"{split}2017", split):
        image_dir, annotation_json = root / name, root / "annotations" / f"instances_{name}.json"
        if image_dir.is_dir() and annotation_json.is_file():
            return image_dir, annotation_json
    raise FileNotFoundError(
        f"no COCO split {split!r} in {root}: expected {root}/annotations/instances_{split}2017.json with "
        f"{root}/{split}2017/ (or instances_{split}.json with {root}/{split}/); set data.root=/path/to/coco"
    )


class CocoInstances(CocoDetection):
    """CocoDetection without crowd regions (ignore areas, not instances); `train` skips images left empty."""

    def __init__(self, image_dir: str | Path, annotation_json: str | Path, train: bool, transforms=None):
        try:
            super().__init__(str(image_dir), str(annotation_json), transforms=transforms)
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"annotation file {annotation_json} is not COCO-format json ({type(error).__name__}: "
                f"{first_line(error, 120)}): fix or regenerate it"
            ) from None
        if train:
            self.ids = [i for i in self.ids if self._load_target(i)]

    def image_path(self, index: int) -> str:
        return str(Path(self.root, self.coco.loadImgs(self.ids[index])[0]["file_name"]))

    def _load_target(self, id: int) -> list[dict]:
        return [a for a in super()._load_target(id) if not a.get("iscrowd", 0)]


def coco_dataset(
    image_dir: str | Path,
    annotation_json: str | Path,
    train: bool,
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    record: Path | None = None,
):
    """(float image [3, H, W] in [0, 1], {boxes xyxy, labels = category ids, masks, image_id}) samples.

    Training adds a random horizontal flip; `.coco` is the pycocotools ground truth. An
    unreadable or absent image is replaced by the next readable one (``faults``; listed in ``record``).
    """
    augmentation = [v2.RandomHorizontalFlip()] if train else []
    transforms = v2.Compose(
        [
            v2.ToImage(),
            *augmentation,
            v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(),
        ]
    )
    instances = CocoInstances(image_dir, annotation_json, train, transforms=transforms)
    return SkipUnreadable(wrap_dataset_for_transforms_v2(instances, target_keys=TARGET_KEYS), max_bad_fraction, record)


def num_classes(coco: COCO) -> int:
    """Mask R-CNN class count with raw category ids as labels: max id + 1 (0 is background)."""
    return max(coco.getCatIds()) + 1


def collate_detection(batch: list[tuple]) -> tuple[list, list]:
    """(list of images, list of targets), the input format of torchvision detection models."""
    images, targets = zip(*batch)
    return list(images), list(targets)
