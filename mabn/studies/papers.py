"""The papers' numbers that the studies print beside their own (docs/papers.md, MABN's results)."""

# ImageNet ResNet-50 top-1 error by normalization batch (authors' README/figure). GN: the GN
# paper's value at 32 images per GPU only (its other columns vary the SGD batch, not this).
PAPER_IMAGENET = {
    "bn": {32: 23.41, 16: 24.25, 8: 25.5, 4: 27.9, 2: 35.22},
    "brn": {32: 23.5, 16: 24.40, 8: 25.33, 4: 26.88, 2: 30.29},
    "mabn": {32: 23.54, 16: 23.73, 8: 23.62, 4: 23.73, 2: 23.67, 1: 23.73},
    "gn": {32: 24.1},
}
# COCO Mask R-CNN R50-FPN 2x, (start, norm) -> box AP, mask AP
PAPER_COCO = {
    ("scratch", "bn"): (32.38, 29.07),
    ("scratch", "brn"): (34.07, 30.98),
    ("scratch", "syncbn"): (36.80, 33.10),
    ("scratch", "mabn"): (36.50, 32.69),
    ("finetune", "syncbn"): (38.25, 34.22),
    ("finetune", "mabn"): (38.42, 34.12),
}
