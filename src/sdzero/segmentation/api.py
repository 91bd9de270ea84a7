"""Library functions behind ``sdzero segment`` and ``sdzero prototypes build``.

Both compose the usual config (``sdzero.config.compose``) from :data:`BASE_OVERRIDES` (the OVDiff
method on SD 1.5, as ``voc_ovdiff``) plus the user's ``key=value`` overrides, so every
``method.*`` key of ``configs/method/ovdiff.yaml`` and ``backbone=...`` work as in ``sdzero eval``.
The class list is the user's: label 0 is the background, label ``i`` the ``i``-th name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from sdzero.config import compose
from sdzero.errors import InputError
from sdzero.records import write_bytes_atomic
from sdzero.requirements import check_requirements

if TYPE_CHECKING:  # torch and the method load once the config is known to be valid
    from sdzero.segmentation.module import OVDiffModule

# The data group is unused here; the synthetic one is chosen because it needs no dataset path.
BASE_OVERRIDES = ("backbone=sd15", "method=ovdiff", "data=synthetic_segmentation", "logger=none")


def check_classes(classes: Sequence[str]) -> list[str]:
    """The class names, stripped; :class:`InputError` if empty, blank or repeated."""
    names = [str(c).strip() for c in classes]
    if not names:
        raise InputError(
            "--classes: no classes given; pass at least one name, e.g. --classes cat dog"
        )
    if any(not n for n in names) or len(set(names)) != len(names):
        raise InputError(f"--classes: names must be non-empty and distinct, got {list(classes)}")
    if "background" in names:
        raise InputError("--classes: 'background' is always label 0; list only the other classes")
    return names


def compose_method(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config of the commands: :data:`BASE_OVERRIDES`, then ``overrides``."""
    return compose(None, [*BASE_OVERRIDES, *overrides])


def load_method(cfg: DictConfig, **method_overrides: Any) -> OVDiffModule:
    """The OVDiff module of ``cfg`` (no run folder), on the GPU when the trainer config allows one."""
    import torch

    from sdzero.runs import build_method

    module = build_method(cfg, **method_overrides)
    check_requirements(module.requirements())  # weights, packages: before anything loads
    gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return module.to("cuda" if gpu else "cpu")


def build_prototype_cache(
    classes: Sequence[str], out: str | Path, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Build (or find) the prototypes of ``classes`` in the cache folder ``out``.

    :returns: ``{"cache": out, "classes": {name: {extractor: {"fg": P, "bg": Q}}}}``.
    """
    names = check_classes(classes)
    module = load_method(compose_method(overrides), prototype_cache=str(out))
    built = module.build_prototypes(names)
    counts = {
        name: {e: {"fg": len(p.fg), "bg": len(p.bg)} for e, p in per.items()}
        for name, per in built.items()
    }
    return {"cache": str(Path(out).resolve()), "classes": counts}


def segment_file(
    image: str | Path,
    classes: Sequence[str],
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    explain: str | Path | None = None,
    pixel: tuple[int, int] | None = None,
    overlay: str | Path | None = None,
) -> dict[str, Any]:
    """Segment the image file ``image`` into background + ``classes``.

    :param out: write the mask (single-channel PNG of label indices, the image's size) there.
    :param overlay: write the prediction coloured over the image, with a legend, there
        (:func:`~sdzero.tasks.label_viz.draw_overlay`; stamped when the weights are random).
    :param explain: write the explanation PNG of ``pixel`` ``(x, y)`` (original pixels) there.
    :returns: a JSON-able summary: classes, kept classes, pixel share per class, explanation.
    """
    names = check_classes(classes)
    if explain is not None and pixel is None:
        raise InputError(
            "--explain needs --pixel X,Y (the pixel to explain, original-image pixels)"
        )
    cfg = compose_method(overrides)  # config errors before torch loads
    import torch

    from datamodules.files import load_rgb
    from sdzero.segmentation.explain import explain_pixel, render_explanation
    from sdzero.tasks.label_viz import draw_overlay
    from sdzero.tasks.segmentation import png_bytes
    from sdzero.tasks.viz import png, stamp_random_weights

    pixels = load_rgb(image)
    if pixel is not None and not (
        0 <= pixel[0] < pixels.shape[2] and 0 <= pixel[1] < pixels.shape[1]
    ):
        raise InputError(
            f"--pixel {pixel} lies outside the {pixels.shape[2]}x{pixels.shape[1]} (w x h) image "
            f"{str(image)!r}"
        )
    module = load_method(cfg)
    labels_names = ["background", *names]
    segmenter = module.prepare(labels_names, background_index=0)
    seg = segmenter(pixels, explain=explain is not None)
    share = torch.bincount(seg.labels.flatten(), minlength=len(labels_names)) / seg.labels.numel()
    summary: dict[str, Any] = {
        "image": str(image),
        "classes": labels_names,
        "kept": [labels_names[i] for i in seg.kept],
        "share": {n: round(float(s), 4) for n, s in zip(labels_names, share, strict=True)},
    }
    if out is not None:
        write_bytes_atomic(out, png_bytes(seg.labels))
        summary["mask"] = str(out)
    if overlay is not None:
        picture = draw_overlay(pixels, seg.labels, labels_names)
        if module.random_weights:
            picture = stamp_random_weights(picture)
        write_bytes_atomic(overlay, png(picture))
        summary["overlay"] = str(overlay)
    if explain is not None:
        explanation = explain_pixel(seg, *pixel, module.prototypes, labels_names)
        render_explanation(pixels, explanation, explain)
        summary["explanation"] = {**explanation.summary(), "png": str(explain)}
    if module.random_weights:
        summary["warning"] = "random weights: this segmentation is meaningless"
    return summary
