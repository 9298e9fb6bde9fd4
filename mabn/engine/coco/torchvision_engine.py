"""Mask R-CNN on COCO-format data with torchvision's detection models: box and mask AP."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...config import NormSpec
from ...data.coco import coco_dataset, collate_detection, num_classes
from ...detectors.coco_eval import detections_to_coco, evaluate_coco
from ...detectors.torchvision_maskrcnn import build_maskrcnn
from ..run import TrainingRun
from ..training import norm_layer_from_config
from .common import check_start, eval_every_steps_due, split_paths


def torchvision_options(detector_cfg) -> dict:
    """The detector config in torchvision's MaskRCNN argument names."""
    return {
        "rpn_pre_nms_top_n_train": detector_cfg.rpn_pre_nms_train,
        "rpn_post_nms_top_n_train": detector_cfg.rpn_post_nms_train,
        "rpn_pre_nms_top_n_test": detector_cfg.rpn_pre_nms_test,
        "rpn_post_nms_top_n_test": detector_cfg.rpn_post_nms_test,
        "rpn_batch_size_per_image": detector_cfg.rpn_anchors_per_image,
        "box_batch_size_per_image": detector_cfg.rois_per_image,
        "box_detections_per_img": detector_cfg.detections_per_image,
    }


class DetectionRun(TrainingRun):
    """torchvision Mask R-CNN with the configured norm; schedule in iterations."""

    collate_fn = staticmethod(collate_detection)

    def __init__(self, cfg, run_dir):
        super().__init__(cfg, run_dir, cfg.batch)

    def build(self):
        cfg = self.cfg
        check_start(cfg, self.norm)
        (train_images, train_json), (val_images, val_json) = split_paths(cfg.data, self.env.is_main)
        fraction, record = cfg.data.max_bad_fraction, lambda split: self.run_dir / f"unreadable_{split}.txt"
        train_set = coco_dataset(train_images, train_json, True, fraction, record("train"))
        val_set = coco_dataset(val_images, val_json, False, fraction, record("val"))
        self.coco_gt = val_set.coco
        limit = cfg.data.val_images_limit
        self.val_ids = list(val_set.ids[:limit] if limit else val_set.ids)
        val_set = val_set.first(limit)
        return build_detector(cfg, self.norm, num_classes(self.coco_gt)), train_set, val_set

    def schedule(self):
        return self.cfg.schedule.max_iter, list(self.cfg.schedule.steps), self.cfg.schedule.warmup_iters

    def evaluation_due(self) -> bool:
        return eval_every_steps_due(self.cfg, self.step)

    def loss(self, batch):
        images, targets = batch
        device = self.env.device
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [
            {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets
        ]
        losses = self.model(images, targets)
        return sum(losses.values()), {f"train/{k}": v.detach() for k, v in losses.items()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """COCO box and mask AP (%) on the validation images, over all processes."""
        self.model.eval()
        detections = {}  # image id -> its detections (an unreadable image's stand-in appears twice)
        for images, targets in self.loader(self.val_set, self.val_sampler()):
            with torch.autocast(self.env.device.type, enabled=self.amp):
                outputs = self.model([image.to(self.env.device) for image in images])
            for output, target in zip(outputs, targets):
                if int(target["image_id"]) not in detections:
                    output = {k: v.float().cpu() for k, v in output.items()}
                    detections[int(target["image_id"])] = detections_to_coco([output], [target["image_id"]])
        if dist.is_initialized():
            gathered = [None] * self.env.world_size
            dist.all_gather_object(gathered, detections)
            detections = {k: v for part in gathered for k, v in part.items()}
        results = [r for image_results in detections.values() for r in image_results]
        self.model.train()
        return {f"eval/{k}": v for k, v in evaluate_coco(self.coco_gt, results, img_ids=self.val_ids).items()}

    def summary(self, metrics):
        return {
            **{k.removeprefix("eval/"): v for k, v in metrics.items()},
            "start": self.cfg.start,
            "engine": "torchvision",
        }


def build_detector(cfg, norm: NormSpec, classes: int) -> torch.nn.Module:
    """torchvision Mask R-CNN of ``cfg.detector`` with ``norm`` for ``classes`` categories (the
    backbone's weights from ``cfg.weights``), not wired yet (``mabn.engine.training.wire``)."""
    detector = cfg.detector
    return build_maskrcnn(
        classes,
        norm_layer_from_config(norm),
        detector.backbone,
        cfg.weights,
        cfg.data.min_size,
        cfg.data.max_size,
        detector.channels,
        detector.fc_channels,
        **torchvision_options(detector),
    )


def train(cfg, run_dir) -> dict:
    """Run (or resume) Mask R-CNN training with torchvision in ``run_dir``; returns the summary."""
    return DetectionRun(cfg, run_dir).execute()
