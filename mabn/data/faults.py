"""Image files that cannot be read (undecodable, truncated, listed but absent): each is
reported once with its path, counted, and replaced by the next readable sample, so a run
goes on and resumes exactly; past ``max_bad_fraction`` of the data set the run stops."""

from __future__ import annotations

import fcntl
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError, first_line

DEFAULT_MAX_BAD_FRACTION = 0.001


class TooManyBadImages(ConfigError):
    """The run's one-line stop (a ConfigError, so the entry points print it without a
    traceback). A DataLoader worker re-raises it with the worker's traceback as the message:
    only its last line, the original message, is kept."""

    def __init__(self, message: str):
        last = message.strip().splitlines()[-1]
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


def is_bad_file(error: Exception) -> bool:
    """A file that will never read (absent, undecodable, truncated, too large for PIL), as
    opposed to an I/O failure of the moment (EIO, too many open files), which should stop
    the run so that a relaunch resumes it exactly."""
    if isinstance(error, (FileNotFoundError, Image.DecompressionBombError)):
        return True
    return isinstance(error, OSError) and error.errno is None  # PIL's decoding errors carry no errno


class SkipUnreadable(Dataset):
    """``dataset`` (which gives ``image_path(i)``), where a file that cannot be read makes
    sample i the next readable sample after i, image and target together. Other attributes
    are the dataset's.

    ``record``: a text file listing the unreadable files (one path per line), shared by
    every loader process, epoch and relaunch of a run, so that each file is reported once
    and the limit counts all of them. Without it each process counts on its own."""

    def __init__(
        self,
        dataset,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
        record: Path | None = None,
        size: int | None = None,
    ):
        self.dataset, self.max_bad_fraction, self.record, self.bad_images = dataset, max_bad_fraction, record, {}
        self.size = min(size or len(dataset), len(dataset))

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("dataset", "max_bad_fraction", "record", "bad_images", "size"):
            raise AttributeError(name)  # not set yet (unpickling in a worker)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return self.size

    def first(self, size: int | None) -> SkipUnreadable:
        """The first ``size`` samples (all if None or 0): an unreadable one among them is
        replaced from among them, and ``max_bad_fraction`` counts them only."""
        return SkipUnreadable(self.dataset, self.max_bad_fraction, self.record, size)

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if i in self.bad_images:
                continue
            try:
                return self.dataset[i]
            except Exception as error:
                if not is_bad_file(error):
                    raise
                self._count(i, error)
        raise TooManyBadImages(f"none of the {len(self)} images can be read")

    def _count(self, index: int, error: Exception) -> None:
        """Record sample ``index`` as unreadable; stop past the limit, else warn (once per file)."""
        path = self.bad_images[index] = str(self.dataset.image_path(index))
        known = set(self.bad_images.values())
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # read and append as one step among the loader processes
                f.seek(0)
                recorded = set(f.read().splitlines())
                if path not in recorded:
                    f.write(path + "\n")
            known |= recorded
        count, allowed = len(known), int(self.max_bad_fraction * len(self))
        if count > allowed:
            raise TooManyBadImages(
                f"{count} of {len(self)} images cannot be read (e.g. {path}): more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows; fix or remove them, or raise it"
            )
        if self.record is None or path not in recorded:
            where = f", listed in {self.record}" if self.record else ""
            print(
                f"warning: cannot read image {path} ({first_line(error) or type(error).__name__}): using the "
                f"next readable one instead ({count} unreadable so far{where}; {allowed} allowed)",
                flush=True,
            )
