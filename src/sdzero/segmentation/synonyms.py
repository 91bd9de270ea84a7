"""Classes with several prompt names (``method.synonyms``).

``first`` (default, the official code: one prompt per class): a class's support set and prototypes
come from its first prompt name. ``all``: every name of the class gets its own support set and
prototypes (each cached under its name, so a name shared by benchmarks is built once), and the
class's prototypes are all of them together: its score at a pixel is the best over every name's
prototypes, as SCLIP-style methods take the max over a class's synonyms. The CLIP filter prompts
each class by its first name either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from sdzero.segmentation.prototypes import Prototypes
from sdzero.segmentation.settings import SYNONYM_MODES


def class_prompts(
    prompt_names: Sequence[str],
    synonyms: Sequence[Sequence[str]] | None,
    mode: str,
    classes: Sequence[int],
) -> dict[int, tuple[str, ...]]:
    """``{label index: prompt names to build}`` for ``classes``: the first name (``first``) or all of
    ``synonyms[i]`` (``all``; whose first must be ``prompt_names[i]``). A name may serve one class."""
    if mode not in SYNONYM_MODES:
        raise ValueError(f"method.synonyms must be one of {list(SYNONYM_MODES)}, got {mode!r}")
    if synonyms is not None and len(synonyms) != len(prompt_names):
        raise ValueError(f"{len(synonyms)} synonym lists for {len(prompt_names)} classes")
    out: dict[int, tuple[str, ...]] = {}
    for i in classes:
        names = (prompt_names[i],)
        if mode == "all" and synonyms is not None:
            names = tuple(dict.fromkeys((prompt_names[i], *synonyms[i])))
        out[i] = names
    owners: dict[str, int] = {}
    for i, names in out.items():
        for name in names:
            if owners.setdefault(name, i) != i:
                raise ValueError(
                    f"prompt name {name!r} would build prototypes for classes {owners[name]} and "
                    f"{i}; each prompt name may serve one class"
                )
    return out


def merge_prototypes(parts: Sequence[Prototypes], class_name: str) -> Prototypes:
    """One class's prototypes from its names' (same extractor): rows concatenated in ``parts``
    order, support images listed one after another (image indices shifted accordingly)."""
    if not parts:
        raise ValueError(f"no prototypes to merge for {class_name!r}")
    if len(parts) == 1:
        return parts[0]
    offsets, total = [], 0
    for p in parts:
        offsets.append(total)
        total += len(p.support)

    def images(side: str) -> torch.Tensor:
        shifted = []
        for p, offset in zip(parts, offsets, strict=True):
            index = getattr(p, f"{side}_image")
            shifted.append(torch.where(index >= 0, index + offset, index))
        return torch.cat(shifted)

    def cat(attr: str) -> torch.Tensor:
        return torch.cat([getattr(p, attr) for p in parts])

    extractors = {p.extractor for p in parts}
    if len(extractors) != 1:
        raise ValueError(f"prototypes of {class_name!r} come from extractors {sorted(extractors)}")
    return Prototypes(
        class_name=class_name,
        extractor=extractors.pop(),
        fg=cat("fg"),
        bg=cat("bg"),
        fg_kind=cat("fg_kind"),
        bg_kind=cat("bg_kind"),
        fg_image=images("fg"),
        bg_image=images("bg"),
        fg_region=cat("fg_region"),
        bg_region=cat("bg_region"),
        support=[s for p in parts for s in p.support],
    )


def class_prototypes(
    built: Mapping[str, Mapping[str, Prototypes]],
    prompts: Mapping[int, Sequence[str]],
    extractors: Sequence[str],
) -> dict[int, dict[str, Prototypes]]:
    """``{label index: {extractor: Prototypes}}`` from ``built`` ``{prompt name: {extractor: ...}}``,
    each class's names merged under its first name."""
    return {
        i: {e: merge_prototypes([built[n][e] for n in names], names[0]) for e in extractors}
        for i, names in prompts.items()
    }
