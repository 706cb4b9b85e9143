"""Radiology-style captions for the procedural phantoms, written from the attributes of what was drawn.

The words are chosen from the case's attributes only (finding, side, zone or lobe, the size measured on the
drawn label map), so a caption never claims something the image does not show. They imitate the register of
short reports to give text conditioning something realistic to learn; they are not clinical reports.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..manifest import AttributeValue

Attributes = Mapping[str, AttributeValue]

_SEX_WORDS = {"M": "male", "F": "female"}


def _patient(attributes: Attributes) -> str:
    return f"{attributes['age']}-year-old {_SEX_WORDS[str(attributes['sex'])]}"


def chest_xray_caption(attributes: Attributes) -> str:
    header = f"{attributes['view']} chest radiograph of a {_patient(attributes)}."
    return " ".join([header, *_chest_findings(attributes)])


def _chest_findings(attributes: Attributes) -> list[str]:
    finding, side = attributes["finding"], attributes.get("side")
    heart = "Heart size normal." if attributes["view"] == "PA" else "Heart size normal for an AP projection."
    if finding == "nodule":
        size = attributes["lesion_size_mm"]
        return [f"Solitary {size} mm nodule in the {side} {attributes['zone']} zone.", heart]
    if finding == "consolidation":
        size = attributes["lesion_size_mm"]
        return [f"Airspace consolidation in the {side} {attributes['zone']} zone, about {size} mm across.", heart]
    if finding == "effusion":
        return [f"{str(attributes['effusion_size']).capitalize()} {side} pleural effusion.", heart]
    if finding == "pneumothorax":
        return [f"{str(side).capitalize()} pneumothorax with an apical rim of {attributes['rim_mm']} mm.", heart]
    if finding == "cardiomegaly":
        return [f"Cardiomegaly, cardiothoracic ratio {attributes['cardiothoracic_ratio']:.2f}.", "Lungs clear."]
    return ["Lungs clear. No pleural effusion or pneumothorax.", heart]


def ct_torso_caption(attributes: Attributes) -> str:
    header = f"Non-contrast CT of the thorax and abdomen, {_patient(attributes)}."
    finding, size = attributes["finding"], attributes.get("lesion_size_mm")
    if finding == "liver_tumour":
        body = [f"{size} mm hypodense lesion in the {attributes['side']} hepatic lobe.", "No pulmonary nodule."]
    elif finding == "lung_nodule":
        lobe = f"{attributes['side']} {attributes['lobe']} lobe"
        body = [f"{size} mm solid pulmonary nodule in the {lobe}.", "No focal liver lesion."]
    else:
        body = ["No focal liver lesion. No pulmonary nodule."]
    return " ".join([header, *body])


def brain_mri_caption(attributes: Attributes) -> str:
    header = f"Contrast-enhanced T1-weighted brain MRI of a {_patient(attributes)}."
    ventricles = "Ventricles prominent for age." if attributes.get("ventricles") == "enlarged" else "Ventricles normal."
    if attributes["finding"] == "tumour":
        where = f"{attributes['side']} {attributes['lobe']} lobe"
        mass = f"{attributes['lesion_size_mm']} mm rim-enhancing mass with central necrosis in the {where}"
        return " ".join([header, f"{mass}, with surrounding oedema.", ventricles])
    return " ".join([header, "No intracranial mass.", ventricles])
