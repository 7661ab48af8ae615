"""Data for ddpm-ref: the embedded 8x8 digits, 2-D toy distributions, and loaders for user files.

``load_dataset(name_or_path, split="train", seed=0)`` returns a :class:`Dataset` whose ``x`` is
float32 (N, C, H, W) in [-1, 1] (images: 8-bit ``u`` -> ``u / 127.5 - 1``, DDPM section 3.3) or
(N, D) (vectors); :func:`to_uint8` undoes the image scaling. See ``loaders.py`` for the sources
understood, ``digits.py`` for the embedded set (licence: ``DIGITS_LICENSE.txt``) and its fixed split,
and ``toys.py`` for the toy distributions.
"""
from .digits import DIGITS_LEVELS, digits_uint8
from .loaders import (Dataset, from_uint8, load_array_file, load_dataset, load_image_folder,
                      read_idx, to_uint8)
from .toys import TOYS, toy_data

__all__ = [
    "Dataset", "load_dataset", "to_uint8", "from_uint8", "read_idx", "load_image_folder",
    "load_array_file", "DIGITS_LEVELS", "digits_uint8", "TOYS", "toy_data",
]
