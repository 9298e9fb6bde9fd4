"""fashion_scenes: a generated COCO-format instance segmentation set of Fashion-MNIST items on canvases."""

import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from mabn.data.fashion_mnist import CLASSES, load_fashion_mnist

VERSION = 1  # bump when the generator's output changes, so cached sets are regenerated
SPLITS = ("train", "val", "test")  # train draws from the Fashion-MNIST train IDX, the others from t10k
SCALE_RANGE = (1.0, 3.0)
FOREGROUND_THRESHOLD = 32  # item pixels brighter than this (0-255) belong to the instance
MIN_VISIBLE_AREA = 40  # instances with fewer visible pixels are not annotated
ITEM_SIZE = 28


def _check_args(split: str, num_images: int, canvas_size: int, items_per_image: tuple[int, int]) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown fashion_scenes split {split!r}; use one of {', '.join(SPLITS)}")
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be >= 1")
    if canvas_size < ITEM_SIZE:
        raise ValueError(f"canvas_size={canvas_size} is smaller than a {ITEM_SIZE}px item; use >= {ITEM_SIZE}")
    low, high = items_per_image
    if not 1 <= low <= high:
        raise ValueError(f"items_per_image={tuple(items_per_image)} must be (low, high) with 1 <= low <= high")


def _compose(rng: np.random.Generator, images, labels, canvas_size: int, items_per_image) -> tuple:
    """One RGB canvas, the index of the item visible at each pixel (-1: none) and the items' labels."""
    canvas = np.zeros((canvas_size, canvas_size, 3), np.uint8)
    owner = np.full((canvas_size, canvas_size), -1, np.int64)
    item_labels = []
    for k in range(rng.integers(items_per_image[0], items_per_image[1] + 1)):
        index = rng.integers(len(labels))
        size = min(canvas_size, round(ITEM_SIZE * rng.uniform(*SCALE_RANGE)))
        item = np.asarray(Image.fromarray(images[index]).resize((size, size), Image.BILINEAR))
        y, x = rng.integers(0, canvas_size - size + 1, size=2)
        color = rng.uniform(0.5, 1.0, size=3)
        foreground = item > FOREGROUND_THRESHOLD
        region = (slice(y, y + size), slice(x, x + size))
        canvas[region][foreground] = (item[foreground, None] * color).astype(np.uint8)
        owner[region][foreground] = k
        item_labels.append(int(labels[index]))
    return canvas, owner, item_labels


def _annotations(owner: np.ndarray, item_labels: list[int], image_id: int, first_id: int) -> list[dict]:
    """COCO annotations (RLE of each item's visible pixels) for the items visible enough."""
    annotations = []
    for k, label in enumerate(item_labels):
        visible = owner == k
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA:
            continue
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        annotations.append(
            {
                "id": first_id + len(annotations),
                "image_id": image_id,
                "category_id": label + 1,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": area,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "iscrowd": 0,
            }
        )
    return annotations


def _write_json_atomic(data: dict, path: Path) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(data, f)
    os.replace(f.name, path)


def _save_png_atomic(image: Image.Image, path: Path) -> None:
    """Jobs side by side may generate the same scenes: a reader never sees a half-written file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        image.save(f, format="PNG")
    os.replace(f.name, path)


def generate_fashion_scenes(
    out_dir: str | Path,
    split: str = "train",
    num_images: int = 1000,
    canvas_size: int = 128,
    items_per_image: tuple[int, int] = (2, 5),
    seed: int = 0,
    fashion_root: str | Path | None = None,
) -> Path:
    """Write out_dir/<split>/*.png and out_dir/annotations/instances_<split>.json; return the json path.

    Items are scaled 1-3x, placed at random and may overlap (later ones occlude earlier ones).
    Image i depends only on (seed, split, i). An existing json with the same parameters is reused.
    """
    _check_args(split, num_images, canvas_size, items_per_image)
    out_dir = Path(out_dir)
    json_path = out_dir / "annotations" / f"instances_{split}.json"
    params = {
        "generator": "fashion_scenes",
        "version": VERSION,
        "split": split,
        "num_images": num_images,
        "canvas_size": canvas_size,
        "items_per_image": list(items_per_image),
        "seed": seed,
        "fashion_root": None if fashion_root is None else str(fashion_root),
        "scale_range": list(SCALE_RANGE),
        "foreground_threshold": FOREGROUND_THRESHOLD,
        "min_visible_area": MIN_VISIBLE_AREA,
    }
    if json_path.is_file():
        with open(json_path) as f:
            if json.load(f).get("info", {}).get("params") == params:
                return json_path

    images, labels = load_fashion_mnist(fashion_root, train=split == "train")
    images, labels = images.numpy(), labels.numpy()
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    coco_images, coco_annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        canvas, owner, item_labels = _compose(rng, images, labels, canvas_size, items_per_image)
        file_name = f"{i:06d}.png"
        _save_png_atomic(Image.fromarray(canvas, "RGB"), image_dir / file_name)
        coco_images.append({"id": i + 1, "file_name": file_name, "width": canvas_size, "height": canvas_size})
        coco_annotations += _annotations(owner, item_labels, i + 1, len(coco_annotations) + 1)
    _write_json_atomic(
        {
            "info": {"description": "fashion_scenes: Fashion-MNIST items composited on canvases", "params": params},
            "images": coco_images,
            "annotations": coco_annotations,
            "categories": [{"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(CLASSES)],
        },
        json_path,
    )
    return json_path
