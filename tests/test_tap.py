"""The one feature tap on the tiny UNet, its VAE and the tiny ViTs: module outputs and attention
captures equal those of a plain full pass, truncation skips what comes after, names fail clearly."""

import pytest
import torch
import torch.nn.functional as F
from sd1_layers import SD1_CROSS_ATTENTION

from sdzero.backbones.sd import load_stable_diffusion
from sdzero.backbones.tap import FeatureTap, attention_modules
from sdzero.backbones.vit import load_backbone_model

LAYERS = list(SD1_CROSS_ATTENTION)


@pytest.fixture(scope="module")
def sd():
    return load_stable_diffusion(None, "tiny")


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return load_backbone_model("tiny_vit8", weights="random")


@pytest.fixture(scope="module")
def clip_visual():
    torch.manual_seed(0)
    return load_backbone_model("tiny_clip16", weights="random").visual


def _inputs(batch=2, side=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, side, side, generator=g), torch.randn(batch, 77, 32, generator=g)


def _unet_pass(unet, latents, cond):
    return lambda: unet(latents, 140, encoder_hidden_states=cond).sample


class _Recorder:
    """Plain forward hooks: each named module's output and number of calls."""

    def __init__(self, model, names):
        self.outputs, self.calls = {}, dict.fromkeys(names, 0)
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, output):
            self.calls[name] += 1
            self.outputs[name] = output

        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def test_up_block_output_equals_the_full_forward_and_later_modules_never_run(sd):
    unet = sd.unet
    latents, cond = _inputs()
    watched = ["up_blocks.1", "up_blocks.1.upsamplers.0", "up_blocks.2", "up_blocks.3", "conv_out"]
    with torch.no_grad():
        with _Recorder(unet, watched) as full:
            plain = unet(latents, 140, encoder_hidden_states=cond).sample
        with _Recorder(unet, watched) as cut, FeatureTap(unet, outputs=["up_blocks.1"]) as tap:
            got = tap.run(_unet_pass(unet, latents, cond))
    # 32x32 latents: up_blocks.1 upsamples 8 -> 16; tiny's channels (32, 32, 64, 64) reversed.
    assert got.outputs["up_blocks.1"].shape == (2, 64, 16, 16)
    assert torch.equal(got.outputs["up_blocks.1"], full.outputs["up_blocks.1"])
    assert got.output is None  # cut: no noise prediction
    assert full.calls == dict.fromkeys(watched, 1)
    assert cut.calls == {
        "up_blocks.1": 1,
        "up_blocks.1.upsamplers.0": 1,  # the block's own upsampler is part of its output
        "up_blocks.2": 0,
        "up_blocks.3": 0,
        "conv_out": 0,
    }
    with torch.no_grad(), FeatureTap(unet, outputs=["up_blocks.1"], truncate=False) as tap:
        whole = tap.run(_unet_pass(unet, latents, cond))
    assert torch.equal(whole.output, plain)
    assert torch.equal(whole.outputs["up_blocks.1"], got.outputs["up_blocks.1"])


def test_outputs_and_attention_at_once_equal_a_plain_pass(sd):
    unet = sd.unet
    latents, cond = _inputs(seed=1)
    probs_layer, query_layer, key_layer = (
        LAYERS[10],
        LAYERS[0],
        LAYERS[3],
    )  # 10: up_blocks.2.attentions.0
    projections = [f"{probs_layer}.to_q", f"{probs_layer}.to_k", f"{query_layer}.to_q"]
    projections.append(f"{key_layer}.to_k")
    watched = [
        *projections,
        f"{probs_layer}.to_v",
        "up_blocks.2.resnets.0",
        "up_blocks.2.resnets.1",
    ]
    with torch.no_grad():
        with _Recorder(unet, watched) as full:
            unet(latents, 140, encoder_hidden_states=cond)
        with (
            _Recorder(unet, watched) as cut,
            FeatureTap(
                unet,
                outputs=["down_blocks.1", "mid_block"],
                probs=[probs_layer],
                queries=[query_layer],
                keys=[key_layer],
                heads=[1, 6],
            ) as tap,
        ):
            got = tap.run(_unet_pass(unet, latents, cond), grid=(32, 32))
    # The cut happened inside layer 10 (up_blocks.2.attentions.0): its values, the next resnet
    # and everything after never ran.
    assert cut.calls[f"{probs_layer}.to_v"] == 0 and cut.calls["up_blocks.2.resnets.1"] == 0
    assert cut.calls["up_blocks.2.resnets.0"] == 1
    assert torch.equal(got.queries[query_layer], full.outputs[f"{query_layer}.to_q"])
    assert torch.equal(got.keys[key_layer], full.outputs[f"{key_layer}.to_k"])
    assert got.keys[key_layer].shape == (2, 77, 32)  # cross-attention keys: one per token
    assert got.hw == {query_layer: (32, 32), key_layer: (16, 16), probs_layer: (16, 16)}
    # Probabilities by hand from the full pass's projections: softmax(q k^T / sqrt(d)), 8 heads.
    q, k = (
        full.outputs[f"{probs_layer}.{p}"].unflatten(-1, (8, -1)).transpose(1, 2)
        for p in ("to_q", "to_k")
    )
    expected = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)[:, [1, 6]]
    assert got.probs[probs_layer].shape == (2, 2, 16 * 16, 77)
    torch.testing.assert_close(got.probs[probs_layer], expected, rtol=0, atol=1e-6)
    with torch.no_grad(), FeatureTap(unet, outputs=["down_blocks.1", "mid_block"]) as tap:
        outs = tap.run(_unet_pass(unet, latents, cond)).outputs
    hidden, residuals = got.outputs["down_blocks.1"]  # down blocks return (hidden, residuals)
    assert torch.equal(hidden, outs["down_blocks.1"][0]) and len(residuals) == 3
    assert torch.equal(got.outputs["mid_block"], outs["mid_block"])


def test_vae_encoder_attention_and_block_output(sd):
    vae = sd.vae
    images = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    site = "encoder.mid_block.attentions.0"
    with torch.no_grad():
        with _Recorder(vae, [f"{site}.to_q", "encoder.down_blocks.1", "quant_conv"]) as full:
            vae.encode(images)
        with (
            FeatureTap(vae, queries=[site], outputs=["encoder.down_blocks.1"]) as tap,
            _Recorder(vae, ["encoder.conv_out", "quant_conv"]) as cut,
        ):
            got = tap.run(lambda: vae.encode(images))
    assert got.hw[site] == (8, 6)  # the VAE attention sees (B, C, h, w): its grid is exact
    assert torch.equal(got.queries[site], full.outputs[f"{site}.to_q"])
    assert torch.equal(got.outputs["encoder.down_blocks.1"], full.outputs["encoder.down_blocks.1"])
    assert cut.calls == {"encoder.conv_out": 0, "quant_conv": 0}


def _timm_manual(model, images, block):
    """Tokens entering ``block`` of a timm ViT's own forward, and that block."""
    seen = {}
    layer = model.blocks[block]
    handle = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0]))
    model.forward_features(images)
    handle.remove()
    return layer, seen["in"]


def test_vit_keys_queries_probs_of_block_n(vit):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        layer, tokens = _timm_manual(vit, images, 1)
        qkv = layer.attn.qkv(layer.norm1(tokens))
        calls = {"mlp": 0, "next": 0}
        handles = [
            layer.mlp.register_forward_pre_hook(lambda *a: calls.__setitem__("mlp", 1)),
            vit.blocks[2].register_forward_pre_hook(lambda *a: calls.__setitem__("next", 1)),
        ]
        with FeatureTap(vit, keys=["blocks.1"], queries=["blocks.1"], probs=["blocks.1"]) as tap:
            got = tap.run(lambda: vit.forward_features(images))
        for handle in handles:
            handle.remove()
    assert calls == {"mlp": 0, "next": 0}  # stopped inside block 1, before its attention ran
    assert torch.equal(got.queries["blocks.1"], qkv[..., :32])
    assert torch.equal(got.keys["blocks.1"], qkv[..., 32:64])
    q, k = (t.unflatten(-1, (2, 16)).transpose(1, 2) for t in (qkv[..., :32], qkv[..., 32:64]))
    expected = F.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)  # head width 16
    assert got.probs["blocks.1"].shape == (2, 2, 17, 17)  # class token + 4x4 patches
    torch.testing.assert_close(got.probs["blocks.1"], expected, rtol=0, atol=1e-6)


def test_open_clip_keys_and_block_output(clip_visual):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    block = clip_visual.transformer.resblocks[1]
    seen = {}
    with torch.no_grad():
        handles = [
            block.register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0])),
            block.register_forward_hook(lambda m, a, o: seen.setdefault("out", o)),
        ]
        clip_visual(images)
        for handle in handles:
            handle.remove()
        name = "transformer.resblocks.1"
        with FeatureTap(clip_visual, keys=[name], outputs=[name], probs=[name]) as tap:
            got = tap.run(lambda: clip_visual(images))
        attn = block.attn
        normed = block.ln_1(seen["in"])
        keys = F.linear(normed, attn.in_proj_weight[32:64], attn.in_proj_bias[32:64])
        _, weights = attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(got.keys[name], keys, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.probs[name], weights, rtol=0, atol=1e-6)
    assert torch.equal(got.outputs[name], seen["out"])


def test_unknown_names_fail_listing_what_exists(sd, vit):
    unet = sd.unet
    with pytest.raises(
        ValueError,
        match=r"no submodule 'up_blocks\.7'; under 'up_blocks' there are: "
        r"up_blocks\.0, up_blocks\.1, up_blocks\.2, up_blocks\.3$",
    ):
        FeatureTap(unet, outputs=["up_blocks.7"])
    with pytest.raises(ValueError, match=r"'nope'; at the top level there are: conv_in, time_proj"):
        FeatureTap(unet, outputs=["nope"])
    with pytest.raises(
        ValueError,
        match=r"'up_blocks\.1' is not an attention module and holds 6: "
        r"up_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1, ",
    ):
        FeatureTap(unet, keys=["up_blocks.1"])
    with pytest.raises(ValueError, match=r"'conv_in' is not an attention module and holds none"):
        FeatureTap(unet, probs=["conv_in"])
    with pytest.raises(ValueError, match=r"'blocks\.9'; under 'blocks' there are: blocks\.0, bl"):
        FeatureTap(vit, keys=["blocks.9"])
    with pytest.raises(ValueError, match=r"7 is not a module path.*resolve_layers"):
        FeatureTap(unet, probs=[7])
    with pytest.raises(ValueError, match=r"needs at least one name"):
        FeatureTap(unet)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn' and 'blocks\.0' are the same"):
        FeatureTap(vit, keys=["blocks.0"], probs=["blocks.0.attn"])
    with pytest.raises(ValueError, match=r"heads \[2\] out of range for layers with \[2\] heads"):
        FeatureTap(vit, probs=["blocks.0"], heads=[2])
    assert attention_modules(vit) == ["blocks.0.attn", "blocks.1.attn", "blocks.2.attn"]


def test_run_needs_the_tap_entered_and_every_name_to_run(vit):
    tap = FeatureTap(vit, outputs=["blocks.0"])
    with pytest.raises(RuntimeError, match="must be entered"):
        tap.run(lambda: None)
    with tap, pytest.raises(RuntimeError, match=r"never ran.*\('outputs', 'blocks\.0'\)"):
        tap.run(lambda: None)
    assert not vit.blocks[0]._forward_hooks  # hooks removed on exit


def test_callback_streams_direct_calls_in_full(vit):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    seen = []
    with torch.no_grad():
        plain = vit.forward_features(images)
        with FeatureTap(vit, outputs=["blocks.0"], callback=lambda *a: seen.append(a[:2])):
            direct = vit.forward_features(images)  # not through run(): nothing is cut
    assert torch.equal(direct, plain)
    assert seen == [("blocks.0", "outputs")]
