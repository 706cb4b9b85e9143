"""A domain embedding: one learned vector added to the UNet's timestep embedding, the only thing that trains.

Every residual block reads the timestep embedding (a per-channel shift of its features), so one vector moves the
whole network towards a new dataset's intensities and textures, the way a class embedding moves it towards a class
(DiffFit's and BitFit's observation: a diffusion model adapts to a new domain through a handful of such terms).
It is the bias of the embedding MLP's output layer, trained from where the base left it: the adapted model starts
exactly at the base and saves as an ordinary model of the base's kind, with nothing to merge.

Its point is its size: the noise of a differentially private fine-tune grows with the square root of what
trains, and time_embed_dim parameters (256 on radsynth's default UNet, against 129,024 LoRA factors at rank 8) keep
the signal of 20 patients near its noise where a LoRA's is 30 times below it (README: what it did for realism).
Block shifts go one step up: each residual block also learns its own per-channel shift, the bias of its timestep
projection (1,216 more on the default UNet), so the blocks need not share the one vector's direction.
"""

from __future__ import annotations

import torch

# radsynth's and MAISI's UNets (MONAI) call the timestep MLP time_embed, diffusers' time_embedding.
TIMESTEP_EMBEDDINGS = ("time_embed", "time_embedding")
# Both call a residual block's projection of that embedding time_emb_proj.
TIMESTEP_PROJECTIONS = ("time_emb_proj",)


def add_domain_embedding(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze ``model`` and let its timestep embedding's output bias train; returns that one parameter."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in TIMESTEP_EMBEDDINGS:
            layers = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)]
            if layers and layers[-1].bias is not None:
                layers[-1].bias.requires_grad_(True)
                return [layers[-1].bias]
    raise ValueError("the model has no timestep embedding with an output bias to train")


def add_block_shifts(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze ``model`` and let its domain embedding and every residual block's timestep-projection bias train."""
    shifts = add_domain_embedding(model)
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in TIMESTEP_PROJECTIONS and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
            shifts.append(module.bias)
    if len(shifts) == 1:
        raise ValueError("the model has no residual block with a timestep projection bias to train")
    return shifts
