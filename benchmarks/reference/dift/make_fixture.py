"""Make ``tests/fixtures/dift_tiny/``: DIFT's official outputs on a tiny model (README.md here).

Run with sdzero installed (the modern stack); it calls ``official_run.py`` in the old stack::

    python benchmarks/reference/dift/make_fixture.py --mirror <Tsingularity/dift>.git \\
        --python /tmp/dift_venv/bin/python --work /tmp/dift_fidelity

1. writes 4 synthetic SPair-layout pairs (``transform``: 128 px sources, 160x128 targets); the
   targets of pairs 1 and 3 are then made copies of their sources under their own names, so that
   random weights still match some points (a PCK strictly between 0 and 100 tells more than 0);
2. draws, for every image and ensemble copy, sdzero's own posterior-sample and noise tensors
   (:func:`sdzero.correspondence.dift.copy_generator`, in the order :func:`diffused_latents`
   draws them) and stacks them per image as the official batch of copies;
3. runs the official ``eval_spair.py`` on the data with those draws injected (``official_run.py``);
4. copies the model folder, the data and the official outputs into the fixture folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

from datamodules.synthetic_correspondence import write_synthetic_spair
from sdzero.correspondence.dift import copy_generator

HERE = Path(__file__).resolve().parent
FIXTURE = HERE.parents[2] / "tests" / "fixtures" / "dift_tiny"
SEED = 0  # the run seed the draws are keyed by
IMG_SIZE, ENSEMBLE = 256, 8
KIND = "transform"


def draws_for(
    names: list[str], latent: int, ensemble: int = ENSEMBLE, seed: int = SEED
) -> dict[str, torch.Tensor]:
    """``{name}.posterior`` / ``{name}.noise``: ``(ensemble, 4, latent, latent)`` per image, the
    draws sdzero's ``dift`` makes for the image in a run seeded ``seed``."""
    out = {}
    shape = (1, 4, latent, latent)
    for name in names:
        posterior, noise = [], []
        for k in range(ensemble):
            g = copy_generator(seed, name, k)
            posterior.append(torch.randn(shape, generator=g))
            noise.append(torch.randn(shape, generator=g))
        out[f"{name}.posterior"] = torch.cat(posterior)
        out[f"{name}.noise"] = torch.cat(noise)
    return out


def copy_source_into_target(data: Path, pair_file: Path) -> None:
    """Make a pair's target image (and its annotations) a copy of its source, keeping its name."""
    pair = json.loads(pair_file.read_text())
    cat = pair["category"]
    images, notes = data / "JPEGImages" / cat, data / "ImageAnnotation" / cat
    shutil.copy(images / pair["src_imname"], images / pair["trg_imname"])
    note = json.loads((notes / pair["src_imname"]).with_suffix(".json").read_text())
    note["filename"] = pair["trg_imname"]
    (notes / pair["trg_imname"]).with_suffix(".json").write_text(json.dumps(note))
    for key in ("kps", "bndbox", "imsize"):
        pair[f"trg_{key}"] = pair[f"src_{key}"]
    pair_file.write_text(json.dumps(pair))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", required=True, help="git dir of github Tsingularity/dift")
    parser.add_argument("--python", required=True, help="python of the old-stack venv")
    parser.add_argument("--work", required=True)
    opts = parser.parse_args()
    work = Path(opts.work)
    shutil.rmtree(work, ignore_errors=True)
    data = write_synthetic_spair(work / "SPair-71k", num_pairs=4, image_size=128, kind=KIND)
    for pair_file in sorted((data / "PairAnnotation" / "test").glob("*.json"))[::2]:
        copy_source_into_target(data, pair_file)
    names = sorted(p.relative_to(data).as_posix() for p in (data / "JPEGImages").rglob("*.jpg"))
    save_file(draws_for(names, IMG_SIZE // 8), str(work / "draws.safetensors"))
    model = work / "tiny_sd21"
    official = work / "official.safetensors"
    subprocess.run(
        [
            opts.python,
            str(HERE / "official_run.py"),
            f"--mirror={opts.mirror}",
            f"--model={model}",
            f"--data={data}",
            f"--draws={work / 'draws.safetensors'}",
            f"--out={official}",
            f"--work={work}",
            f"--seed={SEED}",
            f"--img-size={IMG_SIZE}",
            f"--ensemble-size={ENSEMBLE}",
        ],
        check=True,
    )
    shutil.rmtree(FIXTURE / "tiny_sd21", ignore_errors=True)
    shutil.rmtree(FIXTURE / "SPair-71k", ignore_errors=True)
    FIXTURE.mkdir(parents=True, exist_ok=True)
    shutil.copytree(model, FIXTURE / "tiny_sd21")
    shutil.copytree(data, FIXTURE / "SPair-71k")
    shutil.copy(official, FIXTURE / "official.safetensors")
    print(f"fixture written to {FIXTURE}")


if __name__ == "__main__":
    main()
