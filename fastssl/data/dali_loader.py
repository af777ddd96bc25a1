"""The `dali` loader: NVIDIA DALI decodes and resizes (nvJPEG on a GPU, libjpeg-turbo on the CPU).

Worker processes read the files and resolve the crop boxes (fastssl.data.encoded); one DALI
pipeline, built once per loader, takes each batch's encoded bytes and boxes through
`external_source` and returns one uint8 (N, 3, S_v, S_v) tensor per view. On a GPU the decoder is
`mixed` (the hardware JPEG decoder where there is one, else nvJPEG), so the images never exist
decoded in host memory; without one the pipeline runs on the CPU. `decode`:
- `once`: each image is decoded whole and every view is resized from its box of that decode.
- `per_view`: each view decodes only its box plus a margin (ROI decoding), then resizes: V smaller
  decodes instead of one whole one. The margin covers the resize filter, so the border pixels are
  those of `once` (measured on ImageNet photos: mean |diff| 0.00, max 1, IDCT rounding; without
  the margin, up to 1.0 mean on small crops).
Both resize with the antialiased bilinear filter of the other loaders. On a GPU that is DALI's
resize of each box (its filter reaches up to one support beyond the box, as PIL's does). On the
CPU it is fastssl.data.resize, run on DALI's threads by DALI's numba operator (`cpu_resize`):
DALI's own CPU resize took 2.23 ms a 224-px view of random crops of ImageNet photos against 0.17
(one thread; decoding the photo, 3.1 ms), and held the CPU pipeline to the `pil` loader's speed.
Its pixels are the torch loader's up to rounding (mean |diff| 0.000-0.001 on ImageNet photos at
224 px), PIL's within 0.16-0.18 there.

Pipelining: the next batch is submitted before the current one is handed out, so DALI decodes it
on its threads while the trainer works (2 CPU cores, 6 batches of 32 photos, 0.25 s of work each:
1.60 s one batch ahead, 2.00 s on demand). `exec_pipelined=False` makes a run start only when we
submit a batch (a pipelined executor prefetches on the first run, before the batches exist), so
a finite epoch ends cleanly; an iteration abandoned midway leaves queued runs, and the next one
starts on a new pipeline. Outputs reach PyTorch through DLPack without a copy (DALI's default
executor never reuses an output buffer that is still referenced), ordered on the current CUDA stream.
The file bytes go in without a copy either (`no_copy`): DALI reads them where the workers left
them (the batch's shared-memory block; pinned when the DataLoader pins for a GPU), which saves
the main thread 40 of its 45 ms per batch of 256 ImageNet photos (2-core CPU). So the loader
keeps every batch it fed: until AHEAD more runs have been collected after its own (the margin
DALI's documentation asks for) and, on a GPU, its run's work, which the current stream waits for,
is done (`hold`); the batches of a dropped pipeline (an abandoned iteration, a decoder error)
until it is gone and, on a GPU, the device has finished its copies (`drop_pipeline`).

A file that passes the workers' quick check but fails in DALI's decoder fails the whole batch,
and DALI declares the pipeline invalid: it is rebuilt, and the batch's images are decoded one at
a time to find the file. It ends the run naming the file, or under `data.on_bad_image=skip` its
slot is filled by the next readable image in dataset order, cut from the slot's seed (as the
workers do for the files they skip), and the file is not fed to DALI again. DALI's CPU decoder
(libjpeg-turbo) is as lenient as PIL: a JPEG with garbage in its entropy-coded data decodes with
smeared blocks and a warning on stderr; it fails on e.g. a corrupt Huffman table. It reads
grayscale, CMYK and 10000 x 10000 JPEGs as PIL does; files in other formats reach it as PNM
pixels that PIL decoded in the workers (fastssl.data.encoded).
"""
import functools
from collections import deque

import torch

from fastssl.data.badimages import BadImage
from fastssl.data.encoded import EncodedBatch, EncodedFolderLoader
from fastssl.data.imagefolder import load_rgb
from fastssl.data.resize import resize_antialiased_c

DECODE_MODES = ("once", "per_view")
AHEAD = 2          # batches submitted to DALI at a time: one being decoded while one is in use


def dali_pipeline(views, batch_size: int, threads: int, device_id, decode: str):
    """The DALI pipeline. Inputs: `encoded` (file bytes) and per view v `start{v}`, `end{v}`
    (float32 (y, x) of its box's top-left and bottom-right corners, in the decoded image or
    region), and for `per_view` `region_start{v}`, `region_end{v}` (int32 (y, x): the region to
    decode). Outputs: one uint8 (3, S_v, S_v) image per view and sample. `device_id` None: CPU only."""
    from nvidia.dali import fn, pipeline_def, types

    where = "cpu" if device_id is None else "mixed"
    # adjust_orientation=False: the boxes were computed on the stored (height, width), as PIL reads it.
    # On the GPU, chroma is upsampled without libjpeg's "fancy" interpolation (DALI's default,
    # jpeg_fancy_upsampling=False): slightly different colours at chroma edges than the CPU or PIL.
    decoder = dict(device=where, output_type=types.RGB, adjust_orientation=False)
    resize = dict(interp_type=types.INTERP_LINEAR, antialias=True)

    @pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id, exec_dynamic=True,
                  exec_pipelined=False, exec_async=True, prefetch_queue_depth=AHEAD)
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)   # see the docstring
        image = fn.decoders.image(encoded, **decoder) if decode == "once" else None
        out = []
        for v, view in enumerate(views):
            start = fn.external_source(name=f"start{v}", dtype=types.FLOAT, ndim=1)
            end = fn.external_source(name=f"end{v}", dtype=types.FLOAT, ndim=1)
            if decode == "once":
                source = image
            else:
                region_start = fn.external_source(name=f"region_start{v}", dtype=types.INT32, ndim=1)
                region_end = fn.external_source(name=f"region_end{v}", dtype=types.INT32, ndim=1)
                source = fn.decoders.image_slice(encoded, start=region_start, end=region_end, axis_names="HW",
                                                 **decoder)
            if device_id is None:
                out.append(cpu_resize(view.size)(source, start, end))
            else:   # roi_* (like size) follow the shape order: (y, x)
                crop = fn.resize(source, size=[view.size, view.size], roi_start=start, roi_end=end,
                                 roi_relative=False, **resize)
                # HWC -> CHW in DALI: measured when the CPU pipeline still used this path, as fast as
                # crop_mirror_normalize and 0.35 ms/image (12%) less than a permute + copy in torch
                # (CPU, 2 threads, 224 px, two views).
                out.append(fn.transpose(crop, perm=[2, 0, 1]))
        return tuple(out)

    return graph()


@functools.lru_cache(maxsize=None)
def cpu_resize(size: int):
    """DALI's numba operator for views of `size` px on the CPU: per sample, the box [start, end)
    ((y, x), whole pixels) of an (H, W, 3) uint8 image resized into a planar (3, size, size) view by
    fastssl.data.resize, on DALI's threads (see the module docstring for why not DALI's own CPU
    resize). Building it compiles a wrapper (about 2 s on a small CPU), so it is built once per
    process and size, and called by every pipeline."""
    from nvidia.dali import types
    from nvidia.dali.plugin.numba.experimental import NumbaFunction

    resize = resize_antialiased_c().ctypes     # compiled once; the wrapper calls it by address

    def view_shape(outs, ins):
        for i in range(len(outs[0])):
            outs[0][i][0], outs[0][i][1], outs[0][i][2] = 3, size, size

    def resize_box(out, image, start, end):
        resize(image.ctypes, image.shape[0], image.shape[1], int(start[0]), int(end[0]), int(start[1]),
               int(end[1]), out.ctypes, size, size)

    return NumbaFunction(run_fn=resize_box, setup_fn=view_shape, out_types=[types.UINT8],
                         in_types=[types.UINT8, types.FLOAT, types.FLOAT], outs_ndim=[3], ins_ndim=[3, 1, 1])


class DaliLoader(EncodedFolderLoader):
    """Batches of `(views, labels, indices)` decoded by DALI on `device` (see the module docstring);
    `workers` is also DALI's number of threads (at least 1)."""

    def __init__(self, root, *, decode: str = "once", workers: int = 2, **kwargs):
        if decode not in DECODE_MODES:
            raise ValueError(f"data.dali_decode: unknown mode {decode!r}; choose one of {', '.join(DECODE_MODES)}")
        super().__init__(root, workers=workers, **kwargs)
        self.decode, self.threads = decode, max(1, workers)
        self.pipe = None
        self.fed = deque()         # the batches of the runs queued in self.pipe, oldest first
        self.collected = deque()   # (batch, its run's end on the current stream): DALI read them in place

    def __iter__(self):
        if self.fed:               # an earlier iteration stopped early: its queued runs would come out first
            self.drop_pipeline()
        pending = deque()          # (batch number in this iteration, EncodedBatch) submitted, oldest first
        for k, batch in enumerate(self.encoded_batches()):
            pending.append((k, self.submit(k, batch)))
            if len(pending) == AHEAD:
                yield self.collect(pending)
        while pending:
            yield self.collect(pending)

    def drop_pipeline(self) -> None:
        """Drop the pipeline (a new one is built on the next submit): after a decoder error DALI
        says the pipeline object is no longer valid, and its queued runs are lost with it. The
        batches it read in place are released once it is gone (its executor stopped) and, on a
        GPU, the device is idle (no copy from them is left in flight)."""
        self.pipe = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.fed.clear()
        self.collected.clear()

    def feed(self, batch: EncodedBatch) -> None:
        """Queue one run of the pipeline on `batch` (building it first if needed)."""
        if self.pipe is None:
            device_id = None
            if self.device.type == "cuda":
                device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.pipe = dali_pipeline(self.views, self.loader.batch_size, self.threads, device_id, self.decode)
            self.pipe.build()
        self.pipe.feed_input("encoded", [data.numpy() for data in batch.data])
        for v, view in enumerate(self.views):
            start, end = batch.boxes[:, v, [1, 0]], batch.boxes[:, v, [3, 2]]   # (N, 2): (y, x)
            if self.decode == "per_view":
                # The antialiased filter reaches box/size source pixels beyond each output pixel.
                margin = (end - start) // view.size + 2
                region_start, region_end = (start - margin).clamp(min=0), torch.minimum(end + margin, batch.sizes)
                self.pipe.feed_input(f"region_start{v}", region_start.int().numpy())
                self.pipe.feed_input(f"region_end{v}", region_end.int().numpy())
                start, end = start - region_start, end - region_start
            self.pipe.feed_input(f"start{v}", start.float().numpy())
            self.pipe.feed_input(f"end{v}", end.float().numpy())
        self.pipe.schedule_run()
        self.fed.append(batch)

    def outputs(self):
        """The oldest queued run's views, as uint8 (N, 3, S_v, S_v) tensors on the device."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device) if cuda else None
        outs = self.pipe.outputs(stream)           # DALI's errors surface here, as RuntimeError
        self.hold(self.fed.popleft())
        if not cuda:
            return [torch.from_dlpack(out.as_tensor()) for out in outs]
        with torch.cuda.device(self.device):
            return [torch.from_dlpack(out.as_tensor()) for out in outs]

    def submit(self, k: int, batch: EncodedBatch) -> EncodedBatch:
        """Feed batch `k` of this iteration, its known-undecodable files replaced; returns the
        batch as fed."""
        batch = self.without_undecodable(batch, k)
        self.feed(batch)
        return batch

    def collect(self, pending: deque):
        """(views, labels, indices) of the oldest submitted batch; when DALI fails on it, the
        culprits are found and replaced (or named in an error) and the submitted batches rerun."""
        k, batch = pending.popleft()
        try:
            views = self.outputs()
        except RuntimeError as exc:
            self.drop_pipeline()
            batch = self.repair(k, batch, exc)
            self.feed(batch)
            views = self.outputs()
            for _, later in pending:
                self.feed(later)
        return views, batch.labels.to(self.device, non_blocking=True), batch.indices.to(self.device, non_blocking=True)

    def hold(self, batch: EncodedBatch) -> None:
        """Keep `batch`, whose run's outputs were just collected, until AHEAD more runs are
        collected and (on a GPU) the current stream has passed the end of its run: DALI's copies
        of its bytes to the device may still be queued when `outputs` returns."""
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        self.collected.append((batch, done))
        if len(self.collected) > AHEAD:
            _, done = self.collected[0]
            if done is not None:
                done.synchronize()      # long past in practice: two batches of training ago
            self.collected.popleft()

    def decodes(self, batch: EncodedBatch, j: int) -> bool:
        """Whether DALI decodes image j of `batch` alone (nothing else may be queued)."""
        try:
            self.feed(take(batch, [j]))
            self.outputs()
            return True
        except RuntimeError:
            self.drop_pipeline()
            return False

    def repair(self, k: int, batch: EncodedBatch, error: RuntimeError) -> EncodedBatch:
        """Batch `k` after DALI failed on it: each image DALI cannot decode alone ends the run
        (`error`) or is replaced (`skip`). Re-raises `error` when every image decodes alone."""
        found = False
        for j in range(len(batch.paths)):
            while not self.decodes(batch, j):
                found = True
                batch = self.undecodable_file(batch, k, j, decoder_failure(batch.paths[j]))
        if not found:              # not one file's fault (e.g. out of memory): nothing to skip
            raise error
        return batch


def decoder_failure(path: str) -> str:
    """Why DALI could not decode `path`: PIL's reason when PIL fails too."""
    try:
        load_rgb(path)
    except BadImage as exc:
        return exc.reason
    return "DALI's decoder failed on it (PIL reads it)"


def take(batch: EncodedBatch, slots) -> EncodedBatch:
    """The images `slots` of `batch`, as a batch."""
    return EncodedBatch([batch.data[j] for j in slots], batch.labels[slots], batch.indices[slots],
                        batch.sizes[slots], batch.boxes[slots], [batch.paths[j] for j in slots], [])
