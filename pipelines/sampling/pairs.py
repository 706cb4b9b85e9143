"""What conditions each image + label-map pair, and what its sidecar says about the mask.

Bank masks (``PairSource``): a training-split mask with the lesion edits. The prompt is the source case's
structured attributes (never its report text, which would carry real words into a release) followed by the
lesion requests, so text and map describe the same thing. A bank mask is derived from a real case; its pair is
marked so, with the source case id, and can only go to an internal release.

Inpainting (``PairSource(inpaint=True)``): a training case's own map, unaugmented, with the lesion edits, and its
real image as the background; the region to generate is every voxel the edits changed. The output carries
that case's image outside the region: derived from real, with the source case id.

Generated masks (``generated_condition``): the text-to-pair pipeline drew the map from the prompt and edited
it; nothing of a real case is in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from radsynth.configs import RadsynthConfig
from radsynth.generators.prompts import parse_prompt, render_prompt

from ..masks import NO_AUGMENTATION, BankAugmentation, LesionRequest, MaskBank, apply_lesion_edit, parse_lesion_request


@dataclass
class SampleCondition:
    """What one sample is generated from: its prompt, and for a pair its label map and provenance."""

    prompt: str
    label_map: np.ndarray | None  # spatial integer labels; None for an image without a pair
    sidecar: dict  # mask_source, the bank's provenance, lesion edit records, derived_from_real
    background: np.ndarray | None = None  # inpainting: the real image (spatial, [-1, 1]) the lesion goes into
    region: np.ndarray | None = None  # inpainting: the voxels to generate (spatial booleans)
    conditions: dict = field(default_factory=dict)  # attribute values the prompt states, as data


class PairSource:
    """Draws each pair's condition from the mask bank, with the configured lesion edits; with ``inpaint`` the
    case's own map and image, for generating only the edited lesions into it."""

    def __init__(self, config: RadsynthConfig, inpaint: bool = False):
        self.inpaint = inpaint
        self.bank = MaskBank.from_ingest(config, NO_AUGMENTATION if inpaint else BankAugmentation())
        self.attribute_keys = list(config.conditioning.attributes)
        self.lesion_texts = list(config.sampling.lesions)
        self.requests: list[LesionRequest] = [parse_lesion_request(text, self.bank.label_names)
                                              for text in self.lesion_texts]

    def draw(self, seed: int) -> SampleCondition:
        """The mask, prompt and provenance of the pair whose sample seed is ``seed`` (reproducible)."""
        rng = np.random.default_rng(seed)
        mask = self.bank.draw(rng)[0]
        label_map = mask.label_map[0] if mask.label_map.ndim == len(mask.spacing) + 1 else mask.label_map
        edits = []
        for request in self.requests:
            label_map, record = apply_lesion_edit(label_map, mask.spacing, request, mask.label_names, rng,
                                                  orientation=mask.orientation)
            edits.append(record.to_dict())
        prompt = render_prompt(lesion_sentences(self.lesion_texts), mask.attributes, self.attribute_keys)
        condition = SampleCondition(prompt, np.asarray(label_map).astype(np.int64),
                                    _mask_sidecar(mask.provenance, edits, mask.label_names),
                                    conditions=dict(mask.attributes))
        if self.inpaint:
            original = mask.label_map.reshape(label_map.shape)
            entry = self.bank.entry(mask.provenance["source_case_id"])
            condition.background = entry.load_image().reshape(label_map.shape).astype(np.float32)
            condition.region = np.asarray(label_map) != original
            condition.sidecar["inpainting"] = {"background_case_id": entry.case_id,
                                               "region_voxels": int(condition.region.sum())}
        return condition


def generated_condition(prompt: str, label_map: np.ndarray, edits: list[dict],
                        label_names: dict[int, str]) -> SampleCondition:
    """The condition of a pair whose map the mask generator drew from ``prompt`` (then edited by ``edits``)."""
    provenance = {"mask_source": "generated", "derived_from_real": False}
    return SampleCondition(prompt, np.asarray(label_map).astype(np.int64), _mask_sidecar(provenance, edits, label_names),
                           conditions=parse_prompt(prompt))


def lesion_sentences(lesions: list[str]) -> str:
    return " ".join(f"{text}." for text in lesions)


def with_lesions(prompt: str, lesions: list[str]) -> str:
    """A prompt with the lesion requests appended, so the text describes the edited map."""
    return f"{prompt} {lesion_sentences(lesions)}".strip() if lesions else prompt


def _mask_sidecar(provenance: dict, edits: list[dict], label_names: dict[int, str]) -> dict:
    return {"mask_source": "edited" if edits else provenance["mask_source"], "mask": provenance, "lesions": edits,
            "derived_from_real": bool(provenance["derived_from_real"]),
            "label_names": {str(value): name for value, name in label_names.items()}}
