"""Run DIFT's official SPair evaluation (github Tsingularity/dift, unmodified) on a tiny model.

Runs in the OLD stack (diffusers 0.15, transformers 4.29; see README.md). It

1. builds the tiny random SD-2.1-topology model folder (``--model``) unless it exists;
2. extracts ``eval_spair.py`` and ``src/`` from the DIFT repository (``--mirror``, a git dir);
3. runs ``eval_spair.main`` on the SPair-layout folder ``--data`` with these shims only
   (``official_stack.py``): CPU for every "cuda" (tensor/module moves, ``torch.cuda.set_device``),
   PyTorch's SDPA attention where the official code switches on xformers (a CUDA-only kernel of
   the same attention), import-only stand-ins for guided-diffusion (used by the ADM featurizer
   only), the featurizer built from ``--model`` instead of the hard-coded hub id, and the random
   draws injected: the VAE posterior samples and the ``torch.randn_like`` noise of each image
   come from ``--draws`` (sdzero's own per-image draws);
4. writes ``--out`` (safetensors): the official per-image features, class prompt embeddings,
   noisy UNet inputs' digests, every argmax pixel, the printed PCK lines and the tensors' sha256
   as loaded by this stack.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_stack import Hooks, build_model, model_digests, official_code  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("mirror", "model", "data", "draws", "out", "work"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--seed", type=int, required=True, help="the run seed keying the draws")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--t", type=int, default=261)
    parser.add_argument("--up-ft-index", type=int, default=1)
    parser.add_argument("--ensemble-size", type=int, default=8)
    opts = parser.parse_args()
    work, model, data = Path(opts.work), Path(opts.model), Path(opts.data)
    if not model.exists():
        build_model(model)
    commit = official_code(opts.mirror, work)

    import eval_spair
    from src.models import dift_sd

    draws = load_file(opts.draws)
    hooks = Hooks(model, data, draws)
    unet_inputs: dict[str, str] = {}
    real_unet_forward = dift_sd.MyUNet2DConditionModel.forward

    def unet_forward(self, sample, *a, **k):
        unet_inputs[hooks.current["name"]] = hashlib.sha256(sample.numpy().tobytes()).hexdigest()
        return real_unet_forward(self, sample, *a, **k)

    dift_sd.MyUNet2DConditionModel.forward = unet_forward
    argmaxes: list[tuple[int, int]] = []
    real_unravel = np.unravel_index

    def unravel(index, shape):
        got = real_unravel(index, shape)
        argmaxes.append((int(got[0]), int(got[1])))
        return got

    np.unravel_index = unravel
    save = work / "official_features"
    args = argparse.Namespace(
        dataset_path=str(data),
        save_path=str(save),
        dift_model="sd",
        img_size=[opts.img_size, opts.img_size],
        t=opts.t,
        up_ft_index=opts.up_ft_index,
        ensemble_size=opts.ensemble_size,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        eval_spair.main(args)
    np.unravel_index = real_unravel

    # the order eval_spair.main visited the pairs in (its own listing rules, same directory state)
    test_dir = data / "PairAnnotation" / "test"
    json_list = os.listdir(test_dir)
    all_cats = os.listdir(data / "JPEGImages")
    order = [j for cat in all_cats for j in json_list if cat in j]
    tensors: dict[str, torch.Tensor] = {}
    pairs, at = [], 0
    for name in order:
        pair = json.loads((test_dir / name).read_text())
        n = len(pair["src_kps"])
        yx = torch.tensor(argmaxes[at : at + n], dtype=torch.int64).reshape(-1, 2)
        tensors[f"pred.{pair['filename']}"] = yx.flip(1)  # (x, y) = (column, row)
        pairs.append(pair["filename"])
        at += n
    assert at == len(argmaxes), (at, len(argmaxes))
    for cat in all_cats:
        for image, ft in torch.load(save / f"{cat}.pth").items():
            tensors[f"features.JPEGImages/{cat}/{image}"] = ft[0].contiguous()
    for cat, emb in hooks.featurizers[0].cat2prompt_embeds.items():
        tensors[f"prompt.{cat}"] = emb[0].contiguous()
    pipe = hooks.featurizers[0].pipe
    meta = {
        "dift_commit": commit,
        "seed": opts.seed,
        "images": sorted({k.rsplit(".", 1)[0] for k in draws}),
        "settings": {
            "img_size": opts.img_size,
            "t": opts.t,
            "up_ft_index": opts.up_ft_index,
            "ensemble_size": opts.ensemble_size,
        },
        "printed": printed.getvalue().splitlines(),
        "pairs": pairs,
        "unet_input_sha256": unet_inputs,
        "draws_sha256": {
            k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in sorted(draws.items())
        },
        "versions": {
            m: __import__(m).__version__
            for m in ("torch", "diffusers", "transformers", "numpy", "PIL")
        },
        "attention": {k: type(v).__name__ for k, v in list(pipe.unet.attn_processors.items())[:1]},
        "sha256": model_digests(pipe, model),
    }
    save_file(tensors, opts.out, metadata={"meta": json.dumps(meta)})
    print("\n".join(meta["printed"]))


if __name__ == "__main__":
    main()
