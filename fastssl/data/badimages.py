"""Unreadable images, for every loader: one quick check on the bytes, one skip policy.

`image_problem(data)` finds, without decoding, what most broken files in real folders are: an
empty file, a file that is not an image at all, and a JPEG or PNG cut short (an interrupted
download or copy). Decoders differ on these (libjpeg pads a cut JPEG with grey and carries on,
nvJPEG stops), so every loader checks the bytes first and fails, or skips, the same way.

`data.on_bad_image` picks what happens to a file that fails the check or the decoder:
- `error` (default): the run stops with an error naming the file.
- `skip`: the file's slot in the batch is filled by the next readable file in dataset order
  (the batch keeps its size and the epoch its length). Each skipped file is logged once, and
  listed, with the reason, in `<run.dir>/skipped_images.tsv`.
"""
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

log = logging.getLogger("fastssl.data")
ON_BAD_IMAGE = ("error", "skip")
T = TypeVar("T")

# Leading bytes of the formats the decoders read.
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
)


def image_format(data: bytes) -> Optional[str]:
    """'jpeg', 'png', 'gif', 'bmp', 'tiff' or 'webp' from the leading bytes; None if none of them."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def image_problem(data: bytes) -> Optional[str]:
    """Why these bytes cannot be a whole image, or None when the quick check finds nothing."""
    if not data:
        return "empty file"
    kind = image_format(data)
    if kind is None:
        return f"not an image (starts with {data[:8]!r})"
    # In a JPEG's entropy-coded data 0xFF is always followed by 0x00 or a restart marker, so an
    # end-of-image marker (FFD9) after the last start-of-scan (FFDA) means the last scan is whole.
    # An embedded EXIF thumbnail ends with its own FFD9, but before the main image's scans.
    # Most files end with that marker: then any scan is before it, and a search from the start
    # finds one in the headers' first kilobytes (rfind would read the whole file back to it).
    if kind == "jpeg":
        if data.endswith(b"\xff\xd9"):
            whole = data.find(b"\xff\xda") >= 0
        else:
            last_scan = data.rfind(b"\xff\xda")
            whole = last_scan >= 0 and data.rfind(b"\xff\xd9") > last_scan
        if not whole:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    if kind == "png" and b"IEND" not in data[-64:]:
        return "truncated PNG (no IEND chunk at the end)"
    return None


class BadImage(RuntimeError):
    """An image that cannot be read or decoded; `path` and `reason` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode image {path}: {reason}")
        self.path, self.reason = path, reason


def stop_on(exc: BadImage) -> RuntimeError:
    """The error that ends a run under data.on_bad_image=error: the file, the reason, the way out."""
    return RuntimeError(f"{exc} (set data.on_bad_image=skip to skip such files)")


def read_image_bytes(path: str) -> bytes:
    """The file's bytes after the quick check; BadImage naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BadImage(path, f"cannot read: {exc.strerror or exc}") from exc
    problem = image_problem(data)
    if problem:
        raise BadImage(path, problem)
    return data


def load_readable(samples: Sequence[Tuple[str, int]], index: int, load: Callable[[int], T],
                  on_bad_image: str) -> Tuple[T, int, List[Tuple[str, str]]]:
    """(load(i), i, skipped): `load(index)`, or under `skip` the first i after index (in dataset
    order, wrapping around) whose load raises no BadImage; `skipped` lists (path, reason) of the
    files passed over. Under `error` the first BadImage becomes a RuntimeError naming the file."""
    skipped = []
    for step in range(len(samples)):
        i = (index + step) % len(samples)
        try:
            return load(i), i, skipped
        except BadImage as exc:
            if on_bad_image != "skip":
                raise stop_on(exc) from exc
            skipped.append((exc.path, exc.reason))
    raise RuntimeError(f"no readable image among the {len(samples)} files of the dataset "
                       f"(the first: {skipped[0][0]}: {skipped[0][1]})")


class SkippedImages:
    """The files a loader skipped, each logged once and, with `path` set, listed as TSV there
    (rewritten when one is added: skips are rare, and a crash loses none of them)."""

    def __init__(self, path=None):
        self.path = path
        self.reasons: Dict[str, str] = {}

    def add(self, skipped: Sequence[Tuple[str, str]]) -> None:
        new = [(file, reason) for file, reason in skipped if file not in self.reasons]
        for file, reason in new:
            self.reasons[file] = reason
            log.warning("skipped image %s: %s (data.on_bad_image=skip)", file, reason)
        if new and self.path is not None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write("path\treason\n")
                f.writelines(f"{file}\t{reason}\n" for file, reason in sorted(self.reasons.items()))

    def __len__(self) -> int:
        return len(self.reasons)
