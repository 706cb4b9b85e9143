"""The pretrained base a fine-tune starts from, read from a local path: which format a folder is, and the radsynth
pipeline it becomes.

- ``radsynth``: a model folder radsynth saved (its ``model_index.json`` names a radsynth pipeline).
- ``diffusers``: a Stable-Diffusion-family folder (``model_index.json`` with a ``UNet2DConditionModel``, an
  ``AutoencoderKL``, a Hugging Face text encoder, its tokenizer and a scheduler; Stable Diffusion 1.x / 2.x and
  RoentGen's layout). Its components are wrapped as radsynth parts (``generators.stable_diffusion``, the text
  encoder as ``PretrainedTextEncoder``), its noise schedule and prediction type are kept, and the image space is
  the local data's: the fine-tune learns the local images under the base's prompts encoder.

Weights are read from safetensors only and nothing is downloaded. What cannot work is refused before any
training, in one line naming the setting to change (``check_compatible``): a radsynth base of another modality,
grid, field of view, CT window or class vocabulary than the local data (fine-tuning MAISI-style models off their
training field of view is what makes them collapse to noise); 3D data on a 2D base, an image grid the base's
autoencoder and UNet cannot halve down to, a prediction type radsynth does not train.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.generators.objectives import NOISE_SCHEDULE_KEYS, build_inference_scheduler
from radsynth.generators.stable_diffusion import StableDiffusionAutoencoder, StableDiffusionUNet
from radsynth.generators.text_encoder import PretrainedTextEncoder

from .data.manifest import CaseRecord
from .sampling.generate import load_pipeline, sampling_device
from .sampling.pipeline import RadsynthPipeline
from .sampling.text_to_image import RadsynthTextToImagePipeline
from .training import image_space

BASE_FORMATS = ("radsynth", "diffusers")
# What a Stable-Diffusion-family folder holds (model_index.json component names).
STABLE_DIFFUSION_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": None,
                               "tokenizer": None, "scheduler": None}
TRAINABLE_PREDICTIONS = ("epsilon", "v_prediction")
# How far the local field of view (grid x spacing, per axis) may differ from the base's before it is refused.
FOV_TOLERANCE = 0.25


def base_format(folder: str | Path) -> str:
    """``radsynth`` or ``diffusers``, read off the folder's ``model_index.json``; anything else is a user error."""
    folder = Path(folder)
    allowed = "a radsynth model folder, or a diffusers Stable-Diffusion-family folder (model_index.json)"
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        what = ("a MONAI bundle (MAISI / NV-Generate), which radsynth cannot start from yet"
                if (folder / "configs").is_dir() and (folder / "models").is_dir() else "no model_index.json here")
        raise UserInputError(folder, what, allowed)
    index = json.loads(index_path.read_text())
    name = index.get("_class_name")
    name = name[1] if isinstance(name, list) else name
    if str(name).startswith("Radsynth"):
        return "radsynth"
    missing = [key for key, kind in STABLE_DIFFUSION_COMPONENTS.items()
               if not (isinstance(index.get(key), list) and index[key][0]
                       and (kind is None or index[key][1] == kind))]
    if missing:
        raise UserInputError(folder, f"a {name} folder without the Stable-Diffusion-family components "
                             f"{', '.join(missing)}", allowed)
    return "diffusers"


def load_base(config: RadsynthConfig, summary: dict, cases: list[CaseRecord], spacings: torch.Tensor,
              progress: bool = True) -> RadsynthPipeline:
    """The base named by ``finetune.from`` as a radsynth pipeline on the configured device.

    summary, cases, spacings: the ingested data's summary, the fine-tune cases and their spacings: the image space
    a Stable-Diffusion-family base is given and a radsynth base is checked against (``check_compatible``).
    """
    folder = Path(config.finetune.from_)
    found = base_format(folder)
    wanted = config.finetune.base_format
    if wanted != "auto" and wanted != found:
        raise UserInputError("finetune.base_format", f"{wanted!r}, but {folder} is a {found} folder",
                             f"auto, or {found}")
    if found == "radsynth":
        base = load_pipeline(folder, config, progress, pairs=False)
        attribute = base.config.class_attribute
        values = {str(case.attributes[attribute]) for case in cases if case.attributes.get(attribute) not in (None, "")}
        check_compatible(base.config, image_space(config, summary, spacings), values)
        return base
    return _stable_diffusion(folder, config, summary, spacings)


def check_compatible(base: dict, local: dict, class_values: set[str]) -> None:
    """Refuse a fine-tune whose data the base cannot take, with the setting that would fix it.

    base: the base pipeline's config; local: the data's ``training.image_space``; class_values: the cases'
    values of the base's class attribute. The base samples on its own grid, so the data must be on it; its field
    of view must match within ``FOV_TOLERANCE``; a CT window must be the base's (the same numbers must mean the
    same Hounsfield units); every class must be one the base knows (an unknown one would train as "no class").
    Percentile-normalised modalities are not compared: their ranges are per scanner by design.
    """
    if base["modality"] != local["modality"]:
        raise UserInputError("finetune.from", f"the base generates {base['modality']} and the data is "
                             f"{local['modality']}", f"a {local['modality']} base, or train one")
    if tuple(base["image_shape"]) != tuple(local["image_shape"]):
        raise UserInputError("data.preprocess.target_shape", f"{list(local['image_shape'])}, but the base samples "
                             f"{list(base['image_shape'])}", f"the base's grid: {list(base['image_shape'])}")
    for axis, (size, base_mm, local_mm) in enumerate(zip(base["image_shape"], base["spacing"], local["spacing"])):
        base_fov, local_fov = size * base_mm, size * local_mm
        if abs(local_fov / base_fov - 1) > FOV_TOLERANCE:
            raise UserInputError("data.preprocess.target_spacing", f"a field of view of {local_fov:.4g} mm on axis "
                                 f"{axis}, the base was trained on {base_fov:.4g} mm (outside it, fine-tuned models "
                                 "collapse to noise)", f"resample to the base's spacing {list(base['spacing'])}")
    window = [local["intensity_low"], local["intensity_high"]]
    if base["modality"] == "ct" and not np.allclose(window, [base["intensity_low"], base["intensity_high"]]):
        raise UserInputError("data.preprocess.intensity.ct_window", f"{window} HU, but the base was trained on "
                             f"[{base['intensity_low']:g}, {base['intensity_high']:g}]", "the base's window")
    unknown = sorted(class_values - set(base["class_names"]))
    if base["class_attribute"] and unknown:
        raise UserInputError("finetune.filter", f"{base['class_attribute']} values {unknown} are not among the "
                             f"base's classes {list(base['class_names'])}", "cases of the base's classes, or a "
                             "base trained with them")


def _stable_diffusion(folder: Path, config: RadsynthConfig, summary: dict, spacings: torch.Tensor
                      ) -> RadsynthTextToImagePipeline:
    if config.data.spatial_dims != 2:
        raise UserInputError("finetune.from", f"{folder} is a 2D Stable-Diffusion-family base and the data is 3D",
                             "2D data (data.spatial_dims: 2), or a radsynth 3D base")
    schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    objective = schedule.get("prediction_type", "epsilon")
    if objective not in TRAINABLE_PREDICTIONS:
        raise UserInputError(folder / "scheduler" / "scheduler_config.json",
                             f"prediction_type {objective!r}, which radsynth does not fine-tune",
                             f"a base trained with {' or '.join(TRAINABLE_PREDICTIONS)}")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, low_cpu_mem_usage=False)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as error:
        raise UserInputError(folder, f"cannot read its UNet and autoencoder ({error})",
                             "unet/ and vae/ with config.json and diffusion_pytorch_model.safetensors") from error
    tokenizer_config = folder / "tokenizer" / "tokenizer_config.json"
    # The prompt length the base was trained with (CLIP: 77), unless its tokenizer does not say.
    max_length = json.loads(tokenizer_config.read_text()).get("model_max_length") if tokenizer_config.is_file() else None
    text_encoder = PretrainedTextEncoder(
        pretrained_path=str(folder / "text_encoder"), tokenizer_path=str(folder / "tokenizer"),
        max_length=max_length if isinstance(max_length, int) and max_length <= 1024 else config.conditioning.max_tokens)
    if text_encoder.embed_dim != unet.config.cross_attention_dim:
        raise UserInputError(folder, f"its text encoder gives {text_encoder.embed_dim}-wide states and its UNet "
                             f"attends to {unet.config.cross_attention_dim}", "a base whose parts belong together")
    wrapped_vae = StableDiffusionAutoencoder.from_diffusers(vae)
    space = image_space(config, summary, spacings)
    grid = wrapped_vae.downsample_factor * 2 ** (len(unet.config.block_out_channels) - 1)
    if any(size % grid for size in space["image_shape"]):
        fitted = [max(grid, round(size / grid) * grid) for size in space["image_shape"]]
        raise UserInputError("data.preprocess.target_shape", f"{list(space['image_shape'])} cannot be halved down "
                             f"by this base (its autoencoder and UNet need multiples of {grid})",
                             f"resample to a multiple of {grid}, e.g. {fitted}")
    # The base's betas, diffusers' defaults where its scheduler config leaves one out (as diffusers reads it).
    defaults = DDPMScheduler.from_config(schedule).config
    noise_schedule = {key: defaults[key] for key in NOISE_SCHEDULE_KEYS}
    timesteps = int(defaults["num_train_timesteps"])
    pipeline = RadsynthTextToImagePipeline(
        unet=StableDiffusionUNet.from_diffusers(unet), vae=wrapped_vae, text_encoder=text_encoder,
        scheduler=build_inference_scheduler(objective, config.sampling.scheduler, timesteps, noise_schedule),
        **space, latent_clip=None, objective=objective, num_train_timesteps=timesteps,
        noise_schedule=noise_schedule)
    return pipeline.to(sampling_device(config))
