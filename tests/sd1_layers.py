"""The 16 cross-attention layers of the SD 1.x UNet (and of the `tiny` one), in execution order."""

SD1_CROSS_ATTENTION = (
    [
        f"down_blocks.{b}.attentions.{j}.transformer_blocks.0.attn2"
        for b in range(3)
        for j in range(2)
    ]
    + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
    + [
        f"up_blocks.{b}.attentions.{j}.transformer_blocks.0.attn2"
        for b in (1, 2, 3)
        for j in range(3)
    ]
)
