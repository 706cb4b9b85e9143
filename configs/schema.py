"""The pydantic v2 schema of a radsynth config: one root with a section per stage.

Every model forbids unknown keys, so a typo in a YAML preset or a ``key=value`` override is an error that
names the key, never a silently ignored setting. Paths stay as given (relative to the working directory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import UserInputError

Modality = Literal["ct", "mri", "xray"]
MODALITIES: tuple[Modality, ...] = get_args(Modality)


def pooled_modality(modalities) -> str:
    """What a model trained on these modalities generates: ``"mri+xray"`` for a multi-modality base, else the one."""
    return "+".join(sorted(set(modalities)))


def modality_parts(modality: str) -> list[str]:
    """The modalities in a (pooled) modality name: ``["mri", "xray"]`` for ``"mri+xray"``."""
    return modality.split("+")


SplitName = Literal["train", "holdout", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "holdout", "test")


PositiveMillimetres = Annotated[float, Field(gt=0)]  # a voxel or pixel size


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------- data


class ImageFolderSource(Section):
    """2D images (PNG 8/16-bit, JPEG) listed in a CSV, with an optional folder of masks of the same stem."""

    csv: str = "manifest.csv"
    images_dir: str = "images"
    masks_dir: str | None = "masks"
    id_column: str = "id"
    patient_column: str = "patient_id"
    text_column: str | None = None
    attribute_columns: list[str] = Field(default_factory=list)
    split_column: str | None = Field(None, description="use the CSV's own split instead of computing one")
    pixel_spacing_mm: tuple[PositiveMillimetres, PositiveMillimetres] = (1.0, 1.0)
    mask_threshold: int | None = Field(
        128, description="binarise 8-bit masks (0/255) at this value; null keeps integer label values as stored"
    )
    modality_column: str | None = Field(None, description="a column giving each row's modality (ct, mri, xray), "
                                        "for folders of several modalities; else data.modality")
    body_region_column: str | None = Field(None, description="a column giving each row's body region")


class MsdSource(Section):
    """MSD or nnU-Net v2 raw folder: ``dataset.json`` (optional here) with ``imagesTr``/``labelsTr``."""

    images_dir: str = "imagesTr"
    labels_dir: str = "labelsTr"


class DicomSource(Section):
    """DICOM series anywhere under the root; labels from NIfTI files or DICOM-SEG objects."""

    labels_dir: str | None = Field(None, description="NIfTI labels named <SeriesInstanceUID>.nii.gz")
    use_seg: bool = Field(True, description="match DICOM-SEG objects found under the root to their series")


Voxels = Annotated[int, Field(ge=24)]
PhantomKind = Literal["chest_xray", "ct_torso", "mri_torso", "brain_mri"]


class PhantomSource(Section):
    """The built-in procedural phantoms: synthetic anatomy, not patient data."""

    kind: PhantomKind = "chest_xray"
    n_cases: int = Field(200, ge=3)
    size: int = Field(128, ge=32, description="2D image side in pixels (chest_xray)")
    # Below ~24 voxels per axis small structures (the spine at 22 mm voxels) drop out of the phantoms.
    shape: tuple[Voxels, Voxels, Voxels] = Field((64, 64, 64), description="3D shape in voxels (ct_torso, mri_torso, brain_mri)")
    seed: int = 0


class IntensityConfig(Section):
    """Modality-aware normalisation to [-1, 1]; ``auto`` picks the CT window for CT, percentiles otherwise."""

    mode: Literal["auto", "ct_window", "percentile", "none"] = "auto"
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    percentiles: tuple[float, float] = (0.5, 99.5)

    @field_validator("ct_window", "percentiles")
    @classmethod
    def _increasing(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"must be increasing (low < high), got {list(value)}")
        return value


class PreprocessConfig(Section):
    target_shape: list[int] = Field(description="output grid in voxels, one entry per spatial axis")
    target_spacing: list[PositiveMillimetres] | None = Field(
        None, description="resample to this spacing (mm) then crop/pad; null resizes straight to target_shape"
    )
    orientation: Literal["RAS"] = "RAS"
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)

    @model_validator(mode="after")
    def _same_rank(self) -> PreprocessConfig:
        if len(self.target_shape) not in (2, 3):
            raise ValueError(f"target_shape must have 2 or 3 entries, got {self.target_shape}")
        if any(n < 1 for n in self.target_shape):
            raise ValueError(f"target_shape entries must be positive, got {self.target_shape}")
        if self.target_spacing is not None and len(self.target_spacing) != len(self.target_shape):
            raise ValueError("target_spacing must have as many entries as target_shape")
        return self


class SplitConfig(Section):
    """Patient-level split fractions; a patient's cases always land in one split."""

    train: float = Field(0.7, ge=0, le=1)
    holdout: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)
    seed: int = 0
    stratify_by: str | None = Field(None, description="attribute to balance across splits, e.g. finding")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.holdout + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + holdout + test must sum to 1, got {total:g}")
        return self

    def fractions(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in SPLIT_NAMES}


SourceFormat = Literal["phantom", "msd", "image_folder", "dicom"]
CaseFilter = dict[str, str | int | float | bool]  # modality, body_region or attribute -> value (manifest.matches)


class DataSource(Section):
    """Where cases come from: one folder in one format (or the phantoms), and what it says about itself."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    format: SourceFormat
    root: str | None = Field(None, description="input folder (not used by phantom)")
    modality: Modality | None = Field(
        None, description="required for image folders without a modality column; MSD, DICOM and phantoms can say it "
        "themselves")
    body_region: str | None = None
    license: str = "unknown"
    label_names: dict[int, str] | None = Field(
        None, description="label value -> name, 0 is background; overrides the source's own"
    )
    image_folder: ImageFolderSource = Field(default_factory=ImageFolderSource)
    msd: MsdSource = Field(default_factory=MsdSource)
    dicom: DicomSource = Field(default_factory=DicomSource)
    phantom: PhantomSource = Field(default_factory=PhantomSource)

    @model_validator(mode="after")
    def _source_needs(self) -> DataSource:
        if self.format not in ("phantom", "sources") and self.root is None:
            raise ValueError(f"data.root is required for format '{self.format}'")
        if self.format == "image_folder" and self.modality is None and self.image_folder.modality_column is None:
            raise ValueError("data.modality (one of ct, mri, xray) or data.image_folder.modality_column is required "
                             "for format 'image_folder'")
        if self.label_names is not None and self.label_names.get(0, "background") != "background":
            raise ValueError("label_names[0] must be 'background'")
        return self

    @property
    def mask_threshold(self) -> int | None:
        """What this source's masks are binarised at when read (image folders' 0/255 masks), else None."""
        return self.image_folder.mask_threshold if self.format == "image_folder" else None


class PooledSource(DataSource):
    """One of several datasets pooled into one manifest (``data.sources``): a multi-dataset, multi-modality base."""

    max_cases: int | None = Field(None, ge=1, description="use this many of its cases (a seeded draw of patients)")
    filter: CaseFilter = Field(
        default_factory=dict, description="keep only the cases with these values of modality, body_region or an "
        "attribute (compared as text), before max_cases, e.g. {modality: xray, body_region: chest}")
    train_only: bool = Field(
        False, description="every case goes to the train split: pretraining data without patient ids (MedNIST), "
        "never a holdout, test or privacy reference")
    with_labels: bool = Field(True, description="false: images only (label maps in another vocabulary are dropped)")
    skip_constant: bool = Field(False, description="drop images of a single value (a corpus' blank slices), counted "
                                "in the ingest summary, instead of refusing the ingest")


POOLED_FORMAT = "data.sources (a list of datasets) goes with format 'sources', and only with it"


class DataConfig(DataSource):
    format: Literal["phantom", "msd", "image_folder", "dicom", "sources"]
    sources: list[PooledSource] | None = Field(
        None, description="several datasets in one manifest (format: sources); each is split by its own patients, "
        "case and patient ids are prefixed with its name")
    preprocess: PreprocessConfig
    split: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="before")
    @classmethod
    def _sources_format(cls, values):
        if isinstance(values, dict) and values.get("sources"):
            if values.get("format", "sources") != "sources":
                raise ValueError(POOLED_FORMAT)
            values = {**values, "format": "sources"}
        return values

    @model_validator(mode="after")
    def _pooled(self) -> DataConfig:
        if (self.format == "sources") != bool(self.sources):
            raise ValueError(POOLED_FORMAT)
        if self.sources:
            if self.root is not None:
                raise ValueError("data.root is not used with data.sources: give each source its own root")
            names = [source.name for source in self.sources]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"data.sources names must be unique; repeated: {repeated}")
        return self

    @property
    def spatial_dims(self) -> int:
        return len(self.preprocess.target_shape)

    def source_of(self, source_name: str) -> DataSource:
        """The settings a record's source was read with: its entry in ``sources``, or this config itself."""
        if self.sources:
            return next(source for source in self.sources if source.name == source_name)
        return self


# --------------------------------------------------------------------------------- generator stages
# These sections are declared now so presets are complete and validated; the training and sampling
# stages (later issues) read them.


def check_network(section: str, channels: list[int], attention_levels: list[bool], norm_num_groups: int) -> None:
    """A MONAI network of these sizes can be built: one attention flag per level, channels that group norms split."""
    if len(attention_levels) != len(channels):
        raise ValueError("attention_levels must have one entry per channels entry")
    uneven = [c for c in channels if c % norm_num_groups]
    if uneven:
        raise ValueError(f"channels {channels} must all be divisible by norm_num_groups ({norm_num_groups}); "
                         f"{uneven} are not (set {section}.norm_num_groups to a common divisor)")


class AutoencoderConfig(Section):
    channels: list[int] = Field(default_factory=lambda: [32, 64, 64], description="len 3: 4x downsampling per axis")
    latent_channels: int = Field(4, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, False])
    norm_num_groups: int = Field(32, ge=1)
    kl_weight: float = Field(1e-6, ge=0)
    adversarial_weight: float = Field(0.0, ge=0)
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="also stop after this much training time (this part's, resumed runs included); the "
        "step reached depends on the machine; null: max_steps alone")
    checkpoint_every: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _buildable(self) -> AutoencoderConfig:
        check_network("autoencoder", self.channels, self.attention_levels, self.norm_num_groups)
        return self


class AugmentConfig(Section):
    """Non-leaking augmentation of the diffusion model's training latents (EDM's; ``generators.augmentation``):
    each transform is drawn with ``probability`` and the model is told which (zero at sampling)."""

    probability: float = Field(0.0, ge=0, le=1, description="chance of each transform (a flip per axis, a quarter "
                               "turn, a shift) per training case; 0: off")
    flip: bool = True
    rotate: bool = Field(True, description="quarter turns in the plane of the last two axes, when they are square")
    max_shift: float = Field(0.125, ge=0, lt=0.5, description="largest shift, a fraction of each axis")


class DiffusionConfig(Section):
    channels: list[int] = Field(default_factory=lambda: [64, 128, 128])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, True, True])
    num_head_channels: int = Field(32, ge=1)
    num_res_blocks: int = Field(1, ge=1)
    norm_num_groups: int = Field(32, ge=1)
    objective: Literal["epsilon", "v_prediction", "rectified_flow"] = "v_prediction"
    num_train_timesteps: int = Field(1000, ge=1)
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023, "
                                        "5 in the paper): the nearly clean steps stop dominating training; null: "
                                        "unweighted")
    balance_by: str | None = Field(None, description="draw training cases so that every value of this attribute "
                                   "fills the same share of the batches (rare findings as often as 'none'); "
                                   "the ControlNet and mask generator train on the same draws; null: every case equally often")
    rare_label_weight: float = Field(0.0, ge=0, description="with conditioning.mask_input: concat, extra loss weight "
                                     "on the latents under rare labels of each case's map (controlnet.rare_label_weight"
                                     "'s rule; on the demo's 2x model 5 moved the findings from 0.77 / 0.68 / 0.48 of "
                                     "the judge to 0.68 / 0.82 / 0.71); 0: off")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="non-leaking augmentation of the "
                                   "training latents, for small datasets; the ControlNet, the mask generator and a "
                                   "fine-tune (finetune.from) train without it")
    learning_rate: float = Field(1e-4, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_steps: int = Field(5000, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="also stop after this much training time (this part's, resumed runs included); the "
        "step reached depends on the machine; null: max_steps alone")
    ema_decay: float | None = Field(0.999, gt=0, lt=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    validate_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1)
    frontier_every: int | None = Field(
        None, ge=1, description="every this many steps (and at the last) score frontier_samples fresh samples for "
        "realism and memorisation (train/diffusion/frontier.csv, .png) and keep the most realistic checkpoint that "
        "passes the gate's DCR-share and copy-rate limits; null: keep the last")
    frontier_samples: int = Field(32, ge=8, description="samples drawn at each frontier point")

    @model_validator(mode="after")
    def _buildable(self) -> DiffusionConfig:
        check_network("diffusion", self.channels, self.attention_levels, self.norm_num_groups)
        return self


class ControlNetConfig(Section):
    """The ControlNet trained on one-hot label maps when ``conditioning.use_masks`` is on.

    It trains after the diffusion model, beside it frozen; loop bookkeeping (log_every, keep_checkpoints,
    gradient accumulation) follows the diffusion section.
    """

    conditioning_scale: float = Field(1.0, ge=0, description="how strongly the label map steers the UNet")
    rare_label_weight: float = Field(0.0, ge=0, description="extra loss weight on the latents under rare labels "
                                     "(under 1% of the maps: findings, lesions); it reads the map, so it does not "
                                     "bias what is learnt, only where training attends; 0: off")
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="also stop after this much training time (this part's, resumed runs included); the "
        "step reached depends on the machine; null: max_steps alone")
    checkpoint_every: int = Field(500, ge=1)
    validate_every: int | None = Field(
        500, ge=1, description="log per-label Dice of generated images (a segmenter trained on real train images "
        "segments them) against their maps, every N steps and at the end; null: off")
    validation_cases: int = Field(8, ge=1, description="held-out (test split) maps generated at each validation")
    segmenter_steps: int = Field(300, ge=1, description="training steps of the validation segmenter")


class MaskGeneratorConfig(Section):
    """A diffusion model over label maps (``generators.mask_generator``), trained after the ControlNet when
    ``enabled``; ``sampling.mask_source: generated`` then draws each pair's label map from it."""

    enabled: bool = Field(False, description="train the mask generator (needs conditioning.use_masks)")
    downsample: int = Field(2, ge=1, description="label maps are generated this many times coarser per axis")
    smoothing_sigma: float = Field(0.0, ge=0, description="Gaussian (image voxels) on the upsampled label shares; "
                                   "rounds boundaries, but erodes structures a few voxels thick")
    label_balance: float = Field(0.5, ge=0, le=1, description="weight each label's loss by (commonest label's "
                                 "share / its own) to this power (at most 20): rare findings get learnt; 0: off")
    rare_label_weight: float = Field(2.0, ge=0, description="extra loss weight where rare labels (under 1% of the "
                                     "maps) lie: without it the demo's generator drew no findings; higher draws "
                                     "them larger (at 2, 1.4-2x their real area; at 30, 6-7x); 0: off")
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128])
    attention_levels: list[bool] = Field(default_factory=lambda: [False, False, True])
    norm_num_groups: int = Field(16, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="also stop after this much training time (this part's, resumed runs included); the "
        "step reached depends on the machine; null: max_steps alone")
    checkpoint_every: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _buildable(self) -> MaskGeneratorConfig:
        check_network("mask_generator", self.channels, self.attention_levels, self.norm_num_groups)
        return self


class ConditioningConfig(Section):
    text_encoder: Literal["trained", "pretrained"] = "trained"
    pretrained_path: str | None = Field(None, description="local Hugging Face folder; never downloaded")
    attributes: list[str] = Field(default_factory=list, description="attributes rendered into the prompt")
    max_tokens: int = Field(64, ge=4)
    embed_dim: int = Field(256, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    include_text: bool = Field(True, description="append the case's report/caption after the attributes")
    text_dropout: float = Field(0.5, ge=0, le=1, description="with include_text and attributes: the share of "
                                "training prompts that show the attributes alone, as sampling prompts do (a real "
                                "report is never one); 0 trains on whole prompts only")
    min_word_cases: int = Field(5, ge=1, description="the trained text encoder's vocabulary keeps only words found "
                                "in at least this many training cases: one patient's name or record number never "
                                "gets into the saved model")
    class_attribute: str | None = Field(None, description="also feed this attribute as a learned class embedding")
    condition_dropout: float = Field(0.1, ge=0, lt=1)
    use_masks: bool = Field(False, description="label maps steer the image model (how: mask_input); pairs need it")
    mask_input: Literal["controlnet", "concat"] = Field(
        "controlnet", description="with use_masks: a ControlNet trained after the frozen base (any base, pretrained "
        "ones too), or 'concat': the UNet reads the map itself, its one-hot label shares concatenated to the "
        "latents, and learns it with everything else (no ControlNet; on the demo's 2x autoencoder 3,000 steps with "
        "diffusion.rare_label_weight 5 drew the findings at 0.91 / 0.82 / 0.89 of the judge's Dice, a ControlNet "
        "trained 2,000 steps after a 1,500-step UNet at 0.70 / 0.47 / 0.36)")
    mask_dropout: float = Field(0.15, ge=0, lt=1, description="with mask_input: concat, the share of training cases "
                                "shown without their map, so the model draws from text alone too")

    @model_validator(mode="after")
    def _consistent(self) -> ConditioningConfig:
        if self.text_encoder == "pretrained" and not self.pretrained_path:
            raise ValueError("conditioning.pretrained_path is required when text_encoder is 'pretrained'")
        if self.embed_dim % self.text_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by text_heads ({self.text_heads})")
        return self


BodyRegion = Literal["head_neck", "chest", "abdomen", "lower_body"]


class MaisiBaseConfig(Section):
    """What a MONAI MAISI bundle base needs beyond its own files."""

    diffusion_weights: str | None = Field(
        None, description="the diffusion UNet's file in the bundle's models/ (default: the one with 'unet' in its name)")
    body_region: tuple[BodyRegion, BodyRegion] | None = Field(
        None, description="[top, bottom]: the body regions the volumes start and end in, for a UNet with region inputs")
    modality_class: int | None = Field(
        None, ge=0, description="the class index of the data's modality, for a UNet with class embeddings (NV-Generate)")
    trained_spacing_mm: list[tuple[PositiveMillimetres, PositiveMillimetres]] | None = Field(
        default_factory=lambda: [(0.5, 3.0), (0.5, 3.0), (0.5, 5.0)],
        description="[low, high] voxel spacing per axis the bundle was trained on; data outside it is refused. "
        "A bundle does not state it: the default is MAISI's published range (its inference scripts refuse "
        "anything else); null: unknown, not checked")
    trained_fov_mm: list[tuple[PositiveMillimetres, PositiveMillimetres]] | None = Field(
        default_factory=lambda: [(128.0, 1536.0), (128.0, 1536.0), (64.0, 3840.0)],
        description="[low, high] field of view (grid x spacing) per axis the bundle was trained on; outside it "
        "fine-tuned MAISI models collapse to noise, so data outside it is refused. Default: MAISI's published "
        "grids (256-512 x 256-512 x 128-768) at its spacings; null: unknown, not checked")
    controlnet_weights: str | None = Field(
        None, description="the ControlNet's file in the bundle's models/ (default: the one with 'controlnet' in its "
        "name; none: the ControlNet starts as a copy of the UNet's encoder, as MAISI's own training does)")
    label_indices: dict[str, Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=dict, description="with conditioning.use_masks: the MAISI label index (0-255) each local "
        "label is drawn as, {name: index}; the bundle's index of the same structure, or a free one for a new class "
        "(0 merges it into the background). Labels named as in the bundle's label_dict.json map by name.")


class FinetunePrivacyConfig(Section):
    """Differentially private fine-tuning (DP-SGD): a formal (epsilon, delta) guarantee per patient.

    Each step samples patients independently (Poisson, as the accountant assumes), takes one case of each, clips
    each patient's gradient to ``max_grad_norm`` and adds Gaussian noise calibrated so that the whole run spends
    at most ``epsilon``. Only the adapter trains (``finetune.method`` lora, domain_embedding or block_shifts); the
    base must not have seen these patients.
    """

    epsilon: float | None = Field(None, gt=0, allow_inf_nan=False, description="the budget the whole fine-tune may "
                                  "spend; null: not private (an ordinary fine-tune)")
    delta: float = Field(1e-5, gt=0, lt=1, description="must be below 1 / (fine-tune patients)")
    max_grad_norm: float = Field(1.0, gt=0, description="L2 bound on each patient's gradient per step")
    clipping: Literal["normalize", "clip"] = Field(
        "normalize", description="normalize: every patient's gradient is scaled to norm max_grad_norm (automatic "
        "clipping), so the bound needs no tuning to the gradients' scale (a LoRA's gradients of a diffusion loss are "
        "~1e-2: clipped at 1 they keep their size and the noise, scaled to the bound, buries them); clip: a gradient "
        "above max_grad_norm is scaled down to it, one below is kept")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant: Renyi DP or privacy random "
                                              "variables (tighter)")
    noise_multiplicity: int = Field(
        1, ge=1, le=256, description="draws of timestep and noise per sampled patient, averaged before the bound: "
        "the patient's gradient varies less, at no cost in epsilon (it is still one patient's); each step costs "
        "this many times the compute (on the shared chest X-rays 8 raised the agreement of the patients' gradients on "
        "the domain embedding from 0.39 to 0.65: README)")

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


class FinetuneConfig(Section):
    """Adapt a trained model to a subset (a rare finding, 5-50 cases) without touching the base folder."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    from_: str | None = Field(None, alias="from", description="folder of the base model: a radsynth model folder, "
                              "a diffusers Stable-Diffusion-family folder or a MONAI MAISI bundle (local; nothing is "
                              "downloaded)")
    base_format: Literal["auto", "radsynth", "diffusers", "maisi"] = Field(
        "auto", description="what finetune.from is; auto reads it off the folder's files")
    maisi: MaisiBaseConfig = Field(default_factory=MaisiBaseConfig)
    filter: CaseFilter = Field(
        default_factory=dict, description="the cases' values of modality, body_region or an attribute (compared as "
        "text), e.g. {finding: pneumothorax}")
    method: Literal["lora", "domain_embedding", "block_shifts", "full"] = Field(
        "lora", description="what trains: lora, low-rank factors on the UNet's attention projections (rank, alpha); "
        "domain_embedding, one vector added to the timestep embedding (256 parameters on the default UNet: small "
        "enough that a private fine-tune on 20 patients keeps a signal-to-noise near 1, against 0.03 for a rank-8 "
        "LoRA; README); block_shifts, that vector and a per-channel shift of each residual block (1,472 "
        "parameters: nearly a LoRA's realism without privacy, about the domain embedding's with it; README); "
        "full, the whole UNet")
    rank: int = Field(8, ge=1, description="with method lora")
    alpha: float = Field(8.0, gt=0, description="with method lora")
    max_cases: int = Field(50, ge=1)
    max_steps: int = Field(500, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="also stop after this much training time (this part's, resumed runs included); the "
        "step reached depends on the machine; null: max_steps alone")
    learning_rate: float = Field(1e-4, gt=0)
    privacy: FinetunePrivacyConfig = Field(default_factory=FinetunePrivacyConfig)


class DistillConfig(Section):
    """A few-step student distilled from the trained model by ``radsynth distill`` (``sampling.student`` uses it).

    Consistency distillation (LCM-style): the student learns to jump from any point of the guided teacher's
    solver trajectory to its end, so a few jumps replace the solver and guidance costs nothing at sampling.
    """

    method: Literal["consistency"] = "consistency"
    # Measured (benchmarks/sampler_speed.py): 2 steps had the best FD and coverage of 1, 2 and 4 on the 3D demo and
    # stayed inside the real-vs-real interval on the 2D one, where 1 step was best and 4 the worst.
    steps: int = Field(2, ge=1, description="the student's sampling steps")
    teacher_steps: int = Field(50, ge=2, le=1000, description="steps of the teacher solver grid it is distilled on "
                               "(DDIM, or FlowMatchEuler for rectified flow)")
    guidance_scale: float | None = Field(
        None, ge=0, description="the teacher's classifier-free guidance the student learns; default "
        "sampling.guidance_scale")
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    batch_size: int = Field(8, ge=1)
    target_decay: float = Field(0.95, gt=0, lt=1, description="EMA rate of the target network (LCM's 0.95)")
    max_steps: int = Field(1000, ge=1)
    max_minutes: float | None = Field(
        None, gt=0, description="also stop after this much training time (this part's, resumed runs included); the "
        "step reached depends on the machine; null: max_steps alone")
    checkpoint_every: int = Field(250, ge=1)

    @model_validator(mode="after")
    def _steps_on_grid(self) -> DistillConfig:
        if self.steps > self.teacher_steps:
            raise ValueError(f"distill.steps ({self.steps}) must not exceed distill.teacher_steps ({self.teacher_steps})")
        return self


class CycleGANConfig(Section):
    """The unpaired baseline of ``translation.method: cycle_gan`` (``generators.cycle_gan``), trained by
    ``radsynth translate`` on the training split's images of the two modalities when its folder is missing."""

    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=2)
    num_res_units: int = Field(2, ge=0)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(None, gt=0, description="also stop after this much training time")
    cycle_weight: float = Field(10.0, ge=0)
    identity_weight: float = Field(0.0, ge=0, description="0: none (across modalities it would keep intensities)")
    checkpoint_every: int = Field(500, ge=1)


class TranslationConfig(Section):
    """``radsynth translate``: images of one modality as another, each keeping its source's labels.

    diffusion: the trained multi-modality model (``modality`` e.g. ct+mri) inverts the source under its own
    modality's prompt and redraws it under the target's (``pipelines.sampling.translation``), steered by the
    source's label map through the model's ControlNet when both exist; cycle_gan: the unpaired baseline.
    """

    method: Literal["diffusion", "cycle_gan"] = "diffusion"
    strength: float = Field(0.6, gt=0, le=1, description="how far up the noise schedule the source is walked: 1 "
                            "keeps least of it")
    num_inference_steps: int = Field(50, ge=1, description="steps of the whole schedule; each walk takes strength "
                                     "of them")
    guidance_scale: float = Field(1.5, ge=0, description="classifier-free guidance on the walk down")
    use_labels: bool = Field(True, description="steer by the source's label map through the ControlNet (diffusion)")
    batch_size: int = Field(8, ge=1)
    cycle_gan: CycleGANConfig = Field(default_factory=CycleGANConfig)


class SamplingConfig(Section):
    scheduler: Literal["ddpm", "ddim", "dpm_solver", "flow_match_euler"] = "ddim"
    num_inference_steps: int = Field(50, ge=1)
    guidance_scale: float = Field(3.0, ge=0)
    guidance_interval: tuple[float, float] | None = Field(
        None, description="guide only the steps whose noise level lies in [low, high] (the timestep as a fraction of "
        "the training schedule: 1 pure noise, 0 clean); the others run the conditional model alone, at half the "
        "compute (Kynkaanniemi et al. 2024). The image model's steps only; null: every step")
    mask_guidance_scale: float | None = Field(None, ge=0, description="the mask generator's classifier-free "
                                              "guidance when pairs draw their maps; null: guidance_scale")
    num_samples: int = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(32, ge=1, description="samples per shard; shards are the unit of fan-out and of resume")
    prompts: list[str] = Field(default_factory=list, description="empty: use prompts of the test split")
    pairs: bool = Field(False, description="image + label-map pairs from the mask models (conditioning.use_masks)")
    lesions: list[str] = Field(default_factory=list, description="lesion edits applied to each pair's mask, "
                               "e.g. 'nodule 8 mm in right lung' (generate --pairs)")
    inpaint: bool = Field(False, description="pairs whose lesion edits are generated into the training case's own "
                          "real image, the rest kept (LeFusion-style; derived from real, internal releases only)")
    inpaint_margin: int = Field(2, ge=0, description="voxels around an inpainted lesion regenerated to blend its edge")
    mask_source: Literal["bank", "generated"] = Field(
        "bank", description="where a pair's label map comes from: augmented training maps (derived from real, "
        "internal releases only) or the mask generator (mask_generator.enabled)")
    output_format: Literal["auto", "nifti", "png16"] = "auto"
    student: bool = Field(False, description="sample with the distilled few-step student (radsynth distill; "
                          "distill.steps steps, its learnt guidance) instead of the trained model")

    @property
    def guidance(self) -> dict:
        """The image model's guidance as a sampling pipeline takes it (``pipeline(..., **sampling.guidance)``)."""
        return {"guidance_scale": self.guidance_scale, "guidance_interval": self.guidance_interval}

    @field_validator("guidance_interval")
    @classmethod
    def _noise_levels(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0.0 <= value[0] < value[1] <= 1.0:
            raise ValueError(f"must be two noise levels with 0 <= low < high <= 1, got {list(value)}")
        return value


class ScoringConfig(Section):
    feature_spaces: list[Literal["random_cnn", "radiomics", "self_supervised"]] = Field(
        default_factory=lambda: ["random_cnn", "radiomics", "self_supervised"]
    )
    sample_dir: str | None = Field(None, description="samples to score; default <output_dir>/samples")
    modality: Modality | None = Field(None, description="score against this modality's real cases only (a pooled "
                                      "model's samples of one modality, translated ones); null: every real case")
    paired_truth: str | None = Field(
        None, description="translated samples only: an MSD folder of scoring.modality holding each source case under "
        "its own case id (a paired rendering, as the torso phantoms give): pixel truth (SSIM, PSNR)")
    max_samples: int | None = Field(None, ge=2, description="score at most this many samples (the first ones)")
    synthetic_memory_mb: float = Field(
        1024, ge=0, description="synthetic images and maps beyond this size are decoded into a temporary file "
        "($TMPDIR) and read from it batch by batch, so scoring a large set does not hold it in memory; 0: always")
    batch_size: int = Field(256, ge=1, description="samples per batch of the per-sample work (embeddings, pixel "
                            "nearest neighbours); in a build each batch is a task on runtime.task_runner")
    bootstrap_samples: int = Field(200, ge=10)
    nearest_neighbour_chunk: int = Field(1024, ge=1)
    copy_detection_recall: float = Field(0.95, gt=0, lt=1)
    pixel_comparison_size: int = Field(64, ge=8, description="pixel nearest neighbours compare at most this per side")
    pixel_max_shift: int = Field(2, ge=0, description="shifts (pixels) tolerated by the pixel nearest neighbour")
    self_supervised_steps: int = Field(300, ge=1)
    segmenter_steps: int = Field(300, ge=1, description="training steps of the real-trained segmenter that judges "
                                 "mask adherence: the gate counts a label only where it finds it on real test images "
                                 "(release.gate.mask_dice_judge_min); small findings need more steps")
    classifier_steps: int = Field(300, ge=1)
    attributes: list[str] | None = Field(
        None, description="prompt attributes to score adherence and strata on; default conditioning.attributes"
    )
    min_stratum_size: int = Field(8, ge=2, description="strata with fewer samples are listed, not scored")
    membership_inference: bool = True
    membership_samples: int = Field(64, ge=4, description="members (train) and as many non-members (holdout)")
    membership_timesteps: int = Field(10, ge=1)
    utility: bool = True
    utility_fractions: list[float] = Field(default_factory=lambda: [0.1, 0.25, 1.0])
    utility_seeds: int = Field(3, ge=1)
    utility_steps: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _truth_has_a_modality(self) -> ScoringConfig:
        if self.paired_truth is not None and self.modality is None:
            raise ValueError("scoring.paired_truth needs scoring.modality (the modality the truth is in)")
        return self

    @field_validator("utility_fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError(f"fractions must lie in (0, 1], got {value}")
        return value


class GateConfig(Section):
    """Dataset-level release gates, read from the scorecard. Privacy limits can be tightened, never loosened:
    their maxima are the defaults, so no config can wave a leaking dataset through."""

    feature_space: Literal["random_cnn", "radiomics", "self_supervised"] = Field(
        "self_supervised", description="the space the DCR share and coverage gates read (the others stay in the "
        "scorecard: random CNN is a sanity baseline, and z-scored radiomics distances of off-distribution samples "
        "collapse onto one hub training image)")
    dcr_share_max_sd: float = Field(
        2.0, gt=0, le=2.0, description="privacy: DCR share at most 0.5 + this many bootstrap SD (one-sided: only "
        "'closer to train than to holdout' leaks); 2 SD keeps false refusals of private generators near 2.5%")
    copy_rate_margin: float = Field(
        0.01, ge=0, le=0.01, description="privacy: copy rate at most the holdout's rate + this (+ 2 SE sampling allowance)")
    exact_copy_fraction: float = Field(
        0.01, ge=0.01, le=0.5, description="privacy: a sample closer to a training image than this fraction of the "
        "holdout's closest distance is an exact copy (16-bit rounding keeps a saved copy just above 0)")
    membership_tpr_max: float = Field(
        0.02, ge=0, le=0.02, description="privacy: membership-inference TPR at 1% FPR at most this (chance is 0.01)")
    coverage_margin: float | None = Field(
        0.05, ge=0, description="quality: coverage at least the real floor minus this; null: not gated")
    mask_dice_ratio_min: float | None = Field(
        0.9, ge=0, description="quality: segmenter Dice on synthetic / on real test, per label; null: not gated")
    mask_dice_judge_min: float = Field(
        0.5, ge=0, le=1, description="quality, with mask_dice_ratio_min: the real-trained segmenter's Dice on real "
        "test images per label, below which its ratio is not evidence and the label fails (a rare finding needs a "
        "judge trained longer: scoring.segmenter_steps)")
    intensity: bool = Field(True, description="quality: per-label intensity within the real data's range")
    attribute_adherence_min: float | None = Field(
        0.8, ge=0, description="quality: per conditioned attribute, the real-trained classifier's balanced accuracy "
        "on synthetic over on real test (prompts must steer the generator); null: not gated")


class ReleaseConfig(Section):
    formats: list[Literal["nnunet", "msd", "monai", "imagefolder", "png16", "dicom"]] = Field(
        default_factory=lambda: ["nnunet", "monai"]
    )
    destination: str | None = Field(None, description="release folder; default <output_dir>/release")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$", description="default: data.name")
    internal: bool = Field(False, description="allows samples derived from real images (mask bank, inpainting)")
    license: str | None = Field(
        None, description="the released dataset's license; default: the training data's, when every case has the "
        "same one (share-alike and non-commercial terms carry over to data made from it), else 'other'")
    keep_versions: int = Field(5, ge=1)
    nnunet_dataset_id: int = Field(900, ge=1, le=999, description="nnU-Net's Dataset<ID>_<name> folder number")
    drop_intensity_outliers: bool = Field(True, description="drop samples whose intensities leave the real range")
    drop_attribute_mismatches: bool = Field(
        False, description="drop samples the real-trained classifier reads as another prompted attribute value")
    gate: GateConfig = Field(default_factory=GateConfig)


class LaunchConfig(Section):
    """``accelerate launch`` settings for multi-GPU / multi-node training; one process trains in the flow's own."""

    num_processes: int = Field(1, ge=1, description="processes in all (GPUs over all machines)")
    num_machines: int = Field(1, ge=1)
    machine_rank: int = Field(0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int | None = Field(None, ge=1, le=65535)
    config_file: str | None = Field(None, description="an accelerate config YAML (`accelerate config`); flags above win")

    @model_validator(mode="after")
    def _machines(self) -> LaunchConfig:
        if self.num_processes % self.num_machines:
            raise ValueError(f"num_processes ({self.num_processes}) must be a multiple of num_machines "
                             f"({self.num_machines}): every machine runs as many processes")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank must be below num_machines ({self.num_machines}), got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("num_machines > 1 needs main_process_ip: the address of machine 0, which the others join")
        return self

    @property
    def distributed(self) -> bool:
        return self.num_processes > 1 or self.num_machines > 1 or self.config_file is not None

    @property
    def processes_per_machine(self) -> int:
        return self.num_processes // self.num_machines


class RuntimeConfig(Section):
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")
    precision: Literal["no", "bf16", "fp16", "auto"] = Field(
        "no", description="training's mixed precision; auto: bf16 where the device computes it natively (an NVIDIA "
        "GPU from Ampere on; for 2D models a CPU with AVX512-BF16 or AMX), else no (fp32)")
    seed: int = 0
    output_dir: str = "runs/default"
    num_workers: int = Field(0, ge=0)
    tensorboard: bool = Field(False, description="also log training metrics for TensorBoard (extra: tensorboard)")
    task_runner: Literal["threads", "dask", "ray"] = Field(
        "threads", description="where sampling shards run: threads here, a Dask cluster (extra: dask) or Ray (extra: ray)")
    cluster_address: str | None = Field(
        None, description="an existing Dask scheduler or Ray cluster; default: start a local one")
    workers: int | None = Field(None, ge=1, description="shards at a time; default one per GPU, else 1")
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, value: str) -> str:
        if Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"'{value}' is a file: the run's outputs go into a folder (created when missing)")
        return value


class RadsynthConfig(Section):
    data: DataConfig
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    conditioning: ConditioningConfig = Field(default_factory=ConditioningConfig)
    controlnet: ControlNetConfig = Field(default_factory=ControlNetConfig)
    mask_generator: MaskGeneratorConfig = Field(default_factory=MaskGeneratorConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    translation: TranslationConfig = Field(default_factory=TranslationConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _mask_models_chain(self) -> RadsynthConfig:
        # Generated label maps are drawn by the mask generator, which only the ControlNet's images can follow.
        if self.mask_generator.enabled and not self.conditioning.use_masks:
            raise ValueError("mask_generator.enabled needs conditioning.use_masks: true")
        if self.sampling.mask_source == "generated" and not self.mask_generator.enabled:
            raise ValueError("sampling.mask_source: generated needs mask_generator.enabled: true")
        if self.sampling.pairs and not self.conditioning.use_masks:
            raise ValueError("sampling.pairs needs conditioning.use_masks: true (the images are drawn from the maps)")
        if self.sampling.lesions and not self.sampling.pairs:
            raise ValueError("sampling.lesions edit the masks of pairs: set sampling.pairs: true")
        if self.sampling.inpaint and not (self.sampling.pairs and self.sampling.lesions
                                          and self.sampling.mask_source == "bank"):
            raise ValueError("sampling.inpaint generates lesion edits into real training images: it needs "
                             "sampling.pairs: true, sampling.lesions and mask_source: bank")
        return self

    @model_validator(mode="after")
    def _maps_in_the_unet(self) -> RadsynthConfig:
        if self.conditioning.mask_input != "concat":
            if self.diffusion.rare_label_weight:
                raise ValueError("diffusion.rare_label_weight weighs the label map the UNet reads: set "
                                 "conditioning.mask_input: concat (a ControlNet's is controlnet.rare_label_weight)")
            return self
        if not self.conditioning.use_masks:
            raise ValueError("conditioning.mask_input: concat reads label maps: set conditioning.use_masks: true")
        if self.finetune.from_:
            raise ValueError("conditioning.mask_input: concat: a pretrained base's UNet reads no label map; a "
                             "fine-tune's maps go through a ControlNet (mask_input: controlnet)")
        if self.diffusion.augment.probability:
            raise ValueError("conditioning.mask_input: concat: augmented latents would not match their maps; set "
                             "diffusion.augment.probability: 0")
        if self.sampling.student:
            raise ValueError("conditioning.mask_input: concat: the student is distilled without maps, so it cannot "
                             "draw pairs; set sampling.student: false")
        return self

    @model_validator(mode="after")
    def _finetune_parts(self) -> RadsynthConfig:
        # A fine-tune with masks trains the tuned model's ControlNet and nothing else of the mask models.
        if self.finetune.from_ and self.mask_generator.enabled:
            raise ValueError("mask_generator.enabled: a fine-tune trains no mask generator (its pairs take their "
                             "maps from the mask bank): set it to false")
        if self.finetune.privacy.enabled and self.conditioning.use_masks:
            raise ValueError("conditioning.use_masks: the ControlNet would train on the fine-tune patients outside "
                             "DP-SGD, so no release could carry the guarantee: set it to false under finetune.privacy")
        return self

    @property
    def output_dir(self) -> Path:
        return Path(self.runtime.output_dir)

    def check_trainable(self) -> None:
        """The image grid halves cleanly through the autoencoder and then the UNet's levels (and the mask
        generator's, on its coarser grid). Checked before training rather than at load: ingest alone may use any
        grid."""
        factor = 2 ** (len(self.autoencoder.channels) - 1) * 2 ** (len(self.diffusion.channels) - 1)
        shape = self.data.preprocess.target_shape
        if any(size % factor for size in shape):
            raise UserInputError("data.preprocess.target_shape", f"{shape} is not divisible by {factor}, the "
                                 f"autoencoder's {2 ** (len(self.autoencoder.channels) - 1)}x and the UNet's "
                                 f"{2 ** (len(self.diffusion.channels) - 1)}x downsampling",
                                 f"a multiple of {factor} on every axis, e.g. {[-(-n // factor) * factor for n in shape]}")
        generator = self.mask_generator
        grid = generator.downsample * 2 ** (len(generator.channels) - 1)
        if generator.enabled and any(size % grid for size in shape):
            raise UserInputError("mask_generator.downsample", f"target_shape {shape} is not divisible by {grid}, the "
                                 "mask generator's coarser grid and its UNet's downsampling", f"a multiple of {grid}")
