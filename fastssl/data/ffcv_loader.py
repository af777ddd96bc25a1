"""The `ffcv` loader: FFCV .beton files (written by `fastssl convert`), decoded by FFCV's
numba-compiled pipeline in threads, with the batches, order and interface of every loader.

One decode, every view. FFCV 1.0.2 gives each pipeline one field and decodes it there, so two
views as two pipelines would decode every JPEG twice (or store it twice). `MultiViewDecoder`
decodes an image once into a scratch buffer (a raw image is read in place) and cuts every view's
random resized crop from it. A crop that is shrunk goes through `resize_antialiased`: the
antialiased bilinear filter of PIL and of torch's `antialias=True` (the pil and torch loaders'
resize), faster there than FFCV's `resize_crop` (OpenCV INTER_AREA), which took two-thirds of an
image's decoder time at 512 px (the per-image breakdown of benchmarks/data.py times both). A crop
that is only enlarged, where there is nothing to antialias, keeps `resize_crop`, faster there
(OpenCV's bilinear path). Views may differ in
size (multi-crop), so a sample's output is one flat uint8 buffer holding the views back to back,
each planar, 3 x S_v x S_v; after the transfer to the device it is split into (N, 3, S_v, S_v)
tensors.

The crops follow fastssl.data.crops (area fraction uniform in `scale`, log aspect ratio uniform
in `ratio`, the box clamped to the image, a uniform position) and are a pure function of
(seed, epoch, dataset index, view): four counter-based uniform draws (SplitMix64) per view,
so a resumed run sees the crops the uninterrupted one saw, and each epoch sees new crops. The
boxes are not the pil loader's (that one draws from torch's generator, per position in the
epoch, on the full-size file), only their distribution is. An index that a method's `order`
visits twice in one epoch gets the same crops both times.

The epoch reaches the compiled code without compiling it again. Numba freezes a closure's
values into the machine code, so FFCV's supported way, `recompile=True`, generates and compiles
the pipeline again at every epoch: 1.7-3.1 s per epoch measured with 2 threads on 2 CPU cores
(0.9-1.8 s with one), the time of ~1,000 two-view 224-px images there, and ~4% of a one-minute
ImageNet epoch of a fast multi-GPU run. Instead the decoder reads the epoch's key at every batch from a one-element array
the loader owns, through its address (`numba.carray` over FFCV's `cast_int_to_byte_ptr`): numba
freezes the address, not what lies there. The loader writes the key before it starts the epoch's
thread, and compiles once (the first batch of a loader waits a few seconds).

Order, sharding, the dropped remainder and mid-epoch resume come from the pil loader's
EpochSampler, handed to FFCV as a custom TraversalOrder; the indices of each batch are read off
that sequence (no index field is stored). `order="quasi_random"` replaces the permutation by
FFCV's page-local one (fewer reads when the file is not in the page cache), made a pure function
of (seed, epoch) here (FFCV's own reshuffles its page table in place, so a resumed run would see
another order); the remainder, `start_batch` and a method's `order` then work as with `random`.
FFCV's QuasiRandom has no distributed form, so it is refused with several processes.
"""
import logging
import math
import os
import queue
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numba
import numpy as np
import torch

# fastssl.data.convert imports FFCV first: the one place that says how to install it and that
# undoes the torch thread count FFCV sets on import.
from fastssl.data.convert import convert, read_sidecar  # noqa: I001
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import IS_CUDA
from ffcv.memory_managers.os_cache import OSCacheManager
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.transforms import ToDevice, ToTensor
from ffcv.traversal_order.base import TraversalOrder
from ffcv.traversal_order.quasi_random import QuasiRandom, generate_order_inner
from ffcv.utils import cast_int_to_byte_ptr

from fastssl.data.badimages import SkippedImages
from fastssl.data.embedded import is_embedded_split
from fastssl.data.imagefolder import EpochSampler, ViewCrop, check_batch_fits
from fastssl.data.resize import resize_antialiased

log = logging.getLogger("fastssl.data")
ORDERS = ("random", "quasi_random")

# FFCV 1.0.2's OSCacheManager.state_type marks the file's bytes read-only by setting `mutable =
# False` on numba's interned `uint8[::1]` type: every writable uint8 vector type of the process
# turns read-only and changes its hash, so numba's dispatcher tables keyed by it break as soon as a
# second loader compiles (KeyError in Dispatcher.nopython_signatures, or in its finalizer). The
# same reader, with a read-only type of its own:
_FILE_BYTES = numba.types.Array(numba.uint8, 1, "C", readonly=True)


def _os_cache_state_type(self):
    return numba.types.Tuple([_FILE_BYTES, numba.uint64[::1], numba.uint64[::1]])


def _os_cache_compile_reader(self):
    def read(address, mem_state):
        size = mem_state[2][np.searchsorted(mem_state[1], address)]
        return mem_state[0][address:address + size]

    return Compiler.compile(read, _FILE_BYTES(numba.uint64, self.state_type))


OSCacheManager.state_type = property(_os_cache_state_type)
OSCacheManager.compile_reader = _os_cache_compile_reader

# ---------------------------------------------------------------------------------------------
# The crops: a pure function of (seed, epoch, index, view), compiled by numba once, called by the
# decoder's compiled code and from Python (tests, inspection) alike.

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True)
def mix64(z):
    """SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijection of uint64 that turns
    consecutive counters into independent-looking 64-bit values."""
    z = np.uint64(z)            # numba types a mix of signed and unsigned as signed: >> would differ
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True)
def crop_uniforms(key, index, view):
    """Four independent uniform [0, 1) draws for view `view` of image `index` in the epoch `key`:
    SplitMix64 outputs (53 bits each) of a counter keyed by (key, index, view)."""
    h = mix64(np.uint64(key) ^ mix64(np.uint64(index)))
    h = mix64(h ^ mix64(np.uint64(view) + _GOLDEN))
    u = np.empty(4, np.float64)
    for k in range(4):
        h = h + _GOLDEN                                  # SplitMix64's counter step
        u[k] = np.float64(mix64(h) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return u


@numba.njit(nogil=True)
def crop_box(key, index, view, height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """(top, bottom, left, right) in pixels of view `view` of image `index` (height x width) in the
    epoch `key` (epoch_key): fastssl.data.crops' formula (crop_boxes, crop_box_pixels) on the draws
    [area fraction, log aspect ratio, x, y] of crop_uniforms, in float64."""
    u = crop_uniforms(key, index, view)
    H, W = np.float64(height), np.float64(width)
    area = (scale_lo + (scale_hi - scale_lo) * u[0]) * H * W
    ratio = math.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * u[1])
    w = max(min(math.sqrt(area * ratio), W), 1.0)
    h = max(min(math.sqrt(area / ratio), H), 1.0)
    left = int(round(u[2] * (W - w)))
    top = int(round(u[3] * (H - h)))
    right = min(left + max(1, int(round(w))), int(width))      # rounding can pass the edge by one
    bottom = min(top + max(1, int(round(h))), int(height))
    return top, bottom, left, right


@numba.njit(nogil=True)
def to_planar(hwc, out):
    """out (3, S, S') <- hwc (S, S', 3): here, in the decoder's threads, rather than as a strided
    copy in the loader's thread (12.8 ms of a 47-ms batch of 32 two-view images on 2 cores)."""
    for c in range(3):
        for y in range(hwc.shape[0]):
            for x in range(hwc.shape[1]):
                out[c, y, x] = hwc[y, x, c]


def epoch_key(seed: int, epoch: int) -> np.uint64:
    """The 64-bit key of the crops of one epoch of one seed."""
    key = mix64(np.uint64(seed % 2**64) + _GOLDEN)
    return np.uint64(mix64(key ^ np.uint64(epoch % 2**64)))


# FFCV's C helpers, compiled once per process (FFCV's decoders compile them again for each loader).
IMDECODE, RESIZE_CROP = Compiler.compile(imdecode), Compiler.compile(resize_crop)


@numba.njit(nogil=True)
def resize_view(image, top, bottom, left, right, hwc, out):
    """out (3, S, S, planar) <- the box [top:bottom, left:right] of image (H, W, 3), as the decoder
    resizes every view: a box shrunk along either side through resize_antialiased (the pil and
    torch loaders' filter); a box only enlarged, where there is nothing to antialias, through FFCV's
    resize_crop (OpenCV's bilinear path, faster there) into the scratch `hwc` (S, S, 3), then
    to_planar."""
    size = out.shape[1]
    if bottom - top > size or right - left > size:
        resize_antialiased(image, top, bottom, left, right, out)
    else:
        RESIZE_CROP(image, top, bottom, left, right, hwc)
        to_planar(hwc, out)


class MultiViewDecoder(Operation):
    """Decoder of an FFCV RGBImageField: every view's random resized crop from one decode.

    Per sample out: one flat uint8 buffer of the views back to back, view v 3 x S_v x S_v (planar,
    as the loaders yield them) at offset 3 * sum(S_u^2, u < v). Scratch per sample: max_H x max_W
    x 3, where a JPEG is decoded, and max S_v x S_v x 3, where OpenCV enlarges a crop (HWC).
    `set_epoch(e)` changes the crops without compiling again (see the module docstring)."""

    def __init__(self, views: Sequence[ViewCrop], seed: int):
        super().__init__()
        self.seed = seed
        self.sizes = np.array([v.size for v in views], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes ** 2)]).astype(np.int64)
        self.ranges = np.array([[v.scale[0], v.scale[1], math.log(v.ratio[0]), math.log(v.ratio[1])]
                                for v in views], np.float64)
        # The epoch's key, which the compiled code reads at every sample through its address: numba
        # would freeze the array's contents into the code, but not what lies at an address.
        self.key_cell = np.zeros(1, np.uint64)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Crops of epoch `epoch` from now on (call it while no batch is being decoded)."""
        self.key_cell[0] = epoch_key(self.seed, epoch)

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Tuple[AllocationQuery, ...]]:
        # uint64: the product of the largest height and width must not overflow uint16
        scratch = np.uint64(self.metadata["height"].max()) * np.uint64(self.metadata["width"].max()) * np.uint64(3)
        if not (self.metadata["mode"] == IMAGE_MODES["jpg"]).any():
            scratch = 1                            # raw pixels only: nothing is decoded
        out = (int(self.offsets[-1]),)
        enlarged = (3 * int(self.sizes.max()) ** 2,)
        return (replace(previous_state, jit_mode=True, shape=out, dtype=np.dtype("u1")),
                (AllocationQuery(out, np.dtype("u1")), AllocationQuery((scratch,), np.dtype("u1")),
                 AllocationQuery(enlarged, np.dtype("u1"))))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = IMDECODE
        key_address = np.uint64(self.key_cell.ctypes.data)     # self.key_cell lives as long as the loader
        sizes, offsets, ranges = self.sizes, self.offsets, self.ranges
        views = len(sizes)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, scratch, enlarged = my_storage
            key = numba.carray(cast_int_to_byte_ptr(key_address), 8).view(np.uint64)[0]
            # One image at a time to whichever thread is free: numba's default gives each thread an
            # equal run of the batch, and images differ in cost (size, crop areas). 2 threads on 2 cores:
            # 6.5-12% more images/s (medians of 6 alternations of the two settings in one process).
            previous_chunk = numba.set_parallel_chunksize(1)
            for i in my_range(len(batch_indices)):
                index = batch_indices[i]
                field = metadata[index]
                data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:           # 1. decode once (libjpeg-turbo) into the scratch buffer
                    buffer = scratch[i]
                    imdecode_c(data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:                              # raw pixels: read in place
                    image = data.reshape(height, width, 3)
                for v in range(views):             # 2. every view's box, resized into its slot
                    top, bottom, left, right = crop_box(key, index, v, height, width, ranges[v, 0],
                                                        ranges[v, 1], ranges[v, 2], ranges[v, 3])
                    out = destination[i, offsets[v]:offsets[v + 1]].reshape(3, sizes[v], sizes[v])
                    hwc = enlarged[i, :3 * sizes[v] * sizes[v]].reshape(sizes[v], sizes[v], 3)
                    resize_view(image, top, bottom, left, right, hwc, out)
            numba.set_parallel_chunksize(previous_chunk)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class GivenOrder(TraversalOrder):
    """An FFCV traversal order that visits `self.sequence`, set by FfcvLoader before each epoch.

    FFCV takes a custom order as an instance that it calls with the loader (`order(loader)`)."""

    def __init__(self, sequence: np.ndarray):   # TraversalOrder.__init__ needs the loader: in __call__
        self.sequence = sequence

    def __call__(self, loader):
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        return self.sequence


@contextmanager
def torch_threads_kept():
    """FFCV's Compiler.set_num_threads also sets torch's intra-op threads to the loader's workers;
    keep the caller's setting."""
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


class FfcvLoader:
    """Batches of `(views, labels, indices)` from a .beton on `device`; `set_epoch(e)` before each
    epoch (see the module docstring and fastssl.data)."""

    def __init__(self, path, *, size: int, batch_size: int, seed: int = 0, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), views: Sequence[ViewCrop] = None, workers: int = 2,
                 order: str = "random", os_cache: bool = True, device="cpu", train: bool = True,
                 rank: int = 0, world_size: int = 1, skipped: Optional[SkippedImages] = None):
        """`workers`: FFCV's threads (at least 1). `os_cache`: read through the OS page cache
        (else FFCV's process cache). `skipped` stays empty (a .beton holds readable images only;
        the files left out at conversion are listed in its sidecar)."""
        if order not in ORDERS:
            raise ValueError(f"data.ffcv_order: {order!r} is not one of {', '.join(ORDERS)}")
        if order == "quasi_random" and world_size > 1:
            raise ValueError("data.ffcv_order=quasi_random works in one process only (FFCV has no "
                             "distributed quasi-random order); use data.ffcv_order=random under torchrun")
        self.path = Path(path)
        info = read_sidecar(self.path)
        self.samples: List[Tuple[str, int]] = [(os.path.join(info["source"], rel), label)
                                               for rel, label in info["samples"]]
        self.classes: List[str] = info["classes"]
        if info["skipped"]:
            log.info("%s: %d unreadable file(s) were left out at conversion (listed in %s)", self.path,
                     len(info["skipped"]), self.path.name + ".json")
        self.device = torch.device(device)
        self.train, self.seed = train, seed
        self.skipped = skipped if skipped is not None else SkippedImages()
        self.views = list(views or [ViewCrop(size, scale, ratio)] * 2) if train else [ViewCrop(size)]
        n = len(self.samples)
        threads = max(1, workers)
        if threads > numba.config.NUMBA_NUM_THREADS:
            log.warning("data.workers=%d: numba runs at most %d threads here; using %d", workers,
                        numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
            threads = numba.config.NUMBA_NUM_THREADS
        # ToDevice to the CPU would copy each batch into another CPU buffer, in FFCV's loading thread
        # while the decoder's threads wait (2 ms of a 33-ms batch of 32 two-view images on 2 cores);
        # the copies out of FFCV's buffers in __iter__ are needed anyway.
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type != "cpu" else []
        labels = [IntDecoder(), ToTensor(), *to_device]
        if train:
            check_batch_fits(self.path, n, batch_size * world_size)
            self.sampler = EpochSampler(n, seed, batch_size=batch_size, rank=rank, world_size=world_size)
            self.decoder = MultiViewDecoder(self.views, seed)
            first = self.sampler_sequence()
        else:
            self.sampler = None
            self.decoder = CenterCropRGBImageDecoder((size, size), ratio=1.0)   # shorter side -> S, centre
            first = np.arange(rank, n, world_size, dtype=np.uint64)
        self.eval_sequence = None if train else first
        self.order = GivenOrder(first)       # the longest sequence: FFCV sizes its epochs on this one
        with torch_threads_kept():
            self.loader = Loader(str(self.path), batch_size=batch_size, num_workers=threads, os_cache=os_cache,
                                 order=self.order, seed=seed, drop_last=train,
                                 pipelines={"image": PipelineSpec("image", self.decoder, [
                                                ToTensor(), *to_device]),
                                            "label": labels})
        if self.loader.reader.num_samples != n:
            raise ValueError(f"{self.path} holds {self.loader.reader.num_samples} images but its sidecar "
                             f"lists {n}; convert the folder again (fastssl convert --force)")
        self.quasi = QuasiRandom(self.loader) if order == "quasi_random" else None
        self.iterator = None
        if train:
            self.set_epoch(0)

    # -- the epoch's sequence -------------------------------------------------------------------

    def set_epoch(self, epoch: int, start_batch: int = 0, order: Optional[torch.Tensor] = None) -> None:
        """Epoch `epoch` from its batch `start_batch` on (the earlier ones are not read), visiting
        the images in `order` when given (see EpochSampler.set_epoch)."""
        if not self.train:
            return
        if order is None and self.quasi is not None:
            order = torch.from_numpy(self.quasi_permutation(epoch))
        self.sampler.set_epoch(epoch, start_batch, order)

    def quasi_permutation(self, epoch: int) -> np.ndarray:
        """FFCV's quasi-random permutation of the dataset for `epoch`, from a fresh copy of the page
        table each time (FFCV shuffles its table in place, so its order depends on past epochs)."""
        result = np.zeros(len(self.samples), dtype=np.int64)
        generate_order_inner(self.seed * 912300 + epoch, self.quasi.page_to_samples_array.copy(),
                             self.quasi.page_sizes, result, 2 * self.loader.batch_size)
        return result

    def sampler_sequence(self) -> np.ndarray:
        """This rank's dataset indices for the epoch from `start_batch` on (EpochSampler's order)."""
        return np.fromiter((index for index, _ in self.sampler), dtype=np.uint64, count=len(self.sampler))

    def batches_per_epoch(self) -> int:
        """Batches in a whole epoch (len() counts those left after `start_batch`)."""
        return self.sampler.batches_per_epoch() if self.train else len(self)

    def __len__(self) -> int:
        b = self.loader.batch_size
        if self.train:
            return max(0, self.sampler.batches_per_epoch() - self.sampler.start_batch)
        return -(-len(self.eval_sequence) // b)

    # -- batches --------------------------------------------------------------------------------

    def __iter__(self):
        if self.iterator is not None:          # an epoch left unfinished: stop its thread
            stop_epoch(self.iterator)
        sequence = self.sampler_sequence() if self.train else self.eval_sequence
        if self.train:
            self.decoder.set_epoch(self.sampler.epoch)
        self.order.sequence = sequence
        with torch_threads_kept():
            iterator = self.iterator = iter(self.loader)
        b = self.loader.batch_size
        try:
            for k in range(len(self)):
                images, labels = next_batch(iterator)
                n = labels.shape[0]
                indices = torch.from_numpy(sequence[k * b:k * b + n].astype(np.int64))
                # copies out of FFCV's buffers, which it reuses a few batches later
                yield (self.split_views(images, n), labels.reshape(-1).clone(),
                       indices.to(self.device, non_blocking=True))
        finally:
            stop_epoch(iterator)

    def split_views(self, images: torch.Tensor, n: int) -> List[torch.Tensor]:
        """(N, total) flat planar views, or (N, S, S, 3) centre views -> [(N, 3, S_v, S_v)], contiguous
        copies."""
        if not self.train:
            return [images.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)]
        out = []
        for v, view in enumerate(self.views):
            start, end = int(self.decoder.offsets[v]), int(self.decoder.offsets[v + 1])
            planar = images[:, start:end].view(n, 3, view.size, view.size)
            out.append(planar.clone(memory_format=torch.contiguous_format))   # a copy even when contiguous
        return out


def stop_epoch(iterator) -> None:
    """Stop an FFCV epoch's thread and wait until it has ended. FFCV's close() only asks: its
    daemon thread finishes the batch it is making, and one that is still running when Python
    exits dies taking the GIL inside pybind11 code, which aborts the process ("terminate called
    without an active exception", seen after a benchmark left an epoch midway). The queue is
    drained meanwhile: at the end of the order the thread blocks putting its end marker."""
    iterator.close()
    while iterator.is_alive():
        try:
            iterator.output_queue.get_nowait()
        except queue.Empty:
            pass
        iterator.join(timeout=0.1)


def next_batch(iterator):
    """FFCV's EpochIterator.__next__, except that an error in its thread raises here (FFCV's
    waits for the batch forever)."""
    while True:
        try:
            item = iterator.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not iterator.is_alive():
                raise RuntimeError("FFCV's loading thread stopped (its error is printed above)") from None
    if item is None:
        raise RuntimeError("FFCV's epoch ended before the batches fastssl expects")
    slot, result = item
    if IS_CUDA:                              # the batch's copies were queued on its own stream
        iterator.current_stream.wait_stream(iterator.cuda_streams[slot])
    return result


# ---------------------------------------------------------------------------------------------

def beton_for(root, data_cfg) -> Path:
    """The .beton that data.loader=ffcv reads for `root`: `root` itself when it is a file; for a
    split of the embedded dataset, its conversion next to it in the cache (made on first use)."""
    path = Path(os.path.expanduser(str(root)))
    if path.is_file():
        return path
    if path.suffix == ".beton" or not path.exists():
        raise FileNotFoundError(f"FFCV dataset not found: {path}")
    if path.is_dir() and is_embedded_split(path, data_cfg.cache_dir):
        beton = path.with_suffix(".beton")
        if not beton.is_file():
            # raw pixels: lossless (the pixels the folder loaders decode), and the images are tiny
            log.info("data.loader=ffcv: converting the embedded dataset %s to %s (once)", path, beton)
            convert(path, beton, write_mode="raw", workers=max(1, data_cfg.workers), force=True, log=log.info,
                    progress=False)
        return beton
    raise ValueError(f"data.loader=ffcv reads FFCV .beton files, and {path} is a folder; convert it once "
                     f"with: fastssl convert {path} {path.with_suffix('.beton')}  (then point the "
                     f"config at the .beton)")

