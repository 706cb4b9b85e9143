"""The pretrained base a fine-tune starts from, read from a local path: which format a folder is, and the radsynth
pipeline it becomes.

- ``radsynth``: a model folder radsynth saved (its ``model_index.json`` names a radsynth pipeline).
- ``maisi``: a MONAI MAISI bundle (MAISI v1 / v2, NV-Generate: ``configs/`` with the network definitions in
  JSON, ``models/`` with the autoencoder and diffusion UNet weights), built with MONAI's own MAISI classes
  (``generators.maisi``). Its JSON is read, never executed: ``@`` references are followed, ``$`` expressions
  and any class but MONAI's MAISI networks are refused. DDPM (v1) and rectified-flow (v2) UNets; spacing, body
  region and modality class are its conditioning inputs (``finetune.maisi``). CT must use MAISI's window. With
  ``conditioning.use_masks`` its ControlNet (``controlnet_def`` and its weights) is fine-tuned on the local label
  maps, each local label drawn as a MAISI label index (``maisi_label_indices``).
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

import inspect
import json
import pickle
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from safetensors.torch import load_file

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.configs.schema import MaisiBaseConfig, modality_parts
from radsynth.generators.controlnet import RadsynthControlNet
from radsynth.generators.data import ConditioningSpec
from radsynth.generators.maisi import LABEL_BITS, MaisiAutoencoder, MaisiControlNet, MaisiUNet
from radsynth.generators.objectives import NOISE_SCHEDULE_KEYS, build_inference_scheduler
from radsynth.generators.stable_diffusion import StableDiffusionAutoencoder, StableDiffusionUNet
from radsynth.generators.text_encoder import PretrainedTextEncoder, load_text_encoder
from radsynth.generators.unet import RadsynthUNet

from .data.manifest import CaseRecord
from .sampling.generate import load_pipeline, sampling_device
from .sampling.pipeline import RadsynthPipeline
from .sampling.text_to_image import RadsynthTextToImagePipeline
from .training import image_space

BASE_FORMATS = ("radsynth", "diffusers", "maisi")
MAISI_CT_WINDOW = (-1000.0, 1000.0)  # MAISI CT: this HU window onto [0, 1]
# What a Stable-Diffusion-family folder holds (model_index.json component names).
STABLE_DIFFUSION_COMPONENTS = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": None,
                               "tokenizer": None, "scheduler": None}
TRAINABLE_PREDICTIONS = ("epsilon", "v_prediction")
# How far the local field of view (grid x spacing, per axis) may differ from the base's before it is refused.
FOV_TOLERANCE = 0.25


def base_format(folder: str | Path) -> str:
    """``radsynth`` or ``diffusers``, read off the folder's ``model_index.json``; anything else is a user error."""
    folder = Path(folder)
    allowed = "a radsynth model folder, a diffusers Stable-Diffusion-family folder (model_index.json) or a MAISI bundle"
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        if (folder / "configs").is_dir() and (folder / "models").is_dir():
            _maisi_network_config(folder)  # a bundle without MAISI's networks is refused here
            return "maisi"
        raise UserInputError(folder, "no model_index.json here, nor a bundle's configs/ and models/", allowed)
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
    if found == "maisi":
        return _maisi(folder, config, summary, cases, spacings)
    if found == "radsynth":
        base = load_pipeline(folder, config, progress, pairs=False)
        attribute = base.config.class_attribute
        values = {str(case.attributes[attribute]) for case in cases if case.attributes.get(attribute) not in (None, "")}
        local = image_space(config, summary, spacings)
        check_compatible(base.config, local, values)
        # The fine-tune generates the local data: its modality, spacing and physical intensity range, not the
        # base's (another dataset's, or a pool's: "ct+mri+xray", 8-bit MedNIST's 1..255), which would map its
        # samples back to the wrong units. check_compatible made sure the two are close enough to learn.
        base.register_to_config(**{key: local[key] for key in ("modality", "spacing", "intensity_low",
                                                                "intensity_high")})
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
    if not set(modality_parts(local["modality"])) <= set(modality_parts(base["modality"])):
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
    _check_grid(space["image_shape"], wrapped_vae.downsample_factor * 2 ** (len(unet.config.block_out_channels) - 1))
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


# ------------------------------------------------------------------------------------------------ MAISI bundles

def _maisi_network_config(folder: Path) -> tuple[Path, dict]:
    """The bundle's JSON that defines the autoencoder and the diffusion UNet."""
    for path in sorted((folder / "configs").glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and {"autoencoder_def", "diffusion_unet_def"} <= set(data):
            return path, data
    raise UserInputError(folder / "configs", "no JSON with autoencoder_def and diffusion_unet_def",
                         "a MAISI bundle's network config (e.g. config_network_rflow.json)")


def _resolved(path: Path, data: dict, value, where: str):
    """``value`` with the bundle's ``@name`` (and ``@a::b``) references followed; expressions are refused."""
    if isinstance(value, str) and value.startswith("$"):
        raise UserInputError(path, f"{where} is an expression ({value}), which radsynth never evaluates",
                             "plain values or @references")
    if isinstance(value, str) and value.startswith("@"):
        target = data
        for part in value[1:].split("::"):
            if not isinstance(target, dict) or part not in target:
                raise UserInputError(path, f"{where} refers to {value}, which the file does not define",
                                     "a reference to a key of the same file")
            target = target[part]
        return _resolved(path, data, target, where)
    if isinstance(value, list):
        return [_resolved(path, data, item, where) for item in value]
    if isinstance(value, dict):
        return {key: _resolved(path, data, item, f"{where}.{key}") for key, item in value.items()}
    return value


def _network_arguments(path: Path, data: dict, key: str, kind: type) -> dict:
    """The arguments of MONAI's ``kind`` as the bundle's ``key`` gives them; any other class is refused."""
    definition = dict(data[key])
    target = str(definition.pop("_target_", ""))
    if target.rsplit(".", 1)[-1] != kind.__name__:
        raise UserInputError(path, f"{key}._target_ is {target!r}", f"MONAI's {kind.__name__}")
    arguments = _resolved(path, data, definition, key)
    accepted = set(inspect.signature(kind.__init__).parameters) - {"self"}
    unknown = sorted(set(arguments) - accepted)
    if unknown:
        raise UserInputError(path, f"{key} sets {unknown}, which MONAI's {kind.__name__} does not take",
                             ", ".join(sorted(accepted)))
    return arguments


def _maisi_objective(path: Path, data: dict) -> tuple[str, int, dict | None]:
    """(objective, num_train_timesteps, noise_schedule) of the bundle's ``noise_scheduler``."""
    scheduler = _resolved(path, data, dict(data.get("noise_scheduler") or {}), "noise_scheduler")
    kind = str(scheduler.get("_target_", "")).rsplit(".", 1)[-1]
    timesteps = int(scheduler.get("num_train_timesteps", 1000))
    if kind == "RFlowScheduler":
        return "rectified_flow", timesteps, None
    if kind == "DDPMScheduler":
        schedules = {"linear_beta": "linear", "scaled_linear_beta": "scaled_linear"}
        schedule = scheduler.get("schedule", "linear_beta")
        prediction = scheduler.get("prediction_type", "epsilon")
        if schedule not in schedules or prediction not in TRAINABLE_PREDICTIONS:
            raise UserInputError(path, f"noise_scheduler has schedule {schedule!r} and prediction_type "
                                 f"{prediction!r}", f"schedule {' or '.join(schedules)}, prediction_type "
                                 f"{' or '.join(TRAINABLE_PREDICTIONS)}")
        # MONAI's defaults where the bundle leaves them out.
        return prediction, timesteps, {"beta_schedule": schedules[schedule],
                                       "beta_start": float(scheduler.get("beta_start", 1e-4)),
                                       "beta_end": float(scheduler.get("beta_end", 2e-2))}
    raise UserInputError(path, f"noise_scheduler is {kind or 'missing'}", "MONAI's RFlowScheduler or DDPMScheduler")


def _maisi_weights(folder: Path, name: str | None, part: str, matches, optional: bool = False) -> dict | None:
    """A weights file of the bundle's ``models/``, read without unpickling anything but tensors and numbers.
    optional: None when no file matches (and none is named)."""
    models = folder / "models"
    candidates = sorted(path.name for path in models.iterdir() if path.suffix in (".pt", ".pth", ".safetensors"))
    chosen = [name] if name else [file for file in candidates if matches(file)]
    if optional and not chosen:
        return None
    if len(chosen) != 1 or chosen[0] not in candidates:
        setting = {"diffusion UNet": "finetune.maisi.diffusion_weights",
                   "ControlNet": "finetune.maisi.controlnet_weights"}.get(part, "finetune.from")
        raise UserInputError(setting, f"cannot tell which file of {models} holds the {part} ({chosen or 'none'} "
                             f"of {candidates})", "one of those files")
    path = models / chosen[0]
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserInputError(path, "holds more than tensors and numbers, and radsynth never unpickles objects",
                             "a state dict saved with torch.save, or safetensors") from error


def _state_dict(checkpoint: dict, *keys: str) -> dict:
    for key in keys:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def _maisi(folder: Path, config: RadsynthConfig, summary: dict, cases: list[CaseRecord],
           spacings: torch.Tensor) -> RadsynthTextToImagePipeline:
    path, data = _maisi_network_config(folder)
    space = image_space(config, summary, spacings)
    if config.data.spatial_dims != 3:
        raise UserInputError("finetune.from", f"{folder} is a 3D MAISI base and the data is 2D",
                             "3D data (data.spatial_dims: 3), or a 2D base")
    window = (space["intensity_low"], space["intensity_high"])
    if space["modality"] == "ct" and not np.allclose(window, MAISI_CT_WINDOW):
        raise UserInputError("data.preprocess.intensity.ct_window", f"{list(window)} HU, but MAISI maps "
                             f"{list(MAISI_CT_WINDOW)} onto its [0, 1]", f"{list(MAISI_CT_WINDOW)}")
    unet_arguments = _network_arguments(path, data, "diffusion_unet_def", DiffusionModelUNetMaisi)
    if space["modality"] != "ct" and not unet_arguments.get("num_class_embeds"):
        raise UserInputError("finetune.from", f"{folder}'s UNet has no modality input, so it generates CT (MAISI "
                             f"v1 / v2), and the data is {space['modality']}", "MR weights: an NV-Generate bundle "
                             "whose UNet takes a modality class, with finetune.maisi.modality_class")
    _check_maisi_range(space, config.finetune.maisi)
    if unet_arguments.get("with_conditioning"):
        raise UserInputError(path, "a diffusion UNet with text cross-attention, for which radsynth has no encoder",
                             "a MAISI UNet conditioned on spacing, body region and modality")
    objective, timesteps, noise_schedule = _maisi_objective(path, data)
    settings = config.finetune.maisi
    top, bottom = settings.body_region or (None, None)
    try:
        unet = MaisiUNet(unet_arguments, negate_output=objective == "rectified_flow", top_region=top,
                         bottom_region=bottom, modality_class=settings.modality_class)
    except ValueError as error:
        raise UserInputError("finetune.maisi", str(error), "body_region: [top, bottom], modality_class") from error
    checkpoint = _maisi_weights(folder, settings.diffusion_weights, "diffusion UNet", lambda file: "unet" in file)
    _load_weights(unet.net, _state_dict(checkpoint, "unet_state_dict", "state_dict"), path, "diffusion_unet_def")
    scale = checkpoint.get("scale_factor", data.get("scale_factor"))
    if scale is None:
        raise UserInputError(path, "no scale_factor, in the UNet's checkpoint or the network config",
                             "the latent scale the MAISI UNet was trained with")
    vae = MaisiAutoencoder(_network_arguments(path, data, "autoencoder_def", AutoencoderKlMaisi),
                           scaling_factor=float(torch.as_tensor(scale)))
    autoencoder = _maisi_weights(folder, None, "autoencoder", lambda file: file.startswith("autoencoder"))
    _load_weights(vae.net, _state_dict(autoencoder, "autoencoder_state_dict", "state_dict"), path, "autoencoder_def")
    grid = vae.downsample_factor * 2 ** (len(unet_arguments["num_channels"]) - 1)
    _check_grid(space["image_shape"], grid)
    # MAISI reads no text: the pipeline's prompt interface keeps a small encoder the UNet never attends to.
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    text_encoder = load_text_encoder("trained", captions=[conditioning.prompt(case) for case in cases],
                                     max_length=config.conditioning.max_tokens, embed_dim=8, num_layers=1, num_heads=1)
    pipeline = RadsynthTextToImagePipeline(
        unet=unet, vae=vae, text_encoder=text_encoder,
        scheduler=build_inference_scheduler(objective, "flow_match_euler" if objective == "rectified_flow" else "ddim",
                                            timesteps, noise_schedule),
        **space, latent_clip=None, objective=objective, num_train_timesteps=timesteps, noise_schedule=noise_schedule)
    return pipeline.to(sampling_device(config))


def _check_maisi_range(space: dict, settings: MaisiBaseConfig) -> None:
    """Refuse data off the spacing and field of view a MAISI bundle was trained on (``finetune.maisi``)."""
    spacing, shape = space["spacing"], space["image_shape"]
    for axis, (low, high) in enumerate(settings.trained_spacing_mm or ()):
        if not low <= spacing[axis] <= high:
            raise UserInputError("data.preprocess.target_spacing", f"{spacing[axis]:.4g} mm on axis {axis}, outside "
                                 f"the [{low:g}, {high:g}] mm the MAISI base was trained on "
                                 "(finetune.maisi.trained_spacing_mm)", "resample to a spacing within it")
    for axis, (low, high) in enumerate(settings.trained_fov_mm or ()):
        fov = shape[axis] * spacing[axis]
        if not low <= fov <= high:
            raise UserInputError("data.preprocess.target_shape", f"a field of view of {fov:.4g} mm on axis {axis} "
                                 f"({shape[axis]} x {spacing[axis]:.4g} mm), outside the [{low:g}, {high:g}] mm the "
                                 "MAISI base was trained on (outside it, fine-tuned MAISI models collapse to noise; "
                                 "finetune.maisi.trained_fov_mm)", "a grid and spacing whose product lies within it")


def base_controlnet(config: RadsynthConfig, base: RadsynthPipeline, label_names: dict[int, str]) -> torch.nn.Module:
    """The ControlNet a fine-tune trains beside ``base`` on the local label maps (``conditioning.use_masks``).

    A radsynth base gets a new one, a copy of its UNet's encoder; a MAISI base its bundle's own, reading each local
    label as the MAISI index ``finetune.maisi.label_indices`` gives it. label_names: the local vocabulary.
    """
    num_labels = max(label_names) + 1
    if isinstance(base.unet, RadsynthUNet):
        return RadsynthControlNet.from_unet(base.unet, num_labels, base.vae.downsample_factor)
    if not isinstance(base.unet, MaisiUNet):
        raise UserInputError("conditioning.use_masks", "a Stable-Diffusion-family base has no label-map ControlNet "
                             "in radsynth", "false, or a radsynth or MAISI base")
    folder = Path(config.finetune.from_)
    path, data = _maisi_network_config(folder)
    if "controlnet_def" not in data:
        raise UserInputError(path, "no controlnet_def: this bundle has no ControlNet to draw label maps with",
                             "a bundle with MAISI's ControlNet (controlnet_def), or conditioning.use_masks: false")
    settings = config.finetune.maisi
    indices = maisi_label_indices(folder, settings.label_indices, label_names)
    try:
        controlnet = MaisiControlNet(_network_arguments(path, data, "controlnet_def", ControlNetMaisi), indices,
                                     settings.modality_class)
    except ValueError as error:
        raise UserInputError(path, f"controlnet_def: {error}", "MAISI's ControlNet definition") from error
    if controlnet.downsample_factor != base.vae.downsample_factor:
        raise UserInputError(path, f"controlnet_def brings label maps down {controlnet.downsample_factor}x, the "
                             f"autoencoder {base.vae.downsample_factor}x", "a ControlNet made for this autoencoder")
    checkpoint = _maisi_weights(folder, settings.controlnet_weights, "ControlNet",
                                lambda file: "controlnet" in file.lower(), optional=True)
    if checkpoint is not None:
        _load_weights(controlnet.net, _state_dict(checkpoint, "controlnet_state_dict", "state_dict"), path,
                      "controlnet_def")
    else:  # as MAISI's own training starts one (copy_model_state): the UNet's encoder where shapes agree (the
        # UNet's time embedding is wider by its spacing and region inputs), the zero convolutions as they are
        own = controlnet.net.state_dict()
        shared = {name: value for name, value in base.unet.net.state_dict().items()
                  if name in own and own[name].shape == value.shape}
        controlnet.net.load_state_dict(shared, strict=False)
        if not any(name.startswith("down_blocks.") for name in shared):
            raise UserInputError(path, "controlnet_def is not shaped like diffusion_unet_def's encoder, and the "
                                 "bundle has no ControlNet weights", "a ControlNet made for this UNet")
    return controlnet.to(base.device)


def maisi_label_indices(folder: Path, explicit: dict[str, int], label_names: dict[int, str]) -> list[int]:
    """The MAISI index of each local label value (position = value): ``explicit`` first, then the bundle's
    ``configs/label_dict.json`` entry of the same name (case, spaces and underscores aside). The background is 0;
    a label with neither, or two labels on one index, is refused with the indices still free."""
    bundle = _bundle_labels(folder)
    unknown = sorted(set(explicit) - set(label_names.values()))
    if unknown:
        raise UserInputError("finetune.maisi.label_indices", f"names {unknown}, which are not labels of the data",
                             ", ".join(name for _, name in sorted(label_names.items())))
    by_name = {_label_key(name): index for name, index in bundle.items()}
    indices, unmapped = [0] * (max(label_names) + 1), []
    for value, name in sorted(label_names.items()):
        index = 0 if value == 0 else explicit.get(name, by_name.get(_label_key(name)))
        if index is None:
            unmapped.append(name)
        else:
            indices[value] = index
    # Free: neither a structure of the bundle nor taken here. MAISI names its unused indices "dummyN".
    named = {index for name, index in bundle.items() if not name.lower().startswith("dummy")}
    free = [index for index in range(1, 2**LABEL_BITS) if index not in named and index not in indices]
    if unmapped:
        raise UserInputError("finetune.maisi.label_indices", f"no MAISI index for the labels {unmapped} (the "
                             "bundle's label_dict.json has no such names)", "the bundle's index of the same "
                             f"structure, or a free one: {', '.join(map(str, free[:12]))}, ...")
    shared = next((index for index in indices if index and indices.count(index) > 1), None)
    if shared is not None:
        names = [label_names[value] for value, index in enumerate(indices) if index == shared]
        raise UserInputError("finetune.maisi.label_indices", f"the labels {names} share the index {shared}",
                             "one index per label (0 merges into the background); free: "
                             f"{', '.join(map(str, free[:12]))}, ...")
    return indices


def _bundle_labels(folder: Path) -> dict[str, int]:
    """The bundle's label vocabulary ({name: index}, ``configs/label_dict.json``), or {} when it ships none."""
    path = folder / "configs" / "label_dict.json"
    if not path.is_file():
        return {}
    labels = json.loads(path.read_text())
    if not isinstance(labels, dict) or not all(isinstance(index, int) for index in labels.values()):
        raise UserInputError(path, "is not a {name: index} mapping", "MAISI's label_dict.json")
    return labels


def _label_key(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def _load_weights(network: torch.nn.Module, weights: dict, path: Path, key: str) -> None:
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        raise UserInputError(path, f"the weights do not fit the network {key} defines ({first})",
                             "the network config the weights were trained with") from error


def _check_grid(shape: tuple[int, ...], grid: int) -> None:
    if any(size % grid for size in shape):
        fitted = [max(grid, round(size / grid) * grid) for size in shape]
        raise UserInputError("data.preprocess.target_shape", f"{list(shape)} cannot be halved down by this base "
                             f"(its autoencoder and UNet need multiples of {grid})",
                             f"resample to a multiple of {grid}, e.g. {fitted}")
