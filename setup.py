"""ddpm-ref: a framework-free reference implementation of DDPM (Ho et al. 2020).

Installing needs numpy alone. Extras:
  test   what the test suite needs: pytest, hypothesis, and the outside oracles
         (PyTorch CPU, diffusers, safetensors) plus Numba's CUDA simulator for the GPU kernels
  torch  PyTorch and diffusers alone (cross-checks, weight conversion, benchmarks)
  cli    Pillow and tqdm (animations, nicer progress bars); the CLI works without them
  gpu    CuPy and numba-cuda for the GPU backend (ddpm_ref.kernels), CUDA 12 builds
"""
from setuptools import setup

TORCH = ["torch==2.13.0", "diffusers>=0.30", "safetensors"]
# The CUDA simulator runs the kernels on the CPU; NVRTC lets the compile check build PTX for sm_90
# without a GPU (libnvvm comes from the machine's CUDA toolkit; the check skips, naming it, without).
SIM = ["numba>=0.60", "numba-cuda>=0.30", "nvidia-cuda-nvrtc==13.*"]

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
        # CUDA 12 drivers; on a CUDA 13 driver use cupy-cuda13x and numba-cuda[cu13] instead.
        "gpu": ["cupy-cuda12x", "numba>=0.60", "numba-cuda[cu12]>=0.30"],
    },
    entry_points={"console_scripts": ["ddpm=ddpm_ref.cli:main"]},
)
