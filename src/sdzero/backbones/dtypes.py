"""Float dtypes by name, for the ``*.dtype`` settings (a light module: no diffusers import, so a
method without Stable Diffusion starts without loading it)."""

from __future__ import annotations

import torch

from sdzero.errors import ConfigError

FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_dtype(dtype: torch.dtype | str, key: str = "dtype") -> torch.dtype:
    """A float dtype from its name (``"float32"``, ``"float16"``, ``"bfloat16"``) or itself;
    ``key`` names the setting in the error message."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype]
    raise ConfigError(
        f"{key} must be one of {list(FLOAT_DTYPES)} (or a torch float dtype); got {dtype!r}"
    )
