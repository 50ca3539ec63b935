from setuptools import setup

setup(
    name="titok-fast",
    version="0.1.0",
    description="Fast, exact runtime for the TiTok-Video V1 tokenizer: Triton kernels, packed batches, video CLI",
    packages=["titok_fast", "titok_fast.kernels"],
    # the kernels live in the top-level folder kernels/ and install inside the package: a top-level `kernels`
    # module would clash with the PyPI package of that name
    package_dir={"titok_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "safetensors",
        "av",
        "numpy",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "omegaconf", "pyyaml", "ruff==0.17.6"],
    },
    entry_points={"console_scripts": ["titok-fast = titok_fast.cli:main"]},
)
