"""ddpm_ref's benchmark suite: how fast it trains and samples, and how much memory it takes, against
PyTorch / diffusers on the same machine, in the same run.

Run ``python -m benchmarks --help``. The suite prints a table and writes JSON. Its pieces:

* :mod:`benchmarks.common`: timing (median of interleaved runs after warm-up), machine information,
  the measured float32 GEMM peak, resident-memory measurement, worker subprocesses, table and JSON;
* :mod:`benchmarks.bench_ops`: per-op rows, forward and backward, at every distinct shape the U-Net
  preset uses (found by instrumenting one forward pass), against ``torch.nn.functional`` / diffusers;
* :mod:`benchmarks.bench_e2e`: end-to-end rows: a training step and DDPM / DDIM sampling throughput,
  against diffusers' ``UNet2DModel`` with ``DDPMScheduler`` / ``DDIMScheduler`` on converted weights;
* :mod:`benchmarks.suite`: the command line and the orchestration.

What it is not: a test. No test asserts a time; ``tests/test_benchmarks_smoke.py`` only runs every
row at toy size so that none rots. Importing this package imports nothing else (the thread count
must be fixed in the environment before NumPy loads its BLAS).
"""
