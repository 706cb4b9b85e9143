"""LoRA on the UNet's attention projections (peft), and merging it back into plain weights for saving.

Only the low-rank factors train; every base weight stays frozen, so a model fine-tuned for one rare finding
keeps what it learned from the whole dataset. After training the factors are merged into the projection
weights, which gives an ordinary ``RadsynthUNet`` that saves and loads like any other.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

# MONAI's attention names its output projection out_proj, diffusers' (a Stable-Diffusion base) to_out.0.
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "out_proj", "to_out.0"]


def add_lora(model: torch.nn.Module, rank: int, alpha: float) -> list[torch.nn.Parameter]:
    """Freeze ``model`` and give its attention projections trainable LoRA factors; returns those factors."""
    model.requires_grad_(False)
    # Linear layers only: an attention without an output projection has an Identity in its place (MAISI's).
    targets = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and any(name == projection or name.endswith(f".{projection}") for projection in ATTENTION_PROJECTIONS)]
    if not targets:
        raise ValueError("the model has no attention projections to adapt (no attention levels?)")
    # B starts at zero (peft default): the adapted model begins exactly where the base model is.
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
    inject_adapter_in_model(config, model)
    factors = [p for name, p in model.named_parameters() if "lora_" in name]
    for parameter in factors:
        parameter.requires_grad_(True)
    return factors


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA layer into its base layer (W + scale * B A) and put the plain layer back in its place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    return model
