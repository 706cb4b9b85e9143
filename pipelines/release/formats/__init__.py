"""Release formats: one writer per format name of ``release.formats``, and the checks that refuse a format
the samples cannot fill (before anything is written).

Each writer is ``write_<format>(samples, out_dir, info[, real]) -> list[Path]``: it writes into ``out_dir``, a
folder the caller created and publishes atomically afterwards, and returns every path it wrote.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

from radsynth.configs.errors import UserInputError
from radsynth.pipelines.release.samples import DatasetInfo, ReleaseSample

from .dicom import write_dicom
from .imagefolder import class_folder, write_imagefolder
from .monai import write_monai
from .msd import write_msd
from .nnunet import write_nnunet
from .png16 import write_png16

__all__ = ["FORMAT_WRITERS", "check_format_supports", "check_formats_for_build"]

FormatWriter = Callable[..., list[Path]]
FORMAT_WRITERS: dict[str, FormatWriter] = {
    "nnunet": write_nnunet,
    "msd": write_msd,
    "monai": write_monai,
    "imagefolder": write_imagefolder,
    "png16": write_png16,
    "dicom": write_dicom,
}
WHERE = "release.formats"
SHOWN_IDS = 3


def check_format_supports(format_name: str, samples: Sequence[ReleaseSample], info: DatasetInfo) -> None:
    """Raise UserInputError when ``format_name`` cannot hold these samples; return quietly when it can."""
    if format_name not in FORMAT_WRITERS:
        raise UserInputError(WHERE, f"unknown format '{format_name}'", f"allowed: {', '.join(FORMAT_WRITERS)}")
    if format_name in ("nnunet", "msd"):
        _check_segmentation(format_name, samples, info)
    elif format_name == "png16":
        _check_png16_is_2d(info.spatial_dims)
    elif format_name == "imagefolder":
        _check_classes(samples, info)
    elif format_name == "dicom":
        _check_dicom(info)


def check_formats_for_build(formats: Sequence[str], spatial_dims: int, pairs: bool) -> None:
    """What ``check_format_supports`` would refuse at release time, checked before a build trains anything: a
    build that samples images alone has no label maps for nnunet or msd, and png16 holds 2D images."""
    for format_name in formats:
        if format_name in ("nnunet", "msd") and not pairs:
            raise UserInputError(WHERE, f"{format_name} needs a label map for every sample, and this build samples "
                                 "images alone (sampling.pairs: false)",
                                 "sampling.pairs: true with conditioning.use_masks, or monai, imagefolder or png16")
        if format_name == "png16":
            _check_png16_is_2d(spatial_dims)


def _check_png16_is_2d(spatial_dims: int) -> None:
    if spatial_dims != 2:
        raise UserInputError(WHERE, f"png16 holds 2D images, the dataset is {spatial_dims}D",
                             "nnunet, msd, monai or dicom for 3D")


def _check_segmentation(format_name: str, samples: Sequence[ReleaseSample], info: DatasetInfo) -> None:
    unlabelled = [sample.sample_id for sample in samples if sample.label_path is None]
    if unlabelled:
        raise UserInputError(
            WHERE,
            f"{format_name} needs a label map for every sample; {len(unlabelled)} have none ({_shown(unlabelled)})",
            "generate with masks (mask-to-image or text-to-pair), or use monai, imagefolder or png16",
        )
    values = sorted({0, *info.label_names})
    if values != list(range(len(values))):
        raise UserInputError(WHERE, f"{format_name} needs consecutive label values 0..N, got {values}", "renumber the labels")
    names = [str(name) for name in info.label_names.values()]
    if len(set(names)) != len(names):
        raise UserInputError(WHERE, f"{format_name} needs one name per label value, got {names}", "give each label its own name")


def _check_classes(samples: Sequence[ReleaseSample], info: DatasetInfo) -> None:
    attribute = info.class_attribute
    if not attribute:
        raise UserInputError(WHERE, "imagefolder needs a class attribute to name its folders, none is set",
                             f"one of the prompt attributes: {', '.join(info.attributes) or '(none)'}")
    unclassed = [sample.sample_id for sample in samples if not sample.conditions.get(attribute)]
    if unclassed:
        raise UserInputError(
            WHERE,
            f"imagefolder sorts by '{attribute}', which {len(unclassed)} samples were not prompted with ({_shown(unclassed)})",
            f"prompt every sample with a '{attribute}' value, or leave imagefolder out",
        )
    folders: dict[str, set[str]] = {}
    for sample in samples:
        value = sample.conditions[attribute]
        folders.setdefault(class_folder(value), set()).add(value)
    merged = sorted(values for values in folders.values() if len(values) > 1)
    if merged:
        raise UserInputError(WHERE, f"imagefolder classes {sorted(merged[0])} would share one folder name",
                             "class values that differ in letters or digits, not only in punctuation or spaces")


def _check_dicom(info: DatasetInfo) -> None:
    if importlib.util.find_spec("highdicom") is None:
        raise UserInputError(WHERE, "dicom needs highdicom (for DICOM-SEG), which is not installed",
                             "pip install 'radsynth[dicom-seg]', or leave dicom out")
    if info.spatial_dims == 3 and info.modality == "xray":
        raise UserInputError(WHERE, "dicom writes 3D series as CT or MR images, the dataset is 3D X-ray", "ct or mri for 3D")


def _shown(ids: Sequence[str]) -> str:
    more = f", ... {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
    return ", ".join(ids[:SHOWN_IDS]) + more
