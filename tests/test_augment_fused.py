"""The fused (Triton) augmentation backend against the Kornia reference, on replayed draws.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set here, before
anything imports triton), so images stay small; with CUDA the same tests run the compiled
kernels, and the GPU test at the bottom runs a realistic batch.

Tolerances come from the dtypes, not from fitting:
- fp32: TOL_UNIT = 128 fp32 ulps of 1.0 on [0, 1] pixel values, divided by min(std) after
  normalisation. The reference resamples through a homography (kornia.crop_and_resize), whose
  coordinates are off by up to ~40 ulps of 1.0 from an fp64 oracle at these sizes (the fused
  kernel: <= 10, checked below with 16); jitter factors (<= 1.8) scale that, and hue's HSV round
  trip adds a few ulps.
- bf16/fp16 output: that tolerance plus one ulp of the dtype (rtol = eps): the GPU rounds to
  nearest, the interpreter truncates bf16 (numpy has no bf16).
- Realistic sizes (the GPU test at the bottom): sample coordinates near 500 px carry fp32
  rounding of ulp(500) = 2^-15 px, and on a noise image, whose neighbouring pixels differ by up
  to 1.0, a coordinate off by one such ulp moves a value by as much. Measured on 375 x 500 ->
  224: the fused crop is 1.2 ulps of the largest coordinate from the fp64 oracle, Kornia's
  homography 3.8; jitter scales values by up to 1.8. The test allows 2 ulps of the largest
  coordinate against the oracle and TOL_UNIT + 10 against Kornia.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastssl.augment import AugmentConfigError, MultiViewAugment, SimCLRAugment  # noqa: E402
from conftest import compile_in_fresh_process  # noqa: E402
from fastssl.data.crops import crop_boxes  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS32 = torch.finfo(torch.float32).eps
TOL_UNIT = 128 * EPS32
IDENTITY = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
INPUTS = [("uint8", 13, 17, 9), ("float32", 21, 16, 12)]   # dtype, H, W, output size


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def images(dtype="uint8", n=4, h=13, w=17, seed=0):
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return (x if dtype == "uint8" else x.to(getattr(torch, dtype)) / 255).to(DEVICE)


def assert_matches(aug, x, params, out_dtype=torch.float32, channels_last=True):
    # On a GPU the reference's blur (conv2d) would run in TF32 (10-bit mantissa, ~5e-4 relative,
    # far beyond TOL_UNIT; seen on an H100); the kernels compute in fp32 throughout.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = aug.apply(x, params)
    out = aug.apply(x, params, backend="fused", out_dtype=out_dtype, channels_last=channels_last)
    assert out.shape == ref.shape and out.dtype == out_dtype and out.device == ref.device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    tol = TOL_UNIT / min(aug.std)
    rtol = 0.0 if out_dtype == torch.float32 else torch.finfo(out_dtype).eps
    torch.testing.assert_close(out.float(), ref, atol=tol * (1 + rtol), rtol=rtol)
    return out, ref


def one_op(op, n):
    """Settings and parameter overrides that switch on exactly one op for every sample."""
    settings, over = dict(IDENTITY), {}
    if op == "flip":
        over["flip"] = torch.ones(n, dtype=torch.bool)
    elif op in ("brightness", "contrast", "saturation", "hue"):
        k = ("brightness", "contrast", "saturation", "hue").index(op)
        factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(n, 1)
        factors[:, k] = torch.linspace(0.3, 1.7, n) if k < 3 else torch.linspace(-0.45, 0.45, n)
        over.update(jitter=torch.ones(n, dtype=torch.bool), factors=factors,
                    order=torch.tensor([[k] + [o for o in range(4) if o != k]] * n))
    elif op == "grayscale":
        over["grayscale"] = torch.ones(n, dtype=torch.bool)
    elif op == "blur":
        over.update(blur=torch.ones(n, dtype=torch.bool), sigma=torch.linspace(0.1, 2.0, n))
    elif op == "solarize":
        over["solarize"] = torch.ones(n, dtype=torch.bool)
    elif op == "normalize":
        settings.update(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return settings, over


@pytest.mark.parametrize("dtype,h,w,size", INPUTS)
@pytest.mark.parametrize("op", ["crop", "flip", "brightness", "contrast", "saturation", "hue",
                                "grayscale", "blur", "solarize", "normalize"])
def test_each_op_alone_matches_reference(op, dtype, h, w, size):
    settings, over = one_op(op, 4)
    aug = SimCLRAugment(size=size, **settings)
    drawn = aug.sample(4, torch.Generator().manual_seed(1))     # every probability is 0: crop only
    out, ref = assert_matches(aug, images(dtype, 4, h, w), {**drawn, **over})
    if op != "crop":    # the op really ran: its output differs from the crop alone
        base = SimCLRAugment(size=size, **IDENTITY).apply(images(dtype, 4, h, w), drawn)
        assert (ref - base).abs().max() > 1e-2


@pytest.mark.parametrize("dtype,h,w,size", INPUTS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_ops_with_random_draws(dtype, h, w, size, out_dtype):
    aug = SimCLRAugment(size=size, grayscale_p=0.3, solarize_p=0.3)
    params = aug.sample(5, torch.Generator().manual_seed(7))
    x = images(dtype, 5, h, w, seed=3)
    assert_matches(aug, x, params, out_dtype, channels_last=out_dtype != torch.float16)


@pytest.mark.parametrize("in_dtype", ["bfloat16", "float16"])
def test_half_precision_input(in_dtype):
    aug = SimCLRAugment(size=9, solarize_p=0.5)
    assert_matches(aug, images(in_dtype, 3, 13, 17), aug.sample(3, torch.Generator().manual_seed(8)))


def test_every_jitter_order_and_contrast_position():
    """All 24 orders in one batch: contrast's mean is taken after the ops drawn before it."""
    import itertools
    aug = SimCLRAugment(size=8, **{**IDENTITY, "jitter_p": 1.0})
    params = aug.sample(24, torch.Generator().manual_seed(2))
    params["order"] = torch.tensor(list(itertools.permutations(range(4))))
    params["factors"] = torch.tensor([[1.6, 0.4, 1.8, 0.3]]).repeat(24, 1)
    out, _ = assert_matches(aug, images(n=24), params)
    assert (out[0] - out[-1]).abs().max() > 1e-2           # the order matters for these factors


def bilinear_oracle(x, params, size):
    """The crops of `params` resized to `size` by bilinear sampling at pixel centres, in fp64 on
    the CPU: what the fused crop computes, without its fp32 rounding."""
    n, _, h, w = x.shape
    xf = x.double().cpu() / 255
    k = torch.arange(size, dtype=torch.float64) + 0.5
    out = []
    for i, (x0, y0, bw, bh) in enumerate(crop_boxes(params["crop"], h, w).double()):
        sx = (x0 + k * bw / size - 0.5).clamp(0, w - 1)
        sy = (y0 + k * bh / size - 0.5).clamp(0, h - 1)
        xl, yl = sx.floor().long(), sy.floor().long()
        xh, yh = (xl + 1).clamp(max=w - 1), (yl + 1).clamp(max=h - 1)
        wx, wy = sx - xl, (sy - yl)[:, None]
        im = xf[i]
        out.append(im[:, yl][:, :, xl] * (1 - wx) * (1 - wy) + im[:, yl][:, :, xh] * wx * (1 - wy)
                   + im[:, yh][:, :, xl] * (1 - wx) * wy + im[:, yh][:, :, xh] * wx * wy)
    return torch.stack(out)


def test_crop_is_within_16_ulps_of_fp64():
    aug = SimCLRAugment(size=11, **IDENTITY)
    x = images(n=5, h=21, w=16)
    params = aug.sample(5, torch.Generator().manual_seed(4))
    out = aug.apply(x, params, backend="fused").double().cpu()
    assert (out - bilinear_oracle(x, params, 11)).abs().max() <= 16 * EPS32


def test_no_crop_resize_and_identity():
    aug = SimCLRAugment(size=12, crop=False, **IDENTITY)
    assert_matches(aug, images(n=3, h=21, w=16), aug.sample(3))
    same = SimCLRAugment(size=13, crop=False, **IDENTITY)
    x = images(n=2, h=13, w=13)
    # On the CPU: torch on CUDA divides by a Python scalar as a multiplication by its reciprocal,
    # which is not the correctly rounded quotient that the kernels compute (div_rn).
    assert torch.equal(same.apply(x, same.sample(2), backend="fused").cpu(), x.cpu().float() / 255)


def test_multi_view_recipes_match_reference():
    views = [dict(size=10, blur_p=1.0, solarize_p=0.0), dict(size=10, blur_p=0.1, solarize_p=0.2),
             dict(size=6, crop_scale=[0.05, 0.4], copies=2)]
    mv = MultiViewAugment(views)
    x = images(n=3, h=21, w=16)
    params = mv.sample(3, torch.Generator().manual_seed(5))
    outs = mv.apply(x, params, backend="fused", out_dtype=torch.bfloat16, channels_last=True)
    assert [o.shape[-1] for o in outs] == [10, 10, 6, 6]
    for view, p in zip(mv.views, params):
        assert_matches(view, x, p, torch.bfloat16)


def test_fused_errors_name_the_problem(monkeypatch):
    aug = SimCLRAugment(size=8)
    x, p = images(n=2), aug.sample(2)
    with pytest.raises(ValueError, match="out_dtype"):
        aug.apply(x, p, backend="fused", out_dtype=torch.int32)
    with pytest.raises(ValueError, match="images"):
        aug.apply(x.long(), p, backend="fused")
    with pytest.raises(AugmentConfigError, match="size"):
        SimCLRAugment(size=0)
    if DEVICE == "cpu":   # no silent fallback: without the interpreter a CPU tensor is an error
        from fastssl.kernels import augment as kernels
        monkeypatch.setattr(kernels, "INTERPRETED", False)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            aug.apply(x, p, backend="fused")


COMPILE_SCRIPT = """
import inspect, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastssl.kernels import augment as K
assert not K.INTERPRETED
F = ("m0", "m1", "m2", "s0", "s1", "s2")
cases = [(K._contrast_stats_kernel, dict(X="*u8", TABLE="*fp32", PART="*fp32"), dict(IS_U8=True)),
         (K._main_kernel, dict(X="*u8", TABLE="*fp32", MEAN="*fp32", OUT="*bf16", SCRATCH="*fp32",
                               **dict.fromkeys(F, "fp32")), dict(IS_U8=True)),
         (K._main_kernel, dict(X="*fp16", TABLE="*fp32", MEAN="*fp32", OUT="*fp32", SCRATCH="*fp32",
                               **dict.fromkeys(F, "fp32")), dict(IS_U8=False))]
cases += [(K._blur_kernel, dict(SRC="*fp32", DST="*fp32", TABLE="*fp32", SAMPLES="*i64", OUT="*fp16",
                                **dict.fromkeys(F, "fp32")), dict(VERTICAL=v, KSIZE=23)) for v in (False, True)]
for fn, types, cx in cases:
    names = list(inspect.signature(fn.fn).parameters)
    cx = dict(cx, NCOL=K.N_COLS, BLOCK=1024)
    sig = {n: "constexpr" if n in cx else types.get(n, "i32") for n in names}
    c = triton.compile(ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in cx.items()}),
                       target=GPUTarget("cuda", 90, 32))
    print("compiled", fn.__name__, "cubin" in c.asm)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the other tests run the compiled kernels")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: compile every kernel variant the
    launcher can pick (u8 / half input, fp32 / bf16 / fp16 output, both blur passes) to an sm_90
    cubin in a fresh process without TRITON_INTERPRET and with a fresh cache."""
    run = compile_in_fresh_process(COMPILE_SCRIPT, tmp_path)
    assert run.stdout.split().count("True") == 5, run.stdout


def realistic_batch_checks(x, out_dtype):
    """The realistic-size checks of a (N, 3, 375, 500) uint8 batch `x`, contiguous and strided,
    to 224 px: the crop against the fp64 oracle, within 2 ulps of the largest pixel coordinate;
    the rest of the recipe (jitter, grayscale, a 23-tap blur, solarise, normalise) against Kornia
    run on the CPU from the same 224 px pixels (crop=False: both copy them exactly), within the
    small tests' TOL_UNIT. Comparing the whole recipe with Kornia in one go mixes the two: the
    crop's coordinate rounding (the kernel's 1.2 ulps of 499 px from the oracle, Kornia's
    homography 3.8) is then scaled by the jitter's factors, brightness x contrast x saturation up
    to 1.8^3; on an H100 4 of 9.6 million values went past the 1.4e-3 that such a test allowed."""
    n = x.shape[0]
    ulp = 2.0 ** -15                      # of the largest pixel coordinate, 499 (in [0, 1] units)
    crop = SimCLRAugment(size=224, **IDENTITY)
    params = crop.sample(n, torch.Generator().manual_seed(12))
    for xs in (x, x[:, :, :, ::2]):
        out = crop.apply(xs, params, backend="fused").double().cpu()
        assert (out - bilinear_oracle(xs, params, 224)).abs().max() <= 2 * ulp

    aug = SimCLRAugment(size=224, crop=False, solarize_p=0.2)
    params = aug.sample(n, torch.Generator().manual_seed(12))
    assert params["blur"].any() and params["jitter"].any() and params["solarize"].any()
    tol = TOL_UNIT / min(aug.std)
    rtol = 0.0 if out_dtype == torch.float32 else torch.finfo(out_dtype).eps
    for xs, channels_last in ((x[:, :, :224, :224], True), (x[:, :, 100:324, :448:2], False)):
        ref = aug.apply(xs.cpu(), params)
        out = aug.apply(xs, params, backend="fused", out_dtype=out_dtype, channels_last=channels_last)
        assert out.device == x.device and out.dtype == out_dtype
        torch.testing.assert_close(out.float().cpu(), ref, atol=tol * (1 + rtol), rtol=rtol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled kernels on a realistic batch")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_batch(out_dtype):
    """64 images of 375 x 500 on the compiled kernels (realistic_batch_checks)."""
    realistic_batch_checks(images(n=64, h=375, w=500, seed=11), out_dtype)
