"""ddpm-ref: a framework-free reference implementation of DDPM (Ho et al. 2020).

Installing needs numpy alone. Extras:
  test   what the test suite needs: pytest, hypothesis, and the outside oracles
         (PyTorch CPU, diffusers, safetensors) plus Numba's CUDA simulator for the GPU kernels
  torch  PyTorch and diffusers alone (cross-checks, weight conversion, benchmarks)
  cli    Pillow and tqdm (animations, nicer progress bars); the CLI works without them
  gpu    CuPy and numba-cuda for the GPU backend (ddpm_ref.kernels)
"""
from setuptools import setup

TORCH = ["torch==2.13.0", "diffusers>=0.30", "safetensors"]
SIM = ["numba>=0.60", "numba-cuda>=0.10"]

setup(
    name="ddpm-ref",
    version="0.1.0",
    description="A framework-free reference implementation of denoising diffusion probabilistic models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["ddpm_ref", "ddpm_ref.ops", "ddpm_ref.models", "ddpm_ref.data", "ddpm_ref.kernels"],
    package_dir={"ddpm_ref.kernels": "kernels"},
    package_data={"ddpm_ref.data": ["*.npz", "*.txt"]},
    install_requires=["numpy>=1.22"],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6"] + TORCH + SIM,
        "torch": TORCH,
        "cli": ["pillow", "tqdm"],
        "gpu": ["cupy-cuda12x"] + SIM,
    },
    entry_points={"console_scripts": ["ddpm=ddpm_ref.cli:main"]},
)
