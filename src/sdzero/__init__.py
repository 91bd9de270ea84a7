"""sdzero: zero-shot vision with frozen Stable Diffusion, as PyTorch Lightning evaluations."""

__version__ = "0.1.0"
