"""Speed of the correspondence fitting loop on the real SD 1.4 architecture (random weights).

Measures, at each resolution: one optimisation step (crop VAE encode + noised UNet forward to the
read layers + backward) with the UNet truncated after the last read layer vs the full UNet, for one
embedding and for a batch of 5 embeddings (the restarts of one query point), and one inference pass.
The per-query-point figure combines them as the official defaults run: 129 steps x 5 embeddings +
20 crops x 5 embeddings.

    python benchmarks/bench_correspondence.py --sizes 256 512

Numbers are wall-clock seconds on whatever machine runs it (CPU by default, --device cuda).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from sdzero.backbones.sd import load_stable_diffusion
from sdzero.correspondence.fitting import FitConfig, PromptCorrespondence, item_generator


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bench(size: int, repeats: int, device: str, sd) -> dict:
    out = {"size": size}
    image = torch.rand(1, 3, size, size, device=device)
    for truncate in (True, False):
        for batch in (1, 5):
            cfg = FitConfig(image_size=size, steps=1, num_embeddings=batch, truncate=truncate)
            pc = PromptCorrespondence(sd, cfg)
            gens = [item_generator(0, 0, 0, j) for j in range(batch)]
            points = torch.full((batch, 2), size / 2)
            sec = _timed(
                lambda pc=pc, gens=gens, points=points: pc.optimise(image, points, gens), repeats
            )
            out[f"step_{'trunc' if truncate else 'full'}_b{batch}"] = sec
    cfg = FitConfig(image_size=size, inference_crops=1, num_embeddings=1)
    pc = PromptCorrespondence(sd, cfg)
    cond = torch.randn(1, 77, 768, device=device)
    out["infer_pass"] = _timed(lambda: pc.infer(image, cond, [item_generator(0, 0, 0, 0)]), repeats)
    e, steps, crops = 5, 129, 20
    out["query_point_b1"] = steps * e * out["step_trunc_b1"] + crops * e * out["infer_pass"]
    out["query_point_b5"] = steps * out["step_trunc_b5"] + crops * e * out["infer_pass"]
    out["query_point_full_b1"] = steps * e * out["step_full_b1"] + crops * e * out["infer_pass"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="sd14")
    args = parser.parse_args()
    sd = load_stable_diffusion(None, args.arch, device=args.device)
    rows = [bench(s, args.repeats, args.device, sd) for s in args.sizes]
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {"threads": torch.get_num_threads(), "peak_rss_gb": peak_gb, "rows": rows}, indent=1
        )
    )
    print(
        "\n| px | step trunc b1 | step full b1 | step trunc b5 (per emb) | infer pass | "
        "query point: full b1 | trunc b1 | trunc b5 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['step_trunc_b1']:.2f} s | {r['step_full_b1']:.2f} s | "
            f"{r['step_trunc_b5']:.2f} s ({r['step_trunc_b5'] / 5:.2f}) | {r['infer_pass']:.2f} s | "
            f"{r['query_point_full_b1'] / 60:.1f} min | {r['query_point_b1'] / 60:.1f} min | "
            f"{r['query_point_b5'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
