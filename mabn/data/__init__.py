"""Datasets: Fashion-MNIST, synthetic images, ImageNet, COCO and the generated fashion_scenes set."""
