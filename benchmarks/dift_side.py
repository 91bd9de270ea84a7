"""The pieces of ``bench_dift``'s side-by-side timing: the pair lists both codes run, one official
round (DIFT's ``eval_spair.main`` in its old stack, ``reference/dift/official_speed.py``, a
subprocess) and one sdzero round (a feature method's :meth:`predict_pair` over the same list, in
this process), each giving the same :class:`Timing` per setting.

The official loop extracts every distinct image of the list once, then matches every pair; sdzero
runs with ``method.feature_cache`` (a fresh folder per round), which also extracts each image
once. Random weights; seconds only.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks.common import count_flops
from benchmarks.reference.dift.make_fixture import draws_for
from datamodules.spair import SPairDataset
from datamodules.synthetic_correspondence import write_synthetic_spair
from sdzero.correspondence.base import PairInfo

REFERENCE = Path(__file__).resolve().parent / "reference" / "dift"
SEED = 0  # the run seed keying sdzero's draws (injected into the official code)
KEYPOINTS = 7  # keypoints per pair: SPair-71k test's mean (7.0 over the 360 pairs DHF samples)


@dataclass(frozen=True)
class Setting:
    """One measured configuration: DIFT at ``img_size`` with ``ensemble`` copies, on a list of
    ``pairs`` pairs over ``images`` (1 or 2) distinct images."""

    name: str
    img_size: int
    ensemble: int
    images: int
    pairs: int


@dataclass
class Timing:
    """One round of one setting. ``per_image``: seconds of each distinct image's extraction;
    ``loop``: seconds of the whole pair loop (model loaded; extraction included); ``rest``:
    seconds per pair beside extraction (matching, I/O; sdzero: the pairs after the first, whose
    extra one-time work, e.g. the feature-cache key's weights digest, is ``once``)."""

    per_image: list[float]
    loop: float
    rest: float
    pairs: int
    images: int
    once: float = 0.0
    features: dict[str, torch.Tensor] = field(default_factory=dict)


def write_pair_list(root: Path, setting: Setting, side: int) -> Path:
    """An SPair-layout folder (``root``) whose test split has ``setting.pairs`` pairs over
    ``setting.images`` images: one synthetic ``transform`` pair (a ``side``-px square source, a
    ``5/4 side x side`` target), its keypoints repeated to :data:`KEYPOINTS`; with 2 images the
    pairs alternate source -> target and back, with 1 the source is matched with itself."""
    data = write_synthetic_spair(root, num_pairs=1, image_size=side, kind="transform")
    test = data / "PairAnnotation" / "test"
    (template,) = test.glob("*.json")
    rec = json.loads(template.read_text())
    template.unlink()
    for key in ("src_kps", "trg_kps", "kps_ids"):
        rec[key] = list(itertools.islice(itertools.cycle(rec[key]), KEYPOINTS))
    swapped = {
        (k.replace("src_", "trg_") if k.startswith("src_") else k.replace("trg_", "src_")): v
        for k, v in rec.items()
    }
    itself = {**rec, **{k.replace("src_", "trg_"): v for k, v in rec.items() if "src_" in k}}
    variants = [rec, swapped] if setting.images == 2 else [itself]
    names = []
    for i in range(setting.pairs):
        pair = dict(variants[i % len(variants)])
        stems = [Path(pair[f"{s}_imname"]).stem for s in ("src", "trg")]
        pair["pair_id"] = i + 1
        pair["filename"] = f"{i + 1:06d}-{stems[0]}-{stems[1]}:{pair['category']}"
        (test / f"{pair['filename']}.json").write_text(json.dumps(pair))
        names.append(pair["filename"])
    (data / "Layout" / "large" / "test.txt").write_text("\n".join(names) + "\n")
    return data


def image_names(data: Path) -> list[str]:
    """The images the test pairs of ``data`` use, as ``JPEGImages/<cat>/<file>``."""
    return sorted({item[f"{s}_name"] for item in SPairDataset(data) for s in ("src", "trg")})


def official_round(
    python: str, mirror: str, work: Path, model: Path, arch: str, runs: list[dict], digests: bool
) -> dict[str, Any]:
    """One official round (``official_speed.py`` in ``python``'s stack): ``runs`` are
    ``{name, data, draws, img_size, ensemble_size}``; returns its JSON with a :class:`Timing`
    per run under ``timings``."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        out = Path(tmp) / "official.json"
        spec = {
            "mirror": mirror,
            "work": str(work / "official"),
            "model": str(model),
            "arch": arch,
            "digests": digests,
            "out": str(out),
            "runs": [{**r, "t": 261, "up_ft_index": 1} for r in runs],
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(
            [python, str(REFERENCE / "official_speed.py"), str(Path(tmp) / "spec.json")],
            capture_output=True,
            text=True,
            env=env,
        )
        if proc.returncode:
            raise RuntimeError(f"official_speed.py failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
        result["timings"] = {}
        for run in result["runs"]:
            per_image = list(run["forward_seconds"].values())
            result["timings"][run["name"]] = Timing(
                per_image=per_image,
                loop=run["main_seconds"],
                rest=(run["main_seconds"] - sum(per_image)) / run["pairs"],
                pairs=run["pairs"],
                images=len(per_image),
                features=load_file(str(out.with_name(f"official-{run['name']}.safetensors"))),
            )
    return result


def write_draws(data: Path, setting: Setting, path: Path) -> Path:
    """sdzero's draws for the list's images at ``setting`` (the official side injects them)."""
    save_file(
        draws_for(image_names(data), setting.img_size // 8, setting.ensemble, SEED), str(path)
    )
    return path


def method_round(method: Any, data: Path, keep_features: bool = False) -> Timing:
    """Time ``method`` (a feature method in eval mode with ``method.feature_cache`` set to a
    fresh folder) on the pair list ``data``: every :meth:`features` call (one per distinct image)
    and every :meth:`predict_pair`. The prompt embeddings are made first (the official code makes
    them when its featurizer is built)."""
    dataset = SPairDataset(data)
    items = [dataset[i] for i in range(len(dataset))]
    for item in items:
        method.prompt_embedding(item["category"])
    extracted: list[float] = []
    features: dict[str, torch.Tensor] = {}
    real = method.features

    def timed_features(images: torch.Tensor, names: list[str], category: str) -> torch.Tensor:
        start = time.perf_counter()
        out = real(images, names, category)
        extracted.append(time.perf_counter() - start)
        if keep_features:
            features.update({n: f for n, f in zip(names, out, strict=True)})
        return out

    method.features = timed_features
    rests = []
    try:
        loop_start = time.perf_counter()
        for i, item in enumerate(items):
            before, start = sum(extracted), time.perf_counter()
            pair = PairInfo(
                index=i,
                category=item["category"],
                src_name=item["src_name"],
                trg_name=item["trg_name"],
            )
            method.predict_pair(item["src_img"], item["trg_img"], item["src_kps"], pair)
            rests.append(time.perf_counter() - start - (sum(extracted) - before))
        loop = time.perf_counter() - loop_start
    finally:
        del method.features
    steady = statistics.mean(rests[1:]) if len(rests) > 1 else rests[0]
    return Timing(
        per_image=extracted,
        loop=loop,
        rest=steady,
        pairs=len(items),
        images=len(extracted),
        once=max(rests[0] - steady, 0.0),
        features=features,
    )


def relative_difference(mine: dict[str, torch.Tensor], official: dict[str, torch.Tensor]) -> float:
    """``max |sdzero - official| / max |official|`` over the images both have (each image's
    own maximum)."""
    names = sorted(set(mine) & set(official))
    if not names:
        raise ValueError("no image has features on both sides")
    return max(
        ((mine[n].double() - official[n].double()).abs().max() / official[n].abs().max()).item()
        for n in names
    )


def dift_component_flops(folder_or_arch: str, img_size: int) -> tuple[float, float]:
    """FLOPs of one VAE encode of one image and of one copy's UNet pass to up block 1, at
    ``img_size``, counted on meta tensors (no arithmetic runs). ``folder_or_arch``: a model
    folder or an architecture name."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sdzero.backbones.sd import load_stable_diffusion
    from sdzero.backbones.sd_features import up_block_features

    path = Path(folder_or_arch)
    if path.is_dir():  # the folder's architecture, built on meta from its configs
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(path / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(path / "vae"))
        sd = SimpleNamespace(unet=unet, vae=vae)
    else:
        sd = load_stable_diffusion(None, folder_or_arch, device="meta")
    x = torch.zeros(1, 3, img_size, img_size, device="meta")
    latents = torch.zeros(1, 4, img_size // 8, img_size // 8, device="meta")
    context = torch.zeros(1, 77, sd.unet.config.cross_attention_dim, device="meta")
    with torch.no_grad():
        vae = count_flops(lambda: sd.vae.encode(x).latent_dist.mean)
        unet = count_flops(lambda: up_block_features(sd, latents, 261, context, [1]))
    return vae, unet


def comparable_digests(digests: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Per-tensor sha256 under one naming: diffusers 0.15's VAE attention names, text-model
    tensors without transformers' ``text_model.`` prefix, no ``position_ids`` buffer."""
    renames = [
        ("to_q.", "query."),
        ("to_k.", "key."),
        ("to_v.", "value."),
        ("to_out.0.", "proj_attn."),
    ]
    out = {}
    for part, table in digests.items():
        fixed = {}
        for name, digest in table.items():
            if name.endswith("position_ids"):
                continue
            name = name.removeprefix("text_model.")
            for a, b in renames:
                name = name.replace(f"mid_block.attentions.0.{a}", f"mid_block.attentions.0.{b}")
            fixed[name] = digest
        out[part] = fixed
    return out


def loaded_digests(sd: Any) -> dict[str, dict[str, str]]:
    """Per-tensor sha256 of ``sd``'s UNet, VAE encoder and text encoder as loaded here (the
    official side's ``official_stack.model_digests``; compare with :func:`comparable_digests`)."""

    def table(module: torch.nn.Module) -> dict[str, str]:
        return {
            k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
            for k, v in module.state_dict().items()
        }

    return {
        "unet": table(sd.unet),
        "vae.encoder": table(sd.vae.encoder),
        "text_encoder": table(sd.text_encoder),
    }


def sdzero_round(
    model: Path, datas: dict[str, Path], settings: Sequence[Setting], first: bool, tmp: Path
) -> dict[str, Any]:
    """One sdzero round: ``method=dift`` loaded from ``model`` on each setting's pair list, with
    a fresh feature-cache folder; in the ``first`` round also the weights' digests and the
    matching FLOPs of one pair (features cached)."""
    from sdzero.backbones.sd import load_stable_diffusion
    from sdzero.correspondence.dift import DIFT

    sd = load_stable_diffusion(str(model), text_encoder=True)
    out: dict = {"timings": {}, "match_flops": {}}
    if first:
        out["sha256"] = loaded_digests(sd)
    for s in settings:
        with tempfile.TemporaryDirectory(dir=tmp) as cache:
            method = DIFT(
                {"weights": str(model), "arch": None},
                seed=SEED,
                image_size=s.img_size,
                ensemble_size=s.ensemble,
                feature_cache=cache,
            )
            method.sd = sd
            method.eval()
            out["timings"][s.name] = method_round(method, datas[s.name], keep_features=True)
            if first:
                out["match_flops"][s.name] = pair_flops(method, datas[s.name])
    del sd, method
    gc.collect()
    return out


def pair_flops(method: Any, data: Path) -> float:
    """FLOPs of one :meth:`predict_pair` of the list's first pair, its features cached."""
    item = SPairDataset(data)[0]
    pair = PairInfo(
        index=0, category=item["category"], src_name=item["src_name"], trg_name=item["trg_name"]
    )
    return count_flops(
        lambda: method.predict_pair(item["src_img"], item["trg_img"], item["src_kps"], pair)
    )
