"""MM-DiT's module names in the two layouts of its weights: the released SD3 / SD3.5 files' (rectflow's own) and
diffusers' SD3Transformer2DModel's. rectflow.checkpoints converts whole state dicts with these tables, rectflow.lora
the LoRAs of single layers.
"""

# (released module, diffusers module(s)); three diffusers modules are the q, k, v rows of one fused qkv
X_BLOCK = [
    ("attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")), ("attn.proj", ("attn.to_out.0",)),
    ("attn.ln_q", ("attn.norm_q",)), ("attn.ln_k", ("attn.norm_k",)),
    ("attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v")), ("attn2.proj", ("attn2.to_out.0",)),
    ("attn2.ln_q", ("attn2.norm_q",)), ("attn2.ln_k", ("attn2.norm_k",)),
    ("adaLN_modulation.1", ("norm1.linear",)), ("mlp.fc1", ("ff.net.0.proj",)), ("mlp.fc2", ("ff.net.2",)),
]
CONTEXT_BLOCK = [
    ("attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")), ("attn.proj", ("attn.to_add_out",)),
    ("attn.ln_q", ("attn.norm_added_q",)), ("attn.ln_k", ("attn.norm_added_k",)),
    ("adaLN_modulation.1", ("norm1_context.linear",)),
    ("mlp.fc1", ("ff_context.net.0.proj",)), ("mlp.fc2", ("ff_context.net.2",)),
]
GLOBAL = [
    ("x_embedder.proj", ("pos_embed.proj",)),
    ("t_embedder.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    ("t_embedder.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    ("y_embedder.mlp.0", ("time_text_embed.text_embedder.linear_1",)),
    ("y_embedder.mlp.2", ("time_text_embed.text_embedder.linear_2",)),
    ("context_embedder", ("context_embedder",)), ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),
]
