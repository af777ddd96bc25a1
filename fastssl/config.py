"""Typed configuration: dataclasses are the schema, YAML supplies values, `key=value` overrides win.

Precedence: command-line overrides > the YAML file's `per_method.<method.name>` section (settings
for one method only, e.g. its optimiser in the shared demo file) > the rest of the YAML file > the
defaults below. An unknown key, a duplicated
YAML key or a value of the wrong type is an error that names the key (and suggests the closest
valid one). Each field's docstring is the string literal right under it; `fastssl train
--help-config` prints them.
"""
import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a message that names the offending key."""


@dataclass
class DataConfig:
    train: str = ""
    """ImageFolder with one sub-folder per class for pre-training; empty means the embedded dataset."""
    val: str = ""
    """ImageFolder for evaluation; empty means the embedded dataset's `val/` split."""
    loader: str = "pil"
    """Input pipeline: `pil` (CPU DataLoader decoding with PIL, the reference), `torch` (JPEGs
    decoded in batches by torchvision on the training device), `dali` (NVIDIA DALI: nvJPEG on the
    GPU, a CPU pipeline without one) or `ffcv` (FFCV .beton files, see `fastssl convert`)."""
    workers: int = 2
    """Reader processes (pil: they also decode; torch, dali: they read the files and resolve the
    crops; 0 reads in the main process), plus as many DALI threads (dali, at least 1), or FFCV's
    threads (ffcv, at least 1)."""
    on_bad_image: str = "error"
    """An unreadable image (empty, not an image, truncated, undecodable): `error` stops the run
    naming the file; `skip` uses the next readable image instead and lists the file in
    <run.dir>/skipped_images.tsv."""
    dali_decode: str = "once"
    """`dali`: `once` decodes each image whole and cuts every view from it; `per_view` decodes
    only each view's region (ROI decoding), once per view."""
    ffcv_order: str = "random"
    """`ffcv`: `random` (the same seeded order as every loader) or `quasi_random` (FFCV's
    page-local order, which reads less from disk when the file does not fit in memory; one process)."""
    ffcv_os_cache: bool = True
    """`ffcv`: read the .beton through the OS page cache (best when it fits in memory)."""
    cache_dir: str = "~/.cache/fastssl"
    """Where the embedded dataset is written on first use."""
    embedded_train_per_class: int = 200
    """Embedded dataset: training images per class (10 classes)."""
    embedded_val_per_class: int = 50
    """Embedded dataset: validation images per class."""
    embedded_image_size: int = 32
    """Embedded dataset: side of the generated square JPEGs, in pixels."""


@dataclass
class AugmentConfig:
    size: int = 224
    """Side of each square view, in pixels."""
    crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    """RandomResizedCrop area range, as a fraction of the image."""
    crop_ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    """RandomResizedCrop aspect-ratio range (width / height)."""
    flip_p: float = 0.5
    """Probability of a horizontal flip."""
    jitter_strength: float = 1.0
    """Colour-jitter strength s: brightness, contrast, saturation 0.8s, hue 0.2s (SimCLR)."""
    jitter_p: float = 0.8
    """Probability of applying colour jitter (in a random order per sample)."""
    grayscale_p: float = 0.2
    """Probability of converting to grayscale."""
    blur_p: float = 0.5
    """Probability of a Gaussian blur (kernel ~10% of the view, sigma in blur_sigma)."""
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])
    """Gaussian blur sigma range, in pixels."""
    solarize_p: float = 0.0
    """Probability of solarisation (pixels >= 0.5 are inverted)."""
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    """Per-channel mean subtracted last (ImageNet's by default)."""
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    """Per-channel standard deviation divided by last."""
    backend: str = "auto"
    """`kornia` (the reference), `fused` (Triton kernels, CUDA) or `auto` (fused on CUDA, kornia elsewhere)."""
    views: List[Dict[str, Any]] = field(default_factory=list)
    """Per-view overrides of this section, one mapping per view, e.g. BYOL's asymmetric recipe
    `[{blur_p: 1.0, solarize_p: 0.0}, {blur_p: 0.1, solarize_p: 0.2}]`, `copies: k` for k alike
    views; a view's size/crop_scale/crop_ratio are the crop the loader cuts for it (multi-crop).
    Empty: the method's own views (two with this section's settings, unless the method says otherwise)."""


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    """Backbone architecture: resnet18, resnet34 or resnet50 (torchvision)."""
    stem: str = "imagenet"
    """`imagenet` (7x7 stride-2 conv + max-pool) or `small` (3x3 stride-1 conv, no pool; CIFAR-sized input)."""
    proj_hidden_dim: int = 2048
    """Width of the projection MLP's hidden layers."""
    proj_dim: int = 128
    """Output dimension of the projection MLP (the contrastive embedding)."""
    proj_layers: int = 2
    """Number of linear layers in the projection MLP (2 = SimCLR v1)."""


@dataclass
class LossConfig:
    backend: str = "auto"
    """InfoNCE implementation of the contrastive methods (simclr, moco_v2, moco_v3): `triton`
    (fused kernels, CUDA), `chunked` (tiled PyTorch, any device), `torch` (the reference) or
    `auto` (Triton on CUDA, else torch while small, chunked beyond)."""


# ---------------------------------------------------------------------------------------------
# Methods: `method.name` selects one; each has its own section `method.<name>.*` with the papers'
# defaults. The projector is shared: `model.proj_*` (the per-method YAML files set the papers'
# heads). Sections of the methods not selected are kept but unused.

@dataclass
class SimCLRSettings:
    temperature: float = 0.1
    """NT-Xent temperature (0.1 at batch 4096; 0.2-0.5 for small batches)."""


@dataclass
class MoCoV2Settings:
    temperature: float = 0.2
    """InfoNCE temperature."""
    queue_size: int = 65536
    """Keys of earlier batches kept as negatives (a multiple of the global batch size)."""
    momentum: float = 0.999
    """Key-encoder EMA momentum (constant)."""


@dataclass
class MoCoV3Settings:
    temperature: float = 1.0
    """InfoNCE temperature (1.0 for ResNet-50 in the paper's code, 0.2 for ViT)."""
    momentum: float = 0.99
    """Key-encoder EMA momentum at the start; it rises to 1 on a cosine schedule."""
    pred_hidden_dim: int = 4096
    """Hidden width of the predictor MLP (its output has model.proj_dim)."""


@dataclass
class BYOLSettings:
    momentum: float = 0.996
    """Target-network EMA momentum at the start; it rises to 1 on a cosine schedule."""
    pred_hidden_dim: int = 4096
    """Hidden width of the predictor MLP (its output has model.proj_dim)."""
    asymmetric_views: bool = True
    """BYOL's view recipe (view 1 always blurred, view 2 blurred with p=0.1 and solarised with
    p=0.2), overriding augment.blur_p/solarize_p; false keeps the augment section for both views."""


@dataclass
class SimSiamSettings:
    pred_hidden_dim: int = 512
    """Bottleneck width of the predictor MLP (its output has model.proj_dim)."""


@dataclass
class DINOSettings:
    out_dim: int = 65536
    """Output dimension of the head (the number of prototypes)."""
    student_temperature: float = 0.1
    """Temperature of the student's softmax."""
    teacher_temperature: float = 0.07
    """Temperature of the teacher's softmax after the warm-up (lower = sharper)."""
    teacher_temperature_start: float = 0.04
    """Teacher temperature at the start, raised linearly to teacher_temperature."""
    teacher_temperature_warmup_epochs: float = 30.0
    """Epochs of the linear teacher-temperature warm-up."""
    center_momentum: float = 0.9
    """EMA momentum of the centre subtracted from the teacher's outputs."""
    momentum: float = 0.996
    """Teacher EMA momentum at the start; it rises to 1 on a cosine schedule."""
    freeze_last_layer_epochs: float = 1.0
    """The head's last (prototype) layer takes no update during this many first epochs (DINO:
    training is more stable); 0: never frozen."""
    global_crop_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])
    """Crop area range of the 2 global views (their size is augment.size)."""
    local_crops: int = 8
    """Number of local views (seen by the student only); 0 disables multi-crop."""
    local_size: int = 96
    """Side of each local view, in pixels."""
    local_crop_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])
    """Crop area range of the local views."""


# Clustering and predictive methods (DeepCluster, OBoW, CPC).

@dataclass
class DeepClusterSettings:
    clusters: int = 10000
    """k of the k-means over the training set's features (the pseudo-classes; DeepCluster: 10,000)."""
    pca_dim: int = 256
    """The features are PCA-whitened to this many dimensions, then L2-normalised, before k-means."""
    kmeans_iterations: int = 20
    """Lloyd iterations per k-means run."""
    kmeans_restarts: int = 1
    """Independent k-means runs (each from its own seeded start); the one of lowest inertia wins."""
    reassign_every_epochs: int = 1
    """Recluster, relabel and re-initialise the classifier every this many epochs."""
    sobel: bool = True
    """Feed the backbone the Sobel gradients of the grey image (2 channels) instead of RGB, so
    colour cannot make the clusters (DeepCluster's default)."""


@dataclass
class OBoWSettings:
    vocabulary_size: int = 8192
    """Visual words per level, kept as a FIFO queue of the teacher's local features."""
    levels: List[str] = field(default_factory=lambda: ["layer3", "layer4"])
    """ResNet stages whose teacher feature maps give the bags of words (the multi-scale form)."""
    momentum: float = 0.99
    """Teacher EMA momentum at the start; it rises to 1 on a cosine schedule."""
    inverse_delta: float = 15.0
    """Sharpness of the soft assignment of a local feature to words: softmax(-inverse_delta * d / mean
    min d), d the squared distance to each word (the paper's ResNet-50 value; 10 for its ResNet-18)."""
    min_distance_momentum: float = 0.99
    """EMA momentum of the mean squared distance of a local feature to its nearest word (bias-corrected:
    the first batch's value, then the EMA of the batches seen)."""
    word_pool_size: int = 3
    """Side of the local average pooling (stride 1) before a teacher feature is enqueued as a word."""
    prediction_scale: float = 8.0
    """kappa: the student's logits are kappa times the dot product of its pooled feature with each word's
    unit-norm generated weight (the paper's ResNet-50 value; 5 for its ResNet-18)."""
    generator_hidden_dim: int = 4096
    """Hidden width of the MLP that turns each word into the weight vector of its prediction (the
    official code: twice the backbone's feature dimension, 4096 for a ResNet-50)."""
    student_size: int = 160
    """Side of the student's 2 views (the teacher sees the whole image at augment.size; 224 in the paper)."""
    student_crop_scale: List[float] = field(default_factory=lambda: [0.08, 0.6])
    """Crop area range of the student's 2 views (the official code's image_crop_range)."""
    local_crops: int = 5
    """Small crops the student also predicts the teacher's bag of words from."""
    local_size: int = 96
    """Side of each small crop."""
    local_crop_scale: List[float] = field(default_factory=lambda: [0.08, 0.14])
    """Crop area range of the small crops. The official code cuts 96-px patches from a 3x3 grid over
    a 256-px resize of a crop of 0.6-1 of the image: (96/256)^2 * [0.6, 1] = [0.084, 0.141]."""
    eval_backbone: str = "student"
    """The network kNN, the linear probe and export evaluate: the student (the paper's) or the teacher,
    its EMA (which then runs all its stages each step, so its batch-norm statistics are its own)."""


@dataclass
class CPCSettings:
    grid: int = 7
    """The crop is cut into grid x grid patches overlapping by half: side 2S/(grid+1), stride
    S/(grid+1) (7: 64 px patches at stride 32 on a 256 px crop)."""
    prediction_steps: int = 5
    """The context of a row predicts the embeddings of the 1 .. prediction_steps rows below."""
    context_layers: int = 2
    """Row-causal convolution blocks of the context network over the grid of embeddings."""
    temperature: float = 0.1
    """InfoNCE temperature (embeddings and predictions are L2-normalised inside the loss)."""


# Pretext tasks (hand-crafted pseudo-labels; fastssl/methods/pretext.py). Sizes of gaps and jitter
# are fractions of a grid cell, so one setting serves every image size.

@dataclass
class RotationSettings:
    hidden_dim: int = 512
    """Hidden width of the 4-way rotation classifier on the pooled features (0: linear)."""


@dataclass
class JigsawSettings:
    permutations: int = 1000
    """Size of the permutation set (the classes), chosen for maximal minimum Hamming distance
    (Noroozi & Favaro: 100-1000; 1000 was their best)."""
    permutation_seed: int = 0
    """Seed of the deterministic permutation-set selection (the set is saved in the checkpoint)."""
    gap: float = 0.1
    """Smallest gap between neighbouring tiles, as a fraction of the cell (at least 1 px)."""
    jitter: float = 0.1
    """Largest random shift of a tile inside its cell, as a fraction of the cell (at least 1 px)."""
    input_size: int = 0
    """Side the view is resized to before it is cut into 3x3 tiles (0: augment.size)."""
    hidden_dim: int = 512
    """Hidden width of the classifier over the 9 concatenated tile features (0: linear)."""


@dataclass
class RelativePositionSettings:
    gap: float = 0.3
    """Smallest gap between the centre patch and its neighbour, as a fraction of the cell
    (Doersch et al.: half a patch)."""
    jitter: float = 0.1
    """Largest random shift of each patch inside its cell, as a fraction of the cell."""
    input_size: int = 0
    """Side the view is resized to before the 3x3 grid is laid on it (0: augment.size)."""
    chroma: str = "project"
    """Guard against chromatic aberration: `project` (remove the green-magenta component),
    `drop` (keep one random channel, noise in the other two) or `none`."""
    hidden_dim: int = 512
    """Hidden width of the 8-way classifier over the pair's concatenated features (0: linear)."""


@dataclass
class ColorizationSettings:
    grid: int = 10
    """Side of the ab quantisation cells (10: the 268 cells the sRGB gamut reaches; Zhang et al. count 313)."""
    neighbours: int = 5
    """Soft-encoding of the ab target over this many nearest bins."""
    sigma: float = 5.0
    """Gaussian width of the soft encoding and of the prior's smoothing, in ab units."""
    rebalance_lambda: float = 0.5
    """Class rebalancing: weights 1 / ((1 - lambda) p_smoothed + lambda / Q); 1 disables it."""
    annealed_temperature: float = 0.38
    """Temperature of the annealed mean that decodes the predicted distribution into ab."""
    output_stride: int = 4
    """The ab distribution is predicted at 1/output_stride of the input side (Zhang et al.: 4)."""


@dataclass
class InpaintingSettings:
    mask: str = "center"
    """`center` (one square of mask_fraction of the side) or `blocks` (random squares, Pathak et al.)."""
    mask_fraction: float = 0.5
    """Side of the masked centre square as a fraction of the image side (blocks: half of it each)."""
    blocks: int = 4
    """Number of random blocks with mask=blocks."""


@dataclass
class SplitBrainSettings:
    grid: int = 10
    """Side of the ab quantisation cells: the L network classifies ab into the in-gamut bins."""
    l_bins: int = 50
    """The ab network classifies L (0-100) into this many bins."""
    output_stride: int = 4
    """Both halves predict at 1/output_stride of the input side."""


@dataclass
class SuperResolutionSettings:
    scale: int = 4
    """Downsampling factor of the input (the network restores the full resolution)."""
    adversarial_weight: float = 0.0
    """Weight of an adversarial term from a patch discriminator (0: reconstruction loss only)."""


@dataclass
class MultitaskSettings:
    tasks: List[str] = field(default_factory=lambda: ["rotation", "jigsaw", "colorization"])
    """Pretext tasks sharing the backbone, one head each (each reads its own section above)."""
    weights: List[float] = field(default_factory=list)
    """Loss weight per task (empty: 1 each)."""
    mode: str = "sum"
    """`sum` (every task every step, weighted sum) or `alternate` (one task per step, in turn)."""


@dataclass
class MethodConfig:
    name: str = "simclr"
    """The self-supervised method: simclr, moco_v2, moco_v3, byol, simsiam, dino, deepcluster,
    obow, cpc, or a pretext
    task: rotation, jigsaw, relative_position, colorization, inpainting, split_brain,
    super_resolution, multitask (each has a section below with its own settings)."""
    simclr: SimCLRSettings = field(default_factory=SimCLRSettings)
    moco_v2: MoCoV2Settings = field(default_factory=MoCoV2Settings)
    moco_v3: MoCoV3Settings = field(default_factory=MoCoV3Settings)
    byol: BYOLSettings = field(default_factory=BYOLSettings)
    simsiam: SimSiamSettings = field(default_factory=SimSiamSettings)
    dino: DINOSettings = field(default_factory=DINOSettings)
    deepcluster: DeepClusterSettings = field(default_factory=DeepClusterSettings)
    obow: OBoWSettings = field(default_factory=OBoWSettings)
    cpc: CPCSettings = field(default_factory=CPCSettings)
    rotation: RotationSettings = field(default_factory=RotationSettings)
    jigsaw: JigsawSettings = field(default_factory=JigsawSettings)
    relative_position: RelativePositionSettings = field(default_factory=RelativePositionSettings)
    colorization: ColorizationSettings = field(default_factory=ColorizationSettings)
    inpainting: InpaintingSettings = field(default_factory=InpaintingSettings)
    split_brain: SplitBrainSettings = field(default_factory=SplitBrainSettings)
    super_resolution: SuperResolutionSettings = field(default_factory=SuperResolutionSettings)
    multitask: MultitaskSettings = field(default_factory=MultitaskSettings)


@dataclass
class OptimConfig:
    name: str = "lars"
    """Optimiser: `lars`, `sgd` (with momentum) or `adamw`."""
    impl: str = "foreach"
    """Optimiser implementation: `foreach` (multi-tensor torch._foreach ops, the default),
    `reference` (a Python loop over parameters) or `apex` (LARS only: NVIDIA apex's LARC around
    FusedSGD; an error when apex is not installed)."""
    lr: float = 0.3
    """Base learning rate, scaled by `lr_scaling`."""
    lr_scaling: str = "linear"
    """`linear`: lr x batch/256; `sqrt`: lr x sqrt(batch) (SimCLR uses 0.075); `none`: lr as given."""
    weight_decay: float = 1e-6
    """Weight decay (not applied to biases and normalisation parameters with LARS)."""
    momentum: float = 0.9
    """Momentum."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient eta."""
    exclude_bias_and_norm: bool = True
    """Exclude parameters with ndim <= 1 from weight decay and the LARS trust ratio."""
    warmup_epochs: float = 10.0
    """Linear warm-up length in epochs (then cosine decay to zero)."""


@dataclass
class TrainConfig:
    epochs: int = 100
    """Number of pre-training epochs."""
    batch_size: int = 4096
    """Images per optimiser step (each gives two views): the GLOBAL batch, split evenly over the
    processes under torchrun (an error if it does not divide)."""
    precision: str = "auto"
    """`bf16` autocast (CPU and GPU), `fp16` autocast with a gradient scaler (GPU only), `fp32`, or
    `auto`: bf16 on a GPU, fp32 on CPU (where bf16 is emulated and an order of magnitude slower)."""
    device: str = "auto"
    """`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`."""
    stop_after_epochs: int = 0
    """Stop after this many epochs (as a pre-empted job would) without changing the schedule,
    which `epochs` defines; `train.resume=true` continues. 0 runs to the end."""
    stop_after_steps: int = 0
    """Stop after this global step (within an epoch if need be), writing last.pt with the position
    in the epoch, without changing the schedule; `train.resume=true` continues. 0: no limit."""
    seed: int = 0
    """Seed for the model initialisation, the data order, the crops and the augmentations."""
    resume: Union[bool, str] = False
    """`true` continues from the run directory's last checkpoint (an error if there is none); `auto`
    does the same but starts afresh when the run directory holds no checkpoint yet (for jobs that
    a scheduler or torchrun restarts); a path continues from that file. A corrupt or truncated
    last.pt falls back, with a warning, to the newest readable epoch_NNNN.pt."""
    checkpoint_every_steps: int = 0
    """Also write checkpoints/last.pt every this many steps within an epoch (with the position in
    the epoch, so a resume skips the batches already done); 0: only at the end of each epoch."""
    max_nonfinite_steps: int = 5
    """A step whose loss is NaN or infinite is skipped (no update; with fp16 the gradient scaler
    skips it); this many such steps in a row stop the run with NonFiniteLossError."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value before each optimiser step (after unscaling
    with fp16); 0: no clipping."""
    compile: bool = False
    """torch.compile the model (the first steps are slow while it compiles; needs a C++ compiler
    on CPU)."""
    sync_bn: bool = True
    """With several processes (torchrun), synchronise batch-norm statistics across them, so the
    statistics cover the global batch as SimCLR prescribes. No effect in a single process."""
    threads: int = 0
    """CPU threads for torch (0 keeps torch's default)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""


@dataclass
class EvalConfig:
    knn_k: int = 200
    """Neighbours in the weighted kNN classifier."""
    knn_temperature: float = 0.07
    """Temperature of the kNN vote weights exp(sim / t)."""
    batch_size: int = 256
    """Batch size for feature extraction."""
    knn_every_epochs: int = 0
    """During pre-training, kNN-evaluate the backbone every this many epochs (a metrics line with
    event `knn`); 0: only the final evaluation at the end."""
    random_init_bn: bool = True
    """The final evaluation also reports the random-init network with its batch-norm statistics
    re-estimated on (up to 10,000) training images: the score that fitting the normalisation alone
    gives, a stricter baseline than random-init. It costs one more kNN (features of the training
    and validation images) plus a pass over up to 10,000 training images for the statistics."""
    linear_epochs: int = 100
    """`fastssl eval linear`: epochs of the linear classifier on the frozen features."""
    linear_lr: float = 0.1
    """`fastssl eval linear`: peak learning rate (SGD, momentum 0.9, cosine decay to 0)."""
    linear_batch_size: int = 256
    """`fastssl eval linear`: batch size of the classifier's training."""
    linear_weight_decay: float = 0.0
    """`fastssl eval linear`: weight decay of the classifier."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config, metrics.jsonl, checkpoints."""
    keep_checkpoints: int = 2
    """Number of epoch checkpoints kept besides `last.pt`."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard scalars to run.dir/tensorboard (needs the
    `tensorboard` package; an error if it is missing)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# ---------------------------------------------------------------------------------------------
# Loading YAML (rejecting duplicate keys), applying overrides, checking types.

class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                    f"(first at line {seen[key] + 1}) in {key_node.start_mark.name}")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if not value:
                raise ConfigError(f"{name}: empty section")
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _field_types(cls=Config, prefix: str = "") -> Dict[str, Any]:
    """Every leaf key ('train.epochs') mapped to its annotated type."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(_field_types(kind, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = kind
    return out


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check `value` against `kind` (int may stand for float); raise a ConfigError naming the key."""
    origin = typing.get_origin(kind)
    if origin is Union:
        for option in typing.get_args(kind):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        names = " or ".join(_type_name(t) for t in typing.get_args(kind))
        raise ConfigError(f"{key}: expected {names}, got {value!r} ({type(value).__name__})")
    if kind is Any:
        return value
    if origin in (dict, Dict):
        key_kind, value_kind = typing.get_args(kind)
        if not isinstance(value, dict) or not all(isinstance(k, key_kind) for k in value):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(key_kind)} keys, got {value!r}")
        return {k: _coerce(f"{key}.{k}", v, value_kind) for k, v in value.items()}
    if origin in (list, List):
        (item,) = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:   # YAML 1.1 reads `5e-4` (no dot) as a string; accept it as the number it means
            return float(value)
        except ValueError:
            pass
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(kind)}, got {value!r} ({type(value).__name__})")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) in (list, List):
        return f"list of {_type_name(typing.get_args(kind)[0])}"
    return getattr(kind, "__name__", str(kind))


# Keys that moved: the error says where they went.
MOVED = {"loss.temperature": "method.<name>.temperature (e.g. method.simclr.temperature)"}


def _unknown_key(key: str, valid) -> ConfigError:
    if key in MOVED:
        return ConfigError(f"config key {key!r} moved to {MOVED[key]}")
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """`['train.epochs=1', 'run.dir=runs/x']` -> {'train.epochs': 1, 'run.dir': 'runs/x'} (YAML-typed values)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        out[key.strip()] = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    return out


def _per_method_values(per_method: Any, name: str) -> Dict[str, Any]:
    """The flat values of the file's `per_method.<name>` section: settings that apply only when
    that method runs (e.g. an optimiser that suits it), over the rest of the file and under the
    command-line overrides."""
    if not isinstance(per_method, dict):
        raise ConfigError(f"per_method: expected a mapping of method names to sections, got {per_method!r}")
    unknown = sorted(set(per_method) - set(method_names()))
    if unknown:
        raise ConfigError(f"per_method.{unknown[0]}: not a method; choose from {', '.join(method_names())}")
    section = per_method.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"per_method.{name}: expected a mapping of sections, got {section!r}")
    values = flatten(section)
    kinds = _field_types()
    for key in values:
        if key not in kinds:
            raise ConfigError(f"per_method.{name}: {_unknown_key(key, kinds)}")
    if "method.name" in values:
        raise ConfigError(f"per_method.{name}: cannot set method.name")
    return values


def load_config(path: Union[str, Path, None] = None, overrides: Union[List[str], Dict[str, Any], None] = None) -> Config:
    """Defaults, then the YAML file at `path` (with its `per_method.<method.name>` section over
    the rest), then `overrides` (strings `key=value` or a dict)."""
    values: Dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as fh:
            try:
                tree = yaml.load(fh, Loader=_UniqueKeyLoader) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        per_method = tree.pop("per_method", None) or {}
        values.update(flatten(tree))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    overrides = overrides or {}
    if path is not None and per_method:
        values.update(_per_method_values(per_method, overrides.get("method.name", values.get("method.name", "simclr"))))
    values.update(overrides)

    kinds = _field_types()
    cfg = Config()
    for key, value in values.items():
        if key not in kinds:
            raise _unknown_key(key, kinds)
        section, _, name = key.rpartition(".")
        setattr(get(cfg, section), name, _coerce(key, value, kinds[key]))
    validate(cfg)
    return cfg


def method_names():
    """The valid `method.name` values: one per section of MethodConfig."""
    return tuple(f.name for f in dataclasses.fields(MethodConfig) if f.name != "name")


# Keys whose value must be one of a fixed set. Registries (backbones, loss backends) are checked
# where they live, with the same kind of message.
CHOICES = {
    "data.loader": ("pil", "torch", "dali", "ffcv"),
    "data.on_bad_image": ("error", "skip"),
    "data.dali_decode": ("once", "per_view"),
    "data.ffcv_order": ("random", "quasi_random"),
    "method.name": method_names(),
    "augment.backend": ("auto", "kornia", "fused"),
    "model.stem": ("imagenet", "small"),
    "method.obow.eval_backbone": ("student", "teacher"),
    "optim.name": ("lars", "sgd", "adamw"),
    "optim.impl": ("foreach", "reference", "apex"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "method.relative_position.chroma": ("project", "drop", "none"),
    "method.inpainting.mask": ("center", "blocks"),
    "method.multitask.mode": ("sum", "alternate"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
}
POSITIVE = ("data.embedded_train_per_class", "data.embedded_val_per_class", "data.embedded_image_size",
            "augment.size", "model.proj_hidden_dim", "model.proj_dim", "model.proj_layers",
            "train.epochs", "train.batch_size", "train.log_every", "train.max_nonfinite_steps",
            "eval.knn_k", "eval.knn_temperature", "eval.batch_size", "eval.linear_epochs", "eval.linear_lr",
            "eval.linear_batch_size", "optim.lr", "method.simclr.temperature", "method.moco_v2.temperature",
            "method.moco_v2.queue_size", "method.moco_v3.temperature", "method.moco_v3.pred_hidden_dim",
            "method.byol.pred_hidden_dim", "method.simsiam.pred_hidden_dim", "method.dino.out_dim",
            "method.dino.student_temperature", "method.dino.teacher_temperature",
            "method.dino.teacher_temperature_start", "method.dino.local_size", "method.jigsaw.permutations",
            "method.colorization.grid", "method.colorization.neighbours", "method.colorization.sigma",
            "method.colorization.annealed_temperature", "method.colorization.output_stride",
            "method.inpainting.mask_fraction", "method.inpainting.blocks", "method.split_brain.grid",
            "method.split_brain.l_bins", "method.split_brain.output_stride", "method.super_resolution.scale",
            "method.deepcluster.clusters", "method.deepcluster.pca_dim", "method.deepcluster.kmeans_iterations",
            "method.deepcluster.kmeans_restarts", "method.deepcluster.reassign_every_epochs",
            "method.obow.vocabulary_size", "method.obow.inverse_delta", "method.obow.word_pool_size",
            "method.obow.prediction_scale", "method.obow.generator_hidden_dim", "method.obow.student_size",
            "method.obow.local_size", "method.cpc.grid", "method.cpc.prediction_steps",
            "method.cpc.context_layers", "method.cpc.temperature")
# EMA momenta: 0 copies the student every step, 1 freezes the teacher.
MOMENTA = ("method.moco_v2.momentum", "method.moco_v3.momentum", "method.byol.momentum", "method.dino.momentum",
           "method.dino.center_momentum", "method.obow.momentum", "method.obow.min_distance_momentum")
PROBABILITIES = ("augment.flip_p", "augment.jitter_p", "augment.grayscale_p", "augment.blur_p",
                 "augment.solarize_p")
RANGES = ("augment.crop_scale", "augment.crop_ratio", "augment.blur_sigma", "method.dino.global_crop_scale",
          "method.dino.local_crop_scale", "method.obow.local_crop_scale",
          "method.obow.student_crop_scale")


def get(cfg: Config, key: str) -> Any:
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value



def validate(cfg: Config) -> None:
    """Check values that are well typed but meaningless; the message names the key."""
    for key, options in CHOICES.items():
        if get(cfg, key) not in options:
            raise ConfigError(f"{key}: {get(cfg, key)!r} is not one of {', '.join(options)}")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {get(cfg, key)!r}")
    for key in PROBABILITIES:
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ConfigError(f"{key}: a probability must lie in [0, 1], got {get(cfg, key)!r}")
    for key in RANGES:
        low_high = get(cfg, key)
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
            raise ConfigError(f"{key}: expected [min, max] with 0 < min <= max, got {low_high!r}")
    for key in MOMENTA:
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ConfigError(f"{key}: an EMA momentum must lie in [0, 1], got {get(cfg, key)!r}")
    if not cfg.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum: must lie in [0, 1), got {cfg.optim.momentum!r}")
    if not cfg.optim.trust_coefficient > 0:
        raise ConfigError(f"optim.trust_coefficient: must be > 0, got {cfg.optim.trust_coefficient!r}")
    for key in ("data.workers", "train.threads", "train.stop_after_epochs", "train.checkpoint_every_steps",
                "train.stop_after_steps", "eval.knn_every_epochs", "eval.linear_weight_decay",
                "train.grad_clip", "optim.weight_decay", "optim.momentum",
                "optim.warmup_epochs", "run.keep_checkpoints", "augment.jitter_strength",
                "method.dino.local_crops", "method.dino.teacher_temperature_warmup_epochs",
                "method.dino.freeze_last_layer_epochs", "method.rotation.hidden_dim", "method.jigsaw.hidden_dim",
                "method.jigsaw.input_size", "method.relative_position.hidden_dim",
                "method.relative_position.input_size", "method.super_resolution.adversarial_weight",
                "method.obow.local_crops"):
        if get(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get(cfg, key)!r}")
    if len(cfg.augment.mean) != 3 or len(cfg.augment.std) != 3 or min(cfg.augment.std) <= 0:
        raise ConfigError("augment.mean / augment.std: need 3 values each, std > 0")
    # Gap and jitter together take less than the cell, leaving the tile its side.
    for key in ("method.jigsaw.gap", "method.jigsaw.jitter", "method.relative_position.gap",
                "method.relative_position.jitter"):
        if not 0.0 < get(cfg, key) < 0.5:
            raise ConfigError(f"{key}: a fraction of the cell in (0, 0.5), got {get(cfg, key)!r} (0 would "
                              "open the edge or alignment shortcut)")
    for key in ("method.colorization.rebalance_lambda", "method.inpainting.mask_fraction"):
        if not 0.0 <= get(cfg, key) <= 1.0:
            raise ConfigError(f"{key}: must lie in [0, 1], got {get(cfg, key)!r}")
    if not 2 <= cfg.method.jigsaw.permutations <= 362880:
        raise ConfigError("method.jigsaw.permutations: between 2 and 9! = 362880, "
                          f"got {cfg.method.jigsaw.permutations}")


def to_dict(cfg: Config) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def field_docs(cls=Config, prefix: str = "") -> Dict[str, str]:
    """{'train.epochs': 'Number of pre-training epochs.', ...} from the attribute docstrings."""
    docs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[f"{prefix}{stmt.target.id}"] = nxt.value.value
    return docs


def describe() -> str:
    """Every key with its default and its docstring, for `--help-config`."""
    defaults = flatten(to_dict(Config()))
    docs = field_docs()
    return "\n".join(f"{key} = {defaults[key]!r}\n    {docs.get(key, '')}" for key in defaults)
