"""Mask R-CNN training engines: torchvision's (``torchvision_engine``) and detectron2's
(``detectron2_*``, which import detectron2 only when imported themselves)."""
