"""Datasets, the fashion_scenes generator and COCO evaluation, on real Fashion-MNIST and tiny generated data."""

import errno
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from markers import needs_debian
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mabn.data import fashion_mnist
from mabn.data.coco import CocoInstances, coco_dataset, coco_split_paths, collate_detection, num_classes
from mabn.data.fashion_mnist import FashionMNIST, load_fashion_mnist
from mabn.data.faults import SkipUnreadable, TooManyBadImages
from mabn.data.imagenet import Lighting, imagenet_datasets
from mabn.data.scenes import generate_fashion_scenes
from mabn.data.synthetic import SyntheticImages
from mabn.detectors.coco_eval import detections_to_coco, evaluate_coco
from mabn.engine.classification import subset

SCENES = dict(split="val", num_images=8, canvas_size=96)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# Fashion-MNIST


@needs_debian
def test_fashion_mnist_loads_from_debian_path():
    for train, n in ((True, 60000), (False, 10000)):
        images, labels = load_fashion_mnist(train=train)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert labels.unique().tolist() == list(range(10))


@needs_debian
def test_fashion_mnist_root_with_gzipped_or_plain_idx(tmp_path):
    reference = load_fashion_mnist(train=False)
    (tmp_path / "gz").mkdir(), (tmp_path / "plain").mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(fashion_mnist.DEBIAN_DIR / f"{name}.gz", tmp_path / "gz")
        with gzip.open(fashion_mnist.DEBIAN_DIR / f"{name}.gz") as f:
            (tmp_path / "plain" / name).write_bytes(f.read())
    for folder in ("gz", "plain"):
        images, labels = load_fashion_mnist(tmp_path / folder, train=False)
        assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1])


def test_fashion_mnist_bad_root_error(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        load_fashion_mnist(tmp_path, train=True)
    message = one_line(excinfo)
    assert str(tmp_path) in message and "train-images-idx3-ubyte" in message and "data.root=" in message


def test_fashion_mnist_no_source_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "absent")
    monkeypatch.setattr(fashion_mnist.torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(FileNotFoundError) as excinfo:
        load_fashion_mnist(download_dir=tmp_path)
    message = one_line(excinfo)
    assert "apt-get install dataset-fashion-mnist" in message and "data.root=" in message


@needs_debian
def test_fashion_mnist_normalization_constants_match_training_set():
    images, _ = load_fashion_mnist(train=True)
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum() / counts.sum()
    std = ((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()
    assert mean.item() == pytest.approx(fashion_mnist.MEAN, abs=5e-4)
    assert std.item() == pytest.approx(fashion_mnist.STD, abs=5e-4)


@needs_debian
def test_fashion_mnist_dataset_items():
    dataset = FashionMNIST(train=False)
    assert len(dataset) == 10000 and dataset.num_classes == len(dataset.classes) == 10
    assert dataset.classes[0] == "T-shirt/top" and dataset.classes[9] == "Ankle boot"
    batch = torch.stack([dataset[i][0] for i in range(500)])
    assert batch.shape == (500, 1, 28, 28) and batch.dtype == torch.float32
    assert abs(batch.mean().item()) < 0.1 and batch.std().item() == pytest.approx(1.0, abs=0.1)
    image, label = dataset[0]
    assert isinstance(label, int) and label == int(dataset.labels[0])
    assert torch.equal(image, dataset[0][0])

    augmented = FashionMNIST(train=False, augment=True)
    torch.manual_seed(0)
    views = torch.stack([augmented[0][0] for _ in range(8)])
    assert views.shape == (8, 1, 28, 28)
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(
        torch.stack([b[0] for b in dataset.__getitems__([3, 1, 4])]), torch.stack([dataset[i][0] for i in (3, 1, 4)])
    )


@needs_debian
def test_fashion_mnist_batched_crop_and_flip_are_the_per_sample_transforms(monkeypatch):
    """Each image of a batch gets its own crop of the zero-padded image and its own flip,
    as torchvision's RandomCrop(28, padding=2) + RandomHorizontalFlip would give it."""
    dataset = FashionMNIST(train=False, augment=True)
    offsets = torch.tensor([[2, 2], [0, 4], [3, 1]])
    flips = torch.tensor([False, True, True])
    monkeypatch.setattr(fashion_mnist.torch, "randint", lambda low, high, size: offsets)
    monkeypatch.setattr(fashion_mnist.torch, "rand", lambda n: torch.where(flips, 0.0, 1.0))
    images = dataset.images[[5, 6, 7]]
    got = dataset._crop_and_flip(images)
    padded = torch.nn.functional.pad(images, [2, 2, 2, 2])
    for i, ((top, left), flip) in enumerate(zip(offsets.tolist(), flips.tolist())):
        expected = padded[i, top : top + 28, left : left + 28]
        assert torch.equal(got[i], expected.flip(-1) if flip else expected)
    assert torch.equal(got[0], images[0])  # the centre crop without a flip is the image


# Synthetic images


def test_synthetic_images_are_deterministic_per_seed_and_index():
    a, b = SyntheticImages(20, 4, 16, seed=3), SyntheticImages(20, 4, 16, seed=3)
    image, label = a[7]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 7 % 4
    assert torch.equal(image, b[7][0]) and torch.equal(image, a[7][0])
    assert not torch.equal(image, a[11][0])
    assert not torch.equal(image, SyntheticImages(20, 4, 16, seed=4)[7][0])
    loader = torch.utils.data.DataLoader(a, batch_size=5, num_workers=2)
    images = torch.cat([x for x, _ in loader])
    assert torch.equal(images, torch.stack([a[i][0] for i in range(len(a))]))


def test_synthetic_images_carry_a_class_signal():
    dataset = SyntheticImages(400, 4, 8, seed=0)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).flatten(1)
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    train, test = slice(0, 200), slice(200, 400)
    means = torch.stack([images[train][labels[train] == k].mean(0) for k in range(4)])
    predicted = torch.cdist(images[test], means).argmin(1)
    assert (predicted == labels[test]).float().mean() > 0.9


def test_synthetic_images_reject_bad_sizes():
    with pytest.raises(ValueError) as excinfo:
        SyntheticImages(10, 0, 8)
    assert "num_classes=0" in one_line(excinfo)


# ImageNet


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (root / split / wnid).mkdir(parents=True)
            for i, size in enumerate(((300, 260), (180, 240))):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG")
    return root


def test_imagenet_datasets_load_standard_layout(imagenet_root):
    train, val = imagenet_datasets(imagenet_root)
    assert len(train) == len(val) == 4 and train.classes == val.classes == ["n01440764", "n01443537"]
    for dataset in (train, val):
        for i in range(len(dataset)):
            image, label = dataset[i]
            assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label in (0, 1)
    assert torch.equal(val[0][0], val[0][0])
    torch.manual_seed(0)
    assert not torch.equal(train[0][0], train[0][0])


def test_imagenet_missing_layout_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError) as excinfo:
        imagenet_datasets(tmp_path)
    message = one_line(excinfo)
    assert str(tmp_path / "val") in message and "data.root=/path/to/imagenet" in message


@pytest.fixture
def faulty_imagenet(imagenet_root, tmp_path):
    """A copy of the tiny ImageNet folder with one undecodable JPEG in each split."""
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_root, root)
    for split in ("train", "val"):
        (root / split / "n01440764" / "n01440764_1.JPEG").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_an_unreadable_image_is_reported_once_and_replaced_by_the_next_readable_one(faulty_imagenet, capsys):
    train, val = imagenet_datasets(faulty_imagenet, max_bad_fraction=0.25)  # 1 of 4 allowed
    bad_path = str(faulty_imagenet / "val" / "n01440764" / "n01440764_1.JPEG")
    assert val.image_path(1) == bad_path
    for _ in range(2):
        image, label = val[1]
        assert torch.equal(image, val[2][0]) and label == val[2][1] == 1  # the next readable sample
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and bad_path in warnings[0] and "(1 unreadable so far; 1 allowed)" in warnings[0]
    assert val.bad_images == {1: bad_path}
    torch.manual_seed(0)
    first = train[1]
    torch.manual_seed(0)
    assert torch.equal(first[0], train[2][0])  # deterministic: the same draws as the replacement's own


def test_the_record_file_reports_each_file_once_per_run(faulty_imagenet, tmp_path, capsys):
    for _ in range(2):  # two epochs' loader processes, or a relaunch: fresh datasets, one record
        _, val = imagenet_datasets(faulty_imagenet, max_bad_fraction=0.25, record_dir=tmp_path)
        val[1]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"listed in {tmp_path / 'unreadable_val.txt'}" in warnings[0]
    assert (tmp_path / "unreadable_val.txt").read_text() == val.image_path(1) + "\n"


@pytest.mark.multiprocess
def test_the_limit_counts_the_bad_files_of_every_loader_worker(faulty_imagenet, tmp_path):
    # 2 bad of 4, 1 allowed, one in each worker's share: each worker alone sees 1
    bad = faulty_imagenet / "val" / "n01443537" / "n01443537_0.JPEG"
    bad.write_bytes(b"not an image")
    message = "2 of 4 images cannot be read (e.g. {}): more than data.max_bad_fraction=0.25 allows"
    _, val = imagenet_datasets(faulty_imagenet, max_bad_fraction=0.25, record_dir=tmp_path)
    loader = torch.utils.data.DataLoader(val, batch_size=1, num_workers=2)
    with pytest.raises(TooManyBadImages) as excinfo:
        list(loader)
    assert one_line(excinfo).startswith(message.split(" (e.g.")[0])
    _, val = imagenet_datasets(faulty_imagenet, max_bad_fraction=0.25)  # no record: the process's own count
    with pytest.raises(TooManyBadImages) as excinfo:
        val[1]  # its replacement, sample 2, is the second bad file
    assert one_line(excinfo).startswith(message.format(bad))


def test_a_limited_data_set_replaces_and_counts_within_its_limit(faulty_imagenet):
    _, val = imagenet_datasets(faulty_imagenet, max_bad_fraction=0.5)
    first_two = subset(val, 2)  # data.val_samples_limit=2: sample 1 is bad
    image, label = first_two[1]
    assert len(first_two) == 2 and torch.equal(image, val[0][0]) and label == 0  # not sample 2, past the limit
    _, val = imagenet_datasets(faulty_imagenet, max_bad_fraction=0.25)  # 1 of 4 allowed, 0 of 2
    with pytest.raises(TooManyBadImages, match="1 of 2 images cannot be read"):
        subset(val, 2)[1]


def test_an_io_failure_of_the_moment_is_not_a_bad_file():
    class Flaky(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError, match="Input/output error"):
        SkipUnreadable(Flaky())[0]


def test_an_image_listed_but_absent_is_replaced_like_an_unreadable_one(imagenet_root, tmp_path, capsys):
    shutil.copytree(imagenet_root, tmp_path / "imagenet")
    _, val = imagenet_datasets(tmp_path / "imagenet", max_bad_fraction=0.25)
    (tmp_path / "imagenet" / "val" / "n01443537" / "n01443537_1.JPEG").unlink()
    assert torch.equal(val[3][0], val[0][0])  # the last one wraps around to the first
    assert "No such file" in capsys.readouterr().out


@pytest.mark.parametrize(
    "fault,message",
    [
        (
            lambda root: shutil.rmtree(root / "val" / "n01443537"),
            "ImageNet train and val have different class folders (only in train: ['n01443537'], only in val: [])",
        ),
        (
            lambda root: [p.unlink() for p in (root / "train" / "n01443537").iterdir()],
            "train: Found no valid file for the classes n01443537.",
        ),
    ],
)
def test_a_missing_or_empty_class_folder_is_one_line(fault, message, imagenet_root, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_root, root)
    fault(root)
    with pytest.raises(FileNotFoundError) as excinfo:
        imagenet_datasets(root)
    assert message in one_line(excinfo)


def test_lighting_adds_one_rgb_offset_per_image():
    torch.manual_seed(0)
    image = torch.rand(3, 5, 7)
    shifted = Lighting(0.1)(image)
    offset = shifted - image
    assert offset.abs().max() > 0
    assert torch.allclose(offset, offset[:, :1, :1].expand_as(offset), atol=1e-6)
    assert torch.equal(Lighting(0.0)(image), image)
    with pytest.raises(TypeError):
        Lighting(0.1)(torch.zeros(3, 4, 4, dtype=torch.uint8))


# fashion_scenes


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_fashion_scenes(tmp_path_factory.mktemp("scenes"), **SCENES)


@needs_debian
def test_scenes_are_deterministic_and_cached(scenes, tmp_path):
    again = generate_fashion_scenes(tmp_path, **SCENES)
    assert json.loads(again.read_text()) == json.loads(scenes.read_text())
    for name in sorted(p.name for p in (scenes.parent.parent / "val").iterdir()):
        assert (tmp_path / "val" / name).read_bytes() == (scenes.parent.parent / "val" / name).read_bytes()
    mtime = again.stat().st_mtime_ns
    assert generate_fashion_scenes(tmp_path, **SCENES) == again and again.stat().st_mtime_ns == mtime
    generate_fashion_scenes(tmp_path, **SCENES, seed=1)
    assert json.loads(again.read_text()) != json.loads(scenes.read_text())
    assert not list(again.parent.glob("*.tmp"))


@needs_debian
def test_a_reader_beside_a_second_generator_never_sees_a_half_written_scene(scenes, tmp_path):
    """Jobs side by side on a fresh data root both generate; the first to finish starts reading
    while the other still writes the same files."""
    import threading

    shutil.copytree(scenes.parent.parent, tmp_path, dirs_exist_ok=True)
    (tmp_path / "annotations" / scenes.name).unlink()  # the second job did not find the first's json
    images = sorted((tmp_path / "val").glob("*.png"))
    writer = threading.Thread(target=generate_fashion_scenes, args=(tmp_path,), kwargs=SCENES)
    writer.start()
    reads = 0
    while writer.is_alive() or not reads:
        for path in images:
            with Image.open(path) as image:
                image.load()
            reads += 1
    writer.join()
    assert not list((tmp_path / "val").glob("*.tmp")) and (tmp_path / "annotations" / scenes.name).is_file()


@needs_debian
def test_scenes_masks_match_boxes_areas_and_pixels(scenes):
    data = json.loads(scenes.read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    assert len(data["images"]) == 8 and data["info"]["params"]["canvas_size"] == 96
    by_image = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    overlapping_boxes = 0
    for image in data["images"]:
        pixels = np.asarray(Image.open(scenes.parent.parent / "val" / image["file_name"]))
        assert pixels.shape == (96, 96, 3)
        anns = by_image[image["id"]]
        assert anns
        masks = np.stack([mask_utils.decode(a["segmentation"]) for a in anns]).astype(bool)
        assert masks.sum(0).max() == 1  # visible masks are disjoint: occluded pixels belong to the top item
        for ann, mask in zip(anns, masks):
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
            assert mask.sum() == ann["area"]
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert pixels[mask].max(axis=1).min() > 0
        for i in range(len(anns)):
            for j in range(i):
                (ax, ay, aw, ah), (bx, by, bw, bh) = anns[i]["bbox"], anns[j]["bbox"]
                overlapping_boxes += ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
    assert overlapping_boxes > 0


def test_scenes_reject_bad_arguments(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        generate_fashion_scenes(tmp_path, split="dev")
    assert "'dev'" in one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        generate_fashion_scenes(tmp_path, canvas_size=20)
    assert "canvas_size=20" in one_line(excinfo)


# COCO evaluation


def gt_as_results(coco: COCO) -> list[dict]:
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "segmentation": a["segmentation"],
            "score": 1.0,
        }
        for a in coco.dataset["annotations"]
    ]


@needs_debian
def test_evaluate_coco_ground_truth_scores_100_and_perturbed_less(scenes):
    coco = COCO(str(scenes))
    metrics = evaluate_coco(coco, gt_as_results(coco))
    assert set(metrics) == {f"{k}_{m}" for k in ("box", "mask") for m in ("AP", "AP50", "AP75")}
    assert all(v == pytest.approx(100.0) for v in metrics.values())

    perturbed = []
    for r in gt_as_results(coco):
        x, y, w, h = r["bbox"]
        shifted = np.roll(mask_utils.decode(r["segmentation"]), 4, axis=1)
        rle = mask_utils.encode(np.asfortranarray(shifted))
        perturbed.append(
            {**r, "bbox": [x + w / 3, y, w, h], "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}
        )
    worse = evaluate_coco(coco, perturbed)
    assert worse["box_AP"] < 100 and worse["mask_AP"] < 100

    assert all(v == 0.0 for v in evaluate_coco(coco, []).values())
    # Images listed in img_ids but absent from the results count as misses.
    first = [r for r in gt_as_results(coco) if r["image_id"] == 1]
    assert evaluate_coco(coco, first)["box_AP"] == pytest.approx(100.0)
    assert evaluate_coco(coco, first, img_ids=coco.getImgIds())["box_AP"] < 100


@needs_debian
def test_detections_to_coco_round_trip(scenes):
    coco = COCO(str(scenes))
    outputs, image_ids = [], coco.getImgIds()
    for image_id in image_ids:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        boxes = torch.tensor([a["bbox"] for a in anns])
        boxes[:, 2:] += boxes[:, :2]
        masks = torch.tensor(np.stack([coco.annToMask(a) for a in anns]), dtype=torch.float32)
        outputs.append(
            {
                "boxes": boxes,
                "scores": torch.linspace(1.0, 0.5, len(anns)),
                "labels": torch.tensor([a["category_id"] for a in anns]),
                "masks": (0.2 + 0.6 * masks)[:, None],
            }
        )
    outputs.append(
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, 96, 96),
        }
    )
    results = detections_to_coco(outputs, [*image_ids, image_ids[0]])
    assert len(results) == len(coco.dataset["annotations"])
    assert np.allclose([r["bbox"] for r in results], [a["bbox"] for a in coco.loadAnns(coco.getAnnIds())])
    json.dumps(results)
    assert all(v == pytest.approx(100.0) for v in evaluate_coco(coco, results).values())
    with pytest.raises(ValueError):
        detections_to_coco(outputs, image_ids)


# COCO datasets


def test_coco_split_paths_layouts_and_error(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    assert coco_split_paths(tmp_path, "val") == (tmp_path / "val2017", tmp_path / "annotations/instances_val2017.json")
    (tmp_path / "train").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    assert coco_split_paths(tmp_path, "train") == (tmp_path / "train", tmp_path / "annotations/instances_train.json")
    with pytest.raises(FileNotFoundError) as excinfo:
        coco_split_paths(tmp_path, "test")
    message = one_line(excinfo)
    assert "instances_test2017.json" in message and "data.root=/path/to/coco" in message


def test_an_annotation_file_that_does_not_parse_is_one_line_naming_it(tmp_path):
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(ValueError) as excinfo:
        CocoInstances(tmp_path, tmp_path / "broken.json", train=False)
    assert one_line(excinfo).startswith(f"annotation file {tmp_path / 'broken.json'} is not COCO-format json")


@needs_debian
def test_a_coco_image_listed_but_absent_is_replaced_by_the_next_one(scenes, tmp_path, capsys):
    image_dir, annotation_json = coco_split_paths(scenes.parent.parent, "val")
    shutil.copytree(image_dir, tmp_path / "val")
    val = coco_dataset(tmp_path / "val", annotation_json, train=False, max_bad_fraction=0.2)
    Path(val.image_path(2)).unlink()
    assert val[2][1]["image_id"] == val[3][1]["image_id"] == val.ids[3]
    assert val.image_path(2) in capsys.readouterr().out
    Path(val.image_path(5)).write_bytes(b"truncated")
    with pytest.raises(TooManyBadImages, match="2 of 8 images cannot be read"):
        val[5]


@needs_debian
def test_coco_dataset_samples_from_scenes(scenes):
    image_dir, annotation_json = coco_split_paths(scenes.parent.parent, "val")
    val = coco_dataset(image_dir, annotation_json, train=False)
    assert num_classes(val.coco) == 11 and len(val) == 8
    image, target = val[0]
    png = torch.from_numpy(np.array(Image.open(image_dir / val.coco.imgs[val.ids[0]]["file_name"])))
    assert torch.allclose(image, png.permute(2, 0, 1).float() / 255)

    train = coco_dataset(image_dir, annotation_json, train=True)
    torch.manual_seed(0)
    for index in list(range(len(train))) * 2:
        image, target = train[index]
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        boxes, labels, masks = target["boxes"], target["labels"], target["masks"]
        n = len(val.coco.getAnnIds(imgIds=target["image_id"]))
        assert boxes.shape == (n, 4) and labels.shape == (n,) and masks.shape == (n, 96, 96)
        assert labels.dtype == torch.int64 and masks.dtype == torch.uint8
        assert labels.min() >= 1 and labels.max() <= 10
        for box, mask in zip(boxes, masks):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (image[:, ys, xs].amax(0) > 0).all()
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]

    loader = torch.utils.data.DataLoader(train, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == len(targets) == 3 and "masks" in targets[0]
