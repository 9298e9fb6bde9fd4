"""Image files that cannot be read (undecodable, truncated, listed but absent): each is
reported once with its path, counted, and replaced by the next readable sample, so a run
goes on and resumes exactly; past ``max_bad_fraction`` of the data set the run stops."""

from __future__ import annotations

from torch.utils.data import Dataset

from ..config import ConfigError

DEFAULT_MAX_BAD_FRACTION = 0.001


class TooManyBadImages(ConfigError):
    """The one-line stop; a DataLoader worker re-raises it with the worker's traceback as
    its message, of which the last line is the original one."""

    def __init__(self, message: str):
        last = message.strip().splitlines()[-1]
        super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])


class SkipUnreadable(Dataset):
    """``dataset`` (which gives ``image_path(i)``), where an ``OSError`` while reading sample i
    (PIL's undecodable and truncated files, a missing file) makes it the next readable sample
    after i, image and target together. Other attributes are the dataset's. Each loader
    process keeps its own count (with workers, a bad file is reported once per worker at most)."""

    def __init__(self, dataset, max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION):
        self.dataset, self.max_bad_fraction, self.bad_images = dataset, max_bad_fraction, {}

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("dataset", "max_bad_fraction", "bad_images"):
            raise AttributeError(name)  # not set yet (unpickling in a worker)
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if i in self.bad_images:
                continue
            try:
                return self.dataset[i]
            except OSError as error:
                self.bad_images[i] = self.dataset.image_path(i)
                self._report(i, error)
        raise TooManyBadImages(f"none of the {len(self)} images can be read")

    def _report(self, index: int, error: OSError) -> None:
        path, count = self.bad_images[index], len(self.bad_images)
        allowed = int(self.max_bad_fraction * len(self))
        if count > allowed:
            raise TooManyBadImages(
                f"{count} of {len(self)} images cannot be read (e.g. {path}): more than "
                f"data.max_bad_fraction={self.max_bad_fraction} allows; fix or remove them, or raise it")
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        print(f"warning: cannot read image {path} ({reason}): using the next readable one instead "
              f"({count} unreadable so far, {allowed} allowed)", flush=True)
