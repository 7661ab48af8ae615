"""Denoising networks on flat parameter buffers: the DDPM U-Net (:mod:`.unet`) and a residual-MLP
denoiser for low-dimensional data (:mod:`.mlp`). Both expose ``from_preset``, ``init_params``,
``forward``/``backward``, ``named`` and ``denoiser``; see each module's docstring."""
from .mlp import MLP, MLP_PRESETS, MLPConfig
from .unet import CIFAR_PARAMS, UNET_PRESETS, UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "UNET_PRESETS", "CIFAR_PARAMS", "MLP", "MLPConfig", "MLP_PRESETS"]
