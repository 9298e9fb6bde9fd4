"""Deterministic synthetic classification images with a learnable class signal."""

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# Side of the coarse per-class pattern that is upsampled to the image size.
PATTERN_SIZE = 4


def _generator(*seeds: int) -> torch.Generator:
    """A torch.Generator seeded from a tuple of non-negative ints (each < 2**31)."""
    seed = 0
    for s in seeds:
        seed = (seed << 31) + s
    return torch.Generator().manual_seed(seed % 2**63)


class SyntheticImages(Dataset):
    """Sample i: label i % num_classes, image = the label's smooth pattern + unit Gaussian noise.

    Each sample depends on (seed, i) only, so it is identical in any process or worker.
    """

    def __init__(self, num_samples: int, num_classes: int, image_size: int, channels: int = 3, seed: int = 0):
        if min(num_samples, num_classes, image_size, channels) < 1:
            raise ValueError(
                f"SyntheticImages needs positive sizes, got num_samples={num_samples}, "
                f"num_classes={num_classes}, image_size={image_size}, channels={channels}; pass values >= 1"
            )
        self.num_samples, self.num_classes = num_samples, num_classes
        self.image_size, self.seed = image_size, seed
        self.patterns = torch.randn(num_classes, channels, PATTERN_SIZE, PATTERN_SIZE, generator=_generator(seed))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        label = index % self.num_classes
        signal = F.interpolate(
            self.patterns[label : label + 1], size=self.image_size, mode="bilinear", align_corners=False
        )[0]
        noise = torch.randn(signal.shape, generator=_generator(self.seed, index + 1))
        return signal + noise, label
