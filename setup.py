import re
from pathlib import Path

from setuptools import setup

# the version is written once, in the package (titok-fast --version prints it)
HERE = Path(__file__).parent
INIT = (HERE / "titok_fast" / "__init__.py").read_text()
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT, re.M)

PLOT = ["matplotlib"]
RAY = ["ray[data]>=2.60,<2.64"]  # 2.64 drops the retry arguments the Ray path passes
# titok-fast bench runs the benchmarks under pytest; einops and omegaconf: upstream's own code needs them, for the
# benchmarks' `upstream` provider
BENCH = ["pytest", "pytest-benchmark", "einops", "omegaconf"]
# The Triton kernels: torch's CUDA builds for Linux bring the Triton they were built with, so it is no requirement of
# its own (a CPU-only install, which runs the torch backend, would download about 1 GB of it for nothing). The extra
# is for a torch without it that should run the kernels, or the Triton interpreter (the tests).
GPU = ["triton>=3.6; platform_system == 'Linux'"]  # tensor descriptors (3.4+); 3.6 the oldest tested, 3.9 too

setup(
    name="titok-fast",
    version=VERSION.group(1),
    description="Fast, exact runtime for the TiTok-Video V1 tokenizer: Triton kernels, packed batches, video CLI",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=["titok_fast", "titok_fast.kernels"],
    # the kernels live in the top-level folder kernels/ and install inside the package: a top-level `kernels`
    # module would clash with the PyPI package of that name
    package_dir={"titok_fast.kernels": "kernels"},
    python_requires=">=3.11",  # PyAV 18.1 (below) needs 3.11; 3.10 reached its end of life in October 2026
    install_requires=[
        "torch>=2.11",  # the oldest tested: the GPU machine's (RESULTS.md); 2.13 on the CPU
        "safetensors",
        "av>=18.1",  # VideoReformatter.reformat(threads=...); VideoCodecContext.field_order; Disposition an IntFlag
        "numpy",
        "tqdm",
        "pyyaml",
        "huggingface_hub>=0.34",  # the default weights come from the Hub; 0.34: the `hf` command our messages name
    ],
    extras_require={
        # xdist: the suite on every core; pytest-timeout: a test that hangs fails (pyproject.toml)
        "test": ["pyyaml", "ruff==0.17.6", "pytest-xdist>=3.5", "pytest-timeout>=2.3", *GPU, *PLOT, *RAY, *BENCH],
        "gpu": GPU,
        "plot": PLOT,
        "ray": RAY,
        "bench": [*BENCH, *GPU],  # (benchmarks/bench_kernels.py imports triton)
    },
    entry_points={"console_scripts": ["titok-fast = titok_fast.cli:main"]},
)
