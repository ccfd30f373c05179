"""LoRA, low-rank adaptation of MM-DiT's linear layers: the files other tools read, merging, and training with peft.

A LoRA of a linear layer W [out, in] is a down projection A [r, in], an up projection B [out, r] and alpha: the layer
becomes W + (alpha / r) B A (times a user scale when applied). rectflow holds a LoRA as {module name: Adapter}, the
module names in rectflow's (= the released files') layout, where q, k and v are one fused `qkv` projection.

File formats (all are read, detected from the keys; `rectflow convert-lora --to` writes any):
  rectflow   joint_blocks.N.x_block.attn.qkv.lora_A.weight / .lora_B.weight, the alphas in the metadata
  diffusers  transformer.transformer_blocks.N.attn.to_q.lora_A.weight / .lora_B.weight (the PEFT layout, q, k, v
             separate), alpha in the `lora_adapter_metadata` header diffusers writes and its load_lora_weights reads
  kohya      lora_unet_joint_blocks_N_x_block_attn_qkv.lora_down.weight / .lora_up.weight / .alpha (sd-scripts' SD3)
  comfy      diffusion_model.joint_blocks.N.x_block.attn.qkv.lora_down.weight / .lora_up.weight / .alpha (ComfyUI's
             own key names; ComfyUI reads kohya and diffusers files too)

Fused <-> split, exactly: a fused qkv LoRA (A, B) is three q, k, v LoRAs sharing A, each with a third of B's rows
(same rank, same alpha). Three q, k, v LoRAs sharing one A fuse back to it; others fuse block-diagonally,
A = [Aq; Ak; Av] (rank 3r), B = diag(Bq, Bk, Bv) with alpha 3 alpha (the same alpha / r), which splits back exactly.
diffusers orders the two-output adaLN (final layer, pre-only last context block) as (scale, shift), the released
layout (shift, scale): B's row halves are swapped (rectflow.checkpoints).
"""
from __future__ import annotations

from rectflow.lora.adapter import Adapter, diffusers_modules, from_diffusers, fuse, released_module, split, to_diffusers
from rectflow.lora.formats import (BASE_KEY, DIFFUSERS_METADATA, FORMATS, RECTFLOW_TAG, detect_format, lora_tensors,
                                   parse_spec, read_lora, write_lora)
from rectflow.lora.layers import TARGETS, adapters, attach, load_adapters, parse_blocks, select_modules
from rectflow.lora.merge import apply_loras, check_lora, merge

__all__ = ["Adapter", "BASE_KEY", "DIFFUSERS_METADATA", "FORMATS", "RECTFLOW_TAG", "TARGETS", "adapters", "apply_loras",
           "attach", "check_lora", "detect_format", "diffusers_modules", "from_diffusers", "fuse", "load_adapters",
           "lora_tensors", "merge", "parse_blocks", "parse_spec", "read_lora", "released_module", "select_modules",
           "split", "to_diffusers", "write_lora"]
