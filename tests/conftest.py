"""Test defaults: CPU only, offline, no W&B, deterministic threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("SDZERO_RUN_DIR", None)
# One thread per process: several tests start sdzero subprocesses (DDP ranks), and oversubscribed
# OpenMP threads on a 2-core machine slow torch down by orders of magnitude.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd():
    """A tiny random-weight Stable Diffusion, fresh for each test module (fits switch state on it,
    e.g. gradient checkpointing)."""
    from sdzero.backbones.sd import load_stable_diffusion

    return load_stable_diffusion(None, "tiny")


@pytest.fixture(autouse=True)
def _no_run_dir_leak(monkeypatch):
    """`sdzero eval` exports the run folder for DDP ranks; tests must not inherit each other's."""
    monkeypatch.delenv("SDZERO_RUN_DIR", raising=False)


def pytest_collection_modifyitems(config, items):
    """`slow` tests need real weights (and ideally a GPU): they run only with SDZERO_SLOW=1."""
    if os.environ.get("SDZERO_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set SDZERO_SLOW=1 (needs real weights in the HF cache)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_network_built(monkeypatch):
    """Building any network (SD's UNet or VAE, a timm or open_clip model) fails the test: for
    checks that must come before anything loads."""
    import diffusers
    import open_clip
    import timm

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL):
        monkeypatch.setattr(cls, "__init__", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)


@pytest.fixture(scope="session")
def offline_wandb(tmp_path_factory):
    """Both tasks' small runs logged to W&B offline (``wandb_offline.OFFLINE_RUNS``), in one
    `sdzero` process: name -> run folder."""
    from cli_runs import sdzero_many
    from wandb_offline import OFFLINE_ENV, OFFLINE_RUNS

    folder = tmp_path_factory.mktemp("wandb")
    runs = {name: folder / name for name in OFFLINE_RUNS}
    commands = [(name, [*argv, f"output_dir={runs[name]}"]) for name, argv in OFFLINE_RUNS.items()]
    sdzero_many(commands, folder, env=OFFLINE_ENV)
    return runs
