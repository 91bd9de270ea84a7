"""Reading a benchmark's files: find its top folder, decode images and label PNGs, read JSON, with
errors that name the file and what was expected (:class:`DatasetFormatError`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdzero.errors import UserError


class DatasetFormatError(UserError, ValueError):
    """A dataset file is missing or malformed; the message names the file and what was expected."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """The dataset's top folder could not be found under ``data.root``."""


# --------------------------------------------------------------------------------------- files


def find_dataset_root(root: str | Path, markers: Sequence[str], layout: str, name: str) -> Path:
    """Return the folder under ``root`` (itself, or up to two levels down) holding every marker path.

    :param root: what the user gave as ``data.root``.
    :param markers: relative paths that must all exist in the dataset's top folder.
    :param layout: a short drawing of the expected layout, shown when nothing is found.
    :param name: the dataset's name for the message.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{name}: data.root={str(root)!r} is not a folder. Expected the unpacked official "
            f"dataset, laid out as:\n{layout}"
        )
    candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())]
    candidates += sorted(p for c in candidates[1:] for p in c.iterdir() if p.is_dir())
    for cand in candidates:
        if all((cand / m).exists() for m in markers):
            return cand
    raise DatasetNotFoundError(
        f"{name}: no folder under {str(root)!r} (searched it and two levels below) holds "
        f"{', '.join(markers)}. Expected the unpacked official dataset, laid out as:\n{layout}"
    )


def _open_image(path: Path, what: str) -> Image.Image:
    """The decoded image file; :class:`DatasetFormatError` naming it if it is missing, not an
    image, or truncated. ``what`` names the file's role in the message (``image``, ``label``)."""
    if path.is_dir():
        raise DatasetFormatError(f"{what} file {str(path)!r} is a folder; expected an image file")
    if not path.is_file():
        raise DatasetFormatError(f"{what} file {str(path)!r} does not exist")
    img = None
    try:
        img = Image.open(path)
        img.load()
    except OSError as err:  # PIL's UnidentifiedImageError and truncated data are OSErrors
        if img is not None:
            img.close()
        raise DatasetFormatError(
            f"{what} file {str(path)!r} cannot be read as an image ({err}); expected a PNG or JPEG"
        ) from err
    return img


def load_rgb(path: str | Path) -> torch.Tensor:
    """Read an image file as ``(3, H, W)`` uint8 RGB in the original pixel grid.

    Grey, palette, CMYK and RGBA files are converted to RGB (several benchmarks contain a few);
    modes that hold no displayable colour (16-bit, float) raise :class:`DatasetFormatError`.
    """
    with _open_image(Path(path), "image") as img:
        if img.mode not in {"RGB", "L", "P", "CMYK", "RGBA", "LA", "YCbCr"}:
            raise DatasetFormatError(
                f"image {str(path)!r} has mode {img.mode!r}; expected an 8-bit colour or grey image"
            )
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def load_label(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Read a label PNG of class indices as ``(H, W)`` int64.

    The file must be single-channel (``L`` or palette ``P``; the palette index is the class). ``size``
    is the expected ``(w, h)``: the image's size, so a label of another size is an error.
    """
    path = Path(path)
    with _open_image(path, "label") as img:
        if img.mode not in {"L", "P"}:
            raise DatasetFormatError(
                f"label {str(path)!r} has mode {img.mode!r}; expected a single-channel PNG of class "
                "indices (mode 'L' or 'P')"
            )
        if size is not None and img.size != tuple(size):
            raise DatasetFormatError(
                f"label {str(path)!r} is {img.size[0]}x{img.size[1]} (w x h) but its image is "
                f"{size[0]}x{size[1]}"
            )
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.astype(np.int64))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DatasetFormatError(f"annotation file {str(path)!r} does not exist") from err
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"annotation file {str(path)!r} is not valid JSON: {err}") from err


def require(record: dict, field: str, path: str | Path) -> Any:
    """``record[field]``, or a :class:`DatasetFormatError` naming the file and the missing field."""
    if field not in record:
        raise DatasetFormatError(f"{str(path)!r} has no field {field!r}")
    return record[field]
