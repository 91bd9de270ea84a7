"""Frozen pretrained parts: Stable Diffusion (loading, latents, noise), the one feature tap
(attention probabilities, queries, keys or module outputs of named layers, with truncation),
cross-attention layer naming, the offline CLIP tokenizer, and DINO/DINOv2/CLIP feature extractors.
Import the submodules directly (``sdzero.backbones.sd``, ``.tap``, ``.attention``, ``.tokenizer``,
``.vit``); nothing heavy loads here."""
