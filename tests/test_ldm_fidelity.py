"""sdzero's ``ldm_corr`` against the official code's own outputs (``fixtures/ldm_tiny/``, README there).

The tiny model is loaded through sdzero's local-folder loader; the official crop boxes, noise tensors
and initial conditioning are fed in; every intermediate quantity must agree to 1e-5 relative
(``max|sdzero - official| / max|official|``) and the predicted point exactly.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdzero.backbones import attention
from sdzero.backbones.sd import load_stable_diffusion
from sdzero.correspondence.crops import corner_crops, random_crop_around, to_crop_frame
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence, gaussian_targets

ROOT = Path(__file__).parent / "fixtures" / "ldm_tiny"
TOL = 1e-5
# the official layers 5-8 (indices among the stored maps with <= 32^2 queries) at a 512 px input
OFFICIAL_MODULES = [
    *(f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn2" for i in range(3)),
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
]
# diffusers 0.8 names of the VAE mid-block attention (modern -> 0.8)
VAE_RENAMES = [
    ("to_q.", "query."),
    ("to_k.", "key."),
    ("to_v.", "value."),
    ("to_out.0.", "proj_attn."),
]


def rel(mine, ref) -> float:
    a, b = torch.as_tensor(mine).double(), torch.as_tensor(ref).double()
    assert a.numel() == b.numel()
    return ((a.reshape(-1) - b.reshape(-1)).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def fx():
    with safe_open(str(ROOT / "fixture.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["meta"])
    sd = load_stable_diffusion(str(ROOT / meta["model_folder"]), dtype=torch.float32)
    budget = meta["budget"]
    cfg = FitConfig(
        steps=budget["num_steps"], num_embeddings=1, inference_crops=budget["num_iterations"]
    )
    src = tensors["image.source"].float()[None] / 255
    trg = tensors["image.target"].float()[None] / 255
    return dict(T=tensors, meta=meta, sd=sd, cfg=cfg, src=src, trg=trg)


@pytest.fixture
def probe(monkeypatch):
    """Records the raw token-1 maps ``{layer: (B, heads, q)}`` of every capture call."""
    calls = []
    real = attention.AttentionCapture.__call__

    def call(cap, *a, **k):
        got = real(cap, *a, **k)
        calls.append({layer: got.probs[layer][..., 1].detach().clone() for layer in cap.layers})
        return got

    monkeypatch.setattr(attention.AttentionCapture, "__call__", call)
    return calls


def assert_maps(call, T, key, k, layers=(5, 6, 7, 8)):
    for layer, official in zip(call, layers, strict=True):
        want = T[f"{key}.l{official}"][k].reshape(4, -1)
        assert rel(call[layer][0], want) <= TOL, (key, k, layer)


def test_weights_and_constants_are_the_official_ones(fx):
    T, meta, sd, cfg = fx["T"], fx["meta"], fx["sd"], fx["cfg"]
    sha = meta["weight_sha256"]

    def hashes(module, renames=()):
        out = {}
        for name, tensor in module.state_dict().items():
            for a, b in renames:
                name = name.replace(f"mid_block.attentions.0.{a}", f"mid_block.attentions.0.{b}")
            out[name] = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
        return out

    assert hashes(sd.unet) == sha["unet"]
    assert hashes(sd.vae, VAE_RENAMES) == sha["vae"]
    assert rel(sd.scheduler.alphas_cumprod, T["scheduler.alphas_cumprod"]) <= TOL
    assert float(sd.vae.config.scaling_factor) == 0.18215
    defaults = meta["defaults"]
    assert cfg.lr == defaults["lr"] and cfg.sigma == defaults["sigma"]
    assert cfg.crop_fraction * 100 == pytest.approx(defaults["crop_percent"], rel=1e-15)
    assert (cfg.opt_timestep, cfg.infer_timestep) == (int(T["opt.t"][0]), int(T["inf.t"][0]))
    pc = PromptCorrespondence(sd, cfg)
    assert pc.crop == int(T["opt.box"][0, 2]) == 477
    assert attention.resolve_layers(sd.unet, cfg.layers) == OFFICIAL_MODULES
    # the corners in the official order (the noise of the k-th crop goes with the k-th corner)
    assert corner_crops(512, pc.crop) == [tuple(b) for b in T["inf.box"].tolist()]


def test_each_optimisation_step_equals_the_official_one(fx, probe):
    T, sd, cfg, src = fx["T"], fx["sd"], fx["cfg"], fx["src"]
    pc = PromptCorrespondence(sd, cfg)
    cache = pc.latent_cache(src)
    point = T["keypoint.source"]
    for k, box in enumerate(tuple(b) for b in T["opt.box"].tolist()):
        # the official box lies in sdzero's admissible range: the same crop rule
        g = torch.Generator().manual_seed(k)
        drawn = {
            random_crop_around(tuple(point.tolist()), 512, pc.crop, 0.15, g) for _ in range(400)
        }
        assert box in drawn
        lat = cache([box])
        assert rel(lat, T["opt.latent"][k]) <= TOL
        cond = T["opt.context"][k][None].clone().requires_grad_(True)
        with torch.enable_grad():
            maps = pc.step_maps(lat, T["opt.noise"][k : k + 1], cond, cfg.opt_timestep)
            assert_maps(probe[-1], T, "opt.maps", k)
            centre = to_crop_frame(point, box, 512)
            assert rel(centre, T["opt.gauss_center"][k]) <= TOL
            target = gaussian_targets(centre[None], 512, pc.sigma, cfg.gaussian_grid)
            assert rel(target[0, ::4, ::4], T["opt.gauss_s4"][k]) <= TOL
            loss = pc.step_loss(maps, target)
            assert rel(loss, T["opt.loss"][k]) <= TOL
            (grad,) = torch.autograd.grad(loss.sum(), cond)
        assert rel(grad, T["opt.grad"][k]) <= TOL


def test_the_fit_loop_and_inference_equal_the_official_run(fx, probe, monkeypatch):
    T, sd, cfg = fx["T"], fx["sd"], fx["cfg"]
    steps = cfg.steps
    pc = PromptCorrespondence(sd, cfg)
    boxes = iter(tuple(b) for b in T["opt.box"].tolist())
    noise = iter(T["opt.noise"][k : k + 1] for k in range(steps))
    pc.draw_boxes = lambda points, gens, groups=None: [next(boxes)]
    pc.draw_noise = lambda gens: next(noise)
    adam = []
    real_adam = torch.optim.Adam

    class RecordingAdam(real_adam):
        def step(self, *a, **k):
            param = self.param_groups[0]["params"][0]
            grad = param.grad.detach().clone()
            out = super().step(*a, **k)
            adam.append((grad, param.detach().clone()))
            return out

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    gens = [torch.Generator().manual_seed(0)]
    point = T["keypoint.source"][None]
    fitted = pc.optimise(fx["src"], point, gens, init=T["opt.context"][:1])
    assert len(adam) == len(probe) == steps
    for k in range(steps):
        assert_maps(probe[k], T, "opt.maps", k)
        assert rel(adam[k][0][0], T["opt.grad"][k]) <= TOL
        assert rel(adam[k][1][0], T["opt.context"][k + 1]) <= TOL
    assert rel(fitted[0], T["opt.context"][steps]) <= TOL

    # inference: with the official fitted context (D, E), and with sdzero's own (F)
    for context in (T["opt.context"][steps], fitted[0]):
        probe.clear()
        inf = PromptCorrespondence(sd, cfg)
        crops = iter(T["inf.noise"][j : j + 1] for j in range(4))
        inf.draw_noise = lambda gens, it=crops: next(it)
        cache = inf.latent_cache(fx["trg"])
        canvas = inf.infer(fx["trg"], context[None], gens, latents=cache)
        for j, box in enumerate(corner_crops(512, inf.crop)):
            assert rel(cache([box]), T["inf.latent"][j]) <= TOL
            assert_maps(probe[j], T, "inf.maps", j)
        assert rel(canvas[0][:, ::4, ::4], T["inf.canvas_s4"]) <= TOL
        assert rel(canvas[0].double().sum(dim=(1, 2)), T["inf.canvas_sum"]) <= TOL
        point_est = PromptCorrespondence.readout(canvas[:, None])[0]
        assert point_est.tolist() == T["readout.point"].tolist()
