from setuptools import find_packages, setup

setup(
    name="vjepa_fast",
    version="0.1.0",
    description="Fast, verified V-JEPA video pretraining: GPU data pipeline, fused Triton kernels, reference parity.",
    python_requires=">=3.10",
    packages=find_packages(include=["vjepa_fast", "vjepa_fast.*", "kernels", "kernels.*",
                                    "dali_pipelines", "dali_pipelines.*", "bench", "bench.*"]),
    install_requires=[
        "torch>=2.4",
        "triton",
        "numpy",
        "pyyaml",
        "tqdm",
        "av",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout", "triton", "pytest-benchmark", "scikit-video"],
        "triton": ["triton"],
        "dali": ["nvidia-dali-cuda120>=2.4"],  # fn.decoders.video(frames=...); tested with 2.4.0
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["vjepa-fast=vjepa_fast.cli:main"]},
)
