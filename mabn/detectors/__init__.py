"""Detection helpers for Mask R-CNN: COCO-format results and evaluation."""
