"""fastssl: fast self-supervised learning for vision (SimCLR and friends)."""
from setuptools import find_packages, setup

# The Triton/CUDA kernels live in the top-level ``kernels/`` folder and are imported as
# ``fastssl.kernels`` (a top-level ``kernels`` import would clash with an unrelated PyPI package)
# through the link fastssl/kernels -> ../kernels, so that a checkout runs without installing it.
PACKAGES = find_packages(include=["fastssl", "fastssl.*"])

setup(
    name="fastssl",
    version="0.1.0",
    description="High-performance self-supervised learning for vision: GPU views, fused contrastive losses, LARS trainer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    # Lower bounds only: an installed torch that is recent enough is kept, never reinstalled.
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "kornia>=0.7",
        "numba>=0.58",
        "numpy>=1.22",
        "pillow>=9.0",
        "pyyaml>=6.0",
        "triton>=2.1; platform_system == 'Linux'",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.30"],
        "ffcv": ["ffcv>=1.0.2"],
        "dev": ["pytest>=7.0"],
    },
    entry_points={"console_scripts": ["fastssl = fastssl.cli:main"]},
)
