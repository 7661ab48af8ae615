"""ddpm-ref: a framework-free reference implementation of denoising diffusion probabilistic models.

NumPy and the standard library only. Start reading at ``schedule.py`` (the noise schedule),
``diffusion.py`` (the forward process and the training objective) and ``samplers.py`` (the reverse
process); ``rng.py`` holds the noise contract that every random number follows.
"""
__version__ = "0.1.0"
