"""Offline W&B runs of both tasks (:data:`OFFLINE_RUNS`, run in one process by the ``offline_wandb``
fixture), and their run files (``run-*.wandb``) read back: protobufs in a LevelDB-style log."""

from collections.abc import Iterator
from pathlib import Path

BLOCK, HEADER = 32768, 7

TO_WANDB = ["trainer.enable_progress_bar=false", "logger=wandb"]  # no progress bar, W&B logger
OFFLINE_RUNS = {  # name -> the `sdzero` argv of a small run logged to W&B offline
    "correspondence": ["eval", "demo_correspondence", "data.num_pairs=1", "method.steps=2"]
    + ["method.num_embeddings=1", "method.inference_crops=4", *TO_WANDB],
    "segmentation": ["eval", "demo_segmentation", "data.num_images=2", *TO_WANDB]
    + ["logger.artifacts=true"],
}
OFFLINE_ENV = {"WANDB_MODE": "offline", "WANDB_API_KEY": ""}


def raw_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            yield buf + chunk


def run_records(run_dir: Path) -> list:
    """The protobuf records of the (single) offline run under ``run_dir``."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    records = []
    for raw in raw_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def logged_values(run_dir: Path) -> dict[str, str]:
    """The last value (JSON text) logged for each history key of the offline run under ``run_dir``."""
    values: dict[str, str] = {}
    for record in run_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                values[item.key or "/".join(item.nested_key)] = item.value_json
    return values


def artifact_types(run_dir: Path) -> list[str]:
    """Types of the artifacts the offline run logged (tables included)."""
    return [
        r.artifact.type for r in run_records(run_dir) if r.WhichOneof("record_type") == "artifact"
    ]
