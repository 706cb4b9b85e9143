"""Build the ``ImageSet`` objects a scorecard compares, from a build or from plain folders.

Two sources:
- a build (``radsynth evaluate``): real splits from the preprocessed cache (already on the model's grid and
  intensity scale), synthetic samples from the generate stage's folder (sidecars give prompt and units);
- any folders (``radsynth score``): PNG or NIfTI files, masks optional in a sibling ``labels/`` or ``masks/``
  folder with the same file names, patient ids optional in a ``metadata.csv`` (columns ``file`` or ``id``,
  ``patient_id``, any attribute columns). Every set is brought onto the training folder's grid (the shape of
  its first image) and one intensity map fitted on the training images, so that a difference between sets is
  a difference of content and not of file format.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.numpy import load_file

from radsynth.configs import RadsynthConfig, UserInputError
from radsynth.configs.schema import IntensityConfig
from radsynth.generators.data import ConditioningSpec
from radsynth.generators.prompts import parse_prompt, prompt_attributes

from ..data.ingest import data_dir
from ..data.io import NIFTI_SUFFIXES, RASTER_SUFFIXES, read_image, spacing_of, strip_image_suffix
from ..data.manifest import CaseRecord, read_manifest
from ..data.preprocess import IntensityMap, fit_intensity_map
from ..sampling.sidecar import SampleDigest, Sidecar, read_sidecar
from ..sampling.writers import png16_to_physical
from .image_sets import ImageSet, image_array

MASK_FOLDERS = ("labels", "masks")
METADATA_FILE = "metadata.csv"
IMAGE_SUFFIXES = (*NIFTI_SUFFIXES, *RASTER_SUFFIXES)


# ------------------------------------------------------------------------------------------- a build


def build_summary(config: RadsynthConfig) -> dict:
    path = data_dir(config) / "summary.json"
    if not path.is_file():
        raise UserInputError(path, "no ingested data for this config", "run `radsynth ingest CONFIG` first")
    return json.loads(path.read_text())


def split_records(config: RadsynthConfig, split: str, modality: str | None = None) -> list[CaseRecord]:
    """The manifest's cases of one split, of ``modality`` alone when given."""
    return [r for r in read_manifest(data_dir(config) / "manifest.jsonl")
            if r.split == split and modality in (None, r.modality)]


def cached_split(config: RadsynthConfig, split: str, limit: int | None = None, modality: str | None = None) -> ImageSet:
    """The real cases of one split (of ``modality``, else of ``scoring.modality`` alone when set), from the
    preprocessed cache, as the model saw them."""
    summary = build_summary(config)
    modality = modality or config.scoring.modality
    records = split_records(config, split, modality)[:limit]
    if not records:
        which = f"the {split} split" + (f" has no {modality} cases" if modality else " is empty")
        raise UserInputError(data_dir(config) / "manifest.jsonl", which,
                             "a dataset with train, holdout and test cases" + (" of scoring.modality" if modality else ""))
    cache_dir = Path(summary["cache"])
    arrays = [load_file(str(cache_dir / f"{r.case_id}.safetensors")) for r in records]
    images = np.stack([a["image"][0] for a in arrays]).astype(np.float32)
    masks = np.stack([a["label"][0] for a in arrays]).astype(np.int64) if all("label" in a for a in arrays) else None
    with safe_open(str(cache_dir / f"{records[0].case_id}.safetensors"), framework="numpy") as handle:
        spacing = spacing_of(handle.get_tensor("affine"))
    conditioning = ConditioningSpec(config.conditioning.attributes, config.conditioning.include_text)
    return ImageSet(images, [r.case_id for r in records], [r.patient_id for r in records], spacing,
                    IntensityMap(**summary["intensity_train"]), is_synthetic=False, masks=masks,
                    conditions=[_conditions(r, config) for r in records],
                    prompts=[conditioning.prompt(r) for r in records], name=split)


def _conditions(record: CaseRecord, config: RadsynthConfig) -> dict[str, str]:
    keys = list(config.conditioning.attributes) or sorted(record.attributes)
    return prompt_attributes(record.attributes, keys)


def sample_set(folder: str | Path, reference: ImageSet, name: str = "synthetic", max_samples: int | None = None,
               memory_mb: float | None = None) -> ImageSet:
    """Generated samples (image + JSON sidecar) on the reference's grid and intensity scale.

    The sidecar's prompt gives each sample's conditions; PNG samples are mapped back to physical units through
    the sidecar's ``png_low``/``png_high`` first. A pair's label map (the sidecar's ``label_file``, as
    ``radsynth generate --pairs`` writes it) is that sample's mask and never a sample of its own; without pairs,
    masks come from a ``labels/`` or ``masks/`` folder. Samples without a sidecar are read like any image folder.
    max_samples: the first this many samples only. memory_mb: a set whose images and masks would take more is
    decoded into a file on disk (``image_array``), sample by sample; None: always in memory.
    """
    folder = Path(folder)
    files = _image_files(folder)
    sidecars = {path: _sidecar(path) for path in files}
    label_files = {sidecar.label_file for sidecar in sidecars.values() if sidecar and sidecar.label_file}
    files = [path for path in files if path.name not in label_files]
    paired = sum(bool(sidecars[path] and sidecars[path].label_file) for path in files)
    if 0 < paired < len(files):
        raise UserInputError(folder, f"{paired} of {len(files)} samples have a label map",
                             "pairs for every sample (radsynth generate --pairs) or for none")
    files = files[:max_samples]
    mask_folder = None if paired else _mask_folder(folder)
    shape = reference.images.shape[1:]
    images, masks = _arrays(len(files), shape, bool(paired) or mask_folder is not None, memory_mb)
    ids, prompts, conditions, sources = [], [], [], []
    for i, path in enumerate(files):
        sidecar, sample_id = sidecars[path], strip_image_suffix(path.name)
        images[i] = _on_grid(reference.intensity.forward(_read_physical(path, sidecar)), shape, order=1)
        ids.append(sample_id)
        prompts.append(sidecar.prompt if sidecar else "")
        # Conditions as data; a sidecar from before they were recorded states them in its prompt's header.
        conditions.append(dict(sidecar.conditions) or parse_prompt(sidecar.prompt) if sidecar else {})
        if paired:
            masks[i] = _read_mask_file(folder / sidecar.label_file, shape)
        elif mask_folder is not None:
            masks[i] = _read_mask(mask_folder, path.name, shape)
        if sidecar:  # after the files are known to be there
            sources.append({**asdict(SampleDigest.of(folder, sample_id, sidecar)), "model_hash": sidecar.model_hash})
    return ImageSet(images, ids, list(ids), reference.spacing, reference.intensity, is_synthetic=True,
                    masks=masks, conditions=conditions, prompts=prompts, name=name,
                    sources=sources if len(sources) == len(ids) else [])


def _arrays(count: int, shape: Sequence[int], with_masks: bool,
            memory_mb: float | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Empty image (float32) and mask (int64) arrays for ``count`` images: in memory, or on disk in the system's
    temporary folder when they would take more than ``memory_mb``."""
    size = count * int(np.prod(shape)) * (4 + (8 if with_masks else 0))
    on_disk = tempfile.gettempdir() if memory_mb is not None and size > memory_mb * 2**20 else None
    return (image_array(count, shape, np.float32, on_disk),
            image_array(count, shape, np.int64, on_disk) if with_masks else None)


def _sidecar(image_path: Path) -> Sidecar | None:
    """The sample's sidecar, validated (and confined to its own files); None for an image without one."""
    path = image_path.with_name(f"{strip_image_suffix(image_path.name)}.json")
    return read_sidecar(path) if path.is_file() else None


# ---------------------------------------------------------------------------------------- any folder


def folder_set(folder: str | Path, name: str, is_synthetic: bool, reference: ImageSet | None = None,
               modality: str | None = None, memory_mb: float | None = None) -> ImageSet:
    """All images of a folder. Without a reference the folder *is* the reference: its first image's shape is
    the grid and an intensity map is fitted on all its pixels (``modality`` "ct" uses the CT window). With one,
    images are read one at a time and a set above ``memory_mb`` is held on disk (see ``sample_set``)."""
    folder = Path(folder)
    files = _image_files(folder)
    if reference is None:
        arrays = [_checked_image(path, is_synthetic) for path in files]
        shape = arrays[0].shape
        pooled = np.concatenate([a[:: max(1, a.size // 200_000)].ravel() for a in arrays])
        intensity = fit_intensity_map(pooled, modality or "xray", IntensityConfig())
        if intensity.high <= intensity.low:
            raise UserInputError(folder, "every training pixel has the same value", "real images with contrast")
        spacing = read_image(files[0]).spacing[: len(shape)]
    else:
        arrays = None
        shape, intensity, spacing = reference.images.shape[1:], reference.intensity, reference.spacing
    mask_folder = _mask_folder(folder)
    images, masks = _arrays(len(files), shape, mask_folder is not None, memory_mb)
    for i, path in enumerate(files):
        array = arrays[i] if arrays is not None else _checked_image(path, is_synthetic)
        images[i] = _on_grid(intensity.forward(array), shape, order=1)
        if masks is not None:
            masks[i] = _read_mask(mask_folder, path.name, shape)
    ids = [strip_image_suffix(p.name) for p in files]
    metadata = _metadata(folder, ids)
    groups = [metadata.get(i, {}).get("patient_id") or i for i in ids]
    conditions = [{k: v for k, v in metadata.get(i, {}).items() if k not in ("patient_id", "file", "id") and v}
                  for i in ids]
    return ImageSet(images, ids, groups, spacing, intensity, is_synthetic, masks, conditions, name=name)


def _checked_image(path: Path, is_synthetic: bool) -> np.ndarray:
    array = _read_physical(path, None)
    if not np.isfinite(array).all():
        raise UserInputError(path, "has NaN or infinite values", "images of finite intensities")
    if not is_synthetic and array.min() == array.max():
        raise UserInputError(path, f"every pixel is {array.min():g}: not a real image",
                             "real images with contrast (a blank file in a real folder is an export error)")
    return array


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UserInputError(folder, "not a folder", "a folder of .png or .nii.gz images")
    # Hidden files are skipped: a writer's temporary files (".syn_000001.123.tmp.png") are not images yet.
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise UserInputError(folder, "no images in this folder", f"files ending in {', '.join(IMAGE_SUFFIXES)}")
    return files


def _mask_folder(folder: Path) -> Path | None:
    return next((folder / name for name in MASK_FOLDERS if (folder / name).is_dir()), None)


def _read_physical(path: Path, sidecar: Sidecar | None) -> np.ndarray:
    array = np.asarray(read_image(path).array, dtype=np.float64)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # a 2D sample written as a one-slice NIfTI
    if sidecar is not None and sidecar.png_low is not None and path.suffix.lower() == ".png":
        return png16_to_physical(array, sidecar.png_low, sidecar.png_high)
    return array.astype(np.float32)


def _read_mask(mask_folder: Path, file_name: str, shape: Sequence[int]) -> np.ndarray:
    stem = strip_image_suffix(file_name)
    candidates = [mask_folder / file_name, *(mask_folder / f"{stem}{s}" for s in IMAGE_SUFFIXES)]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise UserInputError(mask_folder, f"no mask for image '{file_name}'",
                             "one mask per image with the same name, or no mask folder at all")
    return _read_mask_file(path, shape)


def _read_mask_file(path: Path, shape: Sequence[int]) -> np.ndarray:
    if not path.is_file():
        raise UserInputError(path, "label map named in the sample's sidecar is missing", "the pair's label file")
    mask = np.asarray(read_image(path).array)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if not np.allclose(mask, np.round(mask)):
        raise UserInputError(path, "mask has non-integer values", "integer label maps, 0 = background")
    if mask.dtype == np.uint8 and mask.max() == 255 and set(np.unique(mask)) <= {0, 255}:
        mask = mask // 255  # an 8-bit 0/255 binary mask
    return _on_grid(mask.astype(np.float32), shape, order=0).astype(np.int64)


def _on_grid(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resize onto ``shape`` when it differs (linear for images, nearest for masks)."""
    array = np.asarray(array, dtype=np.float32)
    if tuple(array.shape) == tuple(shape):
        return array
    if array.ndim != len(shape):
        raise UserInputError("images", f"a {array.ndim}D image among {len(shape)}D ones", "one dimensionality per run")
    mode = ("bilinear" if len(shape) == 2 else "trilinear") if order == 1 else "nearest"
    tensor = torch.from_numpy(array)[None, None]
    kwargs = {"align_corners": False} if order == 1 else {}
    return F.interpolate(tensor, size=tuple(shape), mode=mode, **kwargs)[0, 0].numpy()


def _metadata(folder: Path, ids: list[str]) -> dict[str, dict[str, str]]:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    key = "file" if rows and "file" in rows[0] else "id"
    if rows and key not in rows[0]:
        raise UserInputError(path, "no 'file' or 'id' column", "columns file (or id), patient_id, attributes...")
    return {strip_image_suffix(row[key]): {k: (v or "").strip() for k, v in row.items()} for row in rows}
