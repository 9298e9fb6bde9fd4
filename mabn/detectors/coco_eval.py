"""COCO box and mask AP for torchvision Mask R-CNN outputs, via pycocotools."""

import contextlib
import io
from collections.abc import Iterable, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

METRICS = ("AP", "AP50", "AP75")  # the first three entries of COCOeval.stats
MASK_THRESHOLD = 0.5


def detections_to_coco(outputs: Sequence[dict], image_ids: Sequence[int]) -> list[dict]:
    """COCO result dicts (bbox xywh, score, category_id, RLE segmentation) from Mask R-CNN eval outputs."""
    if len(outputs) != len(image_ids):
        raise ValueError(f"got {len(outputs)} outputs for {len(image_ids)} image ids; pass one id per output")
    results = []
    for output, image_id in zip(outputs, image_ids):
        boxes = output["boxes"].detach().cpu().clone()
        boxes[:, 2:] -= boxes[:, :2]
        masks = (output["masks"].detach().cpu()[:, 0] > MASK_THRESHOLD).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        for box, score, label, rle in zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist(), rles):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "bbox": box,
                    "score": float(score),
                    "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                }
            )
    return results


def _summarize(coco_gt: COCO, results: list[dict], iou_type: str, img_ids: list[int]) -> list[float]:
    """AP, AP50, AP75 in percent for one iou_type ("bbox" or "segm"); undefined (-1) counts as 0."""
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    evaluator.params.imgIds = img_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [100.0 * max(float(s), 0.0) for s in evaluator.stats[: len(METRICS)]]


def evaluate_coco(
    coco_gt: COCO, results: list[dict], img_ids: Iterable[int] | None = None, verbose: bool = False
) -> dict[str, float]:
    """box_/mask_ AP, AP50, AP75 (percent) over `img_ids` (default: the images in `results`)."""
    img_ids = sorted({r["image_id"] for r in results} if img_ids is None else set(img_ids))
    metrics = {f"{kind}_{m}": 0.0 for kind in ("box", "mask") for m in METRICS}
    if not results or not img_ids:
        return metrics
    # Without "bbox", loadRes takes areas from the masks, so mask AP uses mask areas for its size ranges.
    # loadRes adds keys to the dicts it gets, hence the copies.
    segm_results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        box = _summarize(coco_gt, [dict(r) for r in results], "bbox", img_ids)
        mask = _summarize(coco_gt, segm_results, "segm", img_ids)
    metrics.update({f"box_{m}": v for m, v in zip(METRICS, box)})
    metrics.update({f"mask_{m}": v for m, v in zip(METRICS, mask)})
    return metrics
