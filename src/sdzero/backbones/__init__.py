"""Frozen pretrained parts: Stable Diffusion (loading, latents, noise), cross-attention capture,
the offline CLIP tokenizer, and DINO/CLIP feature extractors. Import the submodules directly
(``sdzero.backbones.sd``, ``.attention``, ``.tokenizer``, ``.vit``); nothing heavy loads here."""
