"""Time DIFT's official SPair evaluation (github Tsingularity/dift, unmodified ``eval_spair.main``)
on a random-weight model folder: one round of ``benchmarks/bench_dift.py``'s side-by-side job.

Runs in the OLD stack (README.md) with the shims of ``official_stack.py``; sdzero's draws are
injected so both sides compute on identical inputs. Usage::

    official_speed.py SPEC.json

``SPEC`` holds ``mirror`` (DIFT's git dir), ``work``, ``model`` (built with ``arch`` when absent),
``digests`` (also hash every tensor as loaded), ``out`` (the JSON written) and ``runs``: a list
of ``{name, data, draws, img_size, ensemble_size, t, up_ft_index}``. The featurizer is built
once (the first run's categories; later runs must have the same) and reused. Per run, ``out``
gets the seconds of each ``SDFeaturizer4Eval.forward`` (one per distinct image: the official
loop extracts each image once), of the whole ``eval_spair.main`` call without the featurizer's
build, the pair and keypoint counts; the official features go to ``<out stem>-<name>.safetensors``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_stack import Hooks, build_model, model_digests, official_code  # noqa: E402


def pair_counts(data: Path) -> tuple[int, int]:
    """(pairs, keypoints) of the test split the official loop reads."""
    test_dir = data / "PairAnnotation" / "test"
    pairs = [json.loads((test_dir / name).read_text()) for name in os.listdir(test_dir)]
    return len(pairs), sum(len(p["src_kps"]) for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    spec = json.loads(Path(parser.parse_args().spec).read_text())
    work, model = Path(spec["work"]), Path(spec["model"])
    work.mkdir(parents=True, exist_ok=True)
    built = None
    if not model.exists():
        start = time.perf_counter()
        build_model(model, spec["arch"])
        built = time.perf_counter() - start
    commit = official_code(spec["mirror"], work)
    import eval_spair

    out = Path(spec["out"])
    result = {
        "dift_commit": commit,
        "model_built_seconds": built,
        "versions": {
            m: __import__(m).__version__ for m in ("torch", "diffusers", "transformers", "numpy")
        },
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "runs": [],
    }
    hooks = None
    for run in spec["runs"]:
        data = Path(run["data"])
        draws = load_file(run["draws"])
        if hooks is None:
            hooks = Hooks(model, data, draws, reuse=True)
        hooks.data, hooks.draws, hooks.seconds = data, draws, {}
        builds = len(hooks.build_seconds)
        save = work / f"official_features_{run['name']}"
        args = argparse.Namespace(
            dataset_path=str(data),
            save_path=str(save),
            dift_model="sd",
            img_size=[run["img_size"], run["img_size"]],
            t=run["t"],
            up_ft_index=run["up_ft_index"],
            ensemble_size=run["ensemble_size"],
        )
        printed = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            eval_spair.main(args)
        total = time.perf_counter() - start - sum(hooks.build_seconds[builds:])
        pairs, keypoints = pair_counts(data)
        features = {
            f"JPEGImages/{cat.stem}/{image}": ft[0].contiguous()
            for cat in sorted(save.glob("*.pth"))
            for image, ft in torch.load(cat).items()
        }
        save_file(features, str(out.with_name(f"{out.stem}-{run['name']}.safetensors")))
        result["runs"].append(
            {
                "name": run["name"],
                "forward_seconds": hooks.seconds,
                "main_seconds": total,
                "build_seconds": hooks.build_seconds[builds:],
                "pairs": pairs,
                "keypoints": keypoints,
                "printed": printed.getvalue().splitlines()[-2:],
            }
        )
    if spec.get("digests") and hooks is not None:
        result["sha256"] = model_digests(hooks.featurizers[0].pipe, model)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
