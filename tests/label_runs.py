"""A finished teacher run written by hand: the composed config of a run on a split of an SPair-layout
folder and records whose predictions a test chooses (for the pseudo-label and student tests)."""

from collections.abc import Callable
from pathlib import Path

import torch

from sdzero.config import compose, instantiate, save_config
from sdzero.records import RecordWriter


def teacher_run(
    out: Path,
    root: Path,
    predict: Callable[[dict], torch.Tensor],
    split: str = "trn",
    reverse: bool = False,
    grid: int = 0,
    **keys: str,
) -> Path:
    """A run folder at ``out``: ``config.yaml`` of ``data=spair`` on ``root``'s ``split``
    (``data.query_points=grid:<grid>`` when ``grid``, ``data.reverse``), group choices ``keys``
    (default ``method=ldm_corr backbone=sd14``), and one record per pair whose ``pred_kps`` are
    ``predict(sample)`` for the sample as that run sees it."""
    items = {"method": "ldm_corr", "backbone": "sd14", **keys}
    query = f"grid:{grid}" if grid else "keypoints"
    overrides = [f"{k}={v}" for k, v in items.items()] + ["data=spair", f"data.root={root}"]
    overrides += [f"data.split={split}", f"data.query_points={query}", f"data.reverse={reverse}"]
    cfg = compose(None, overrides)
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    with RecordWriter(out / "predictions" / "rank0.jsonl") as writer:
        for i in range(len(datamodule.dataset)):
            s = datamodule.dataset[i]
            writer.write(
                {
                    "index": i,
                    "id": s["id"],
                    "category": s["category"],
                    "src_kps": s["src_kps"].tolist(),
                    "trg_kps": s["trg_kps"].tolist(),
                    "pred_kps": predict(s).tolist(),
                    "src_size": list(s["src_size"]),
                    "trg_size": list(s["trg_size"]),
                    "threshold_size": 10.0,
                }
            )
    return out
