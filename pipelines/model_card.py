"""The model card: README.md inside a saved model folder, in the Hugging Face card style.

Aggregates only: case, patient and split counts, modalities, sources and licenses; never a patient id,
case id or report text.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from radsynth.configs import RadsynthConfig
from radsynth.generators.trainer import COMPUTE_FILE

from .data.io import write_json
from .data.manifest import CaseRecord
from .data.splits import split_counts


def write_model_card(folder: Path, config: RadsynthConfig, records: list[CaseRecord], summary: dict,
                     autoencoder_holdout: dict[str, float], digest: str, steps: int,
                     base_model: dict | None = None, distilled: dict | None = None, frontier: dict | None = None,
                     differential_privacy: dict | None = None) -> Path:
    origins = Counter(record.origin for record in records)
    licenses = Counter(record.license for record in records)
    front_matter = {"library_name": "radsynth", "tags": ["medical-imaging", "latent-diffusion", "synthetic-data"],
                    "license": "other", "model_hash": digest}
    splits = split_counts(records)
    lines = [
        "---", yaml.safe_dump(front_matter, sort_keys=False).strip(), "---", "",
        f"# radsynth latent diffusion model: {config.data.name}", "",
        "A text-conditioned latent diffusion model (MONAI AutoencoderKL + DiffusionModelUNet, diffusers scheduler)",
        f"trained from scratch by radsynth on local data. Modality: {', '.join(summary['modality'])}; "
        f"region: {', '.join(summary['body_region'])}; image grid {summary['preprocessed_shape']}.", "",
        "## Intended use", "",
        "Generating synthetic images for research and for augmenting training sets, after radsynth's scoring and",
        "privacy gate. Not for diagnosis. Samples are synthetic and must be labelled as such.", "",
        "## Training data", "",
        f"- cases: {len(records)} from {summary['patients']} patients "
        f"(origin: {', '.join(f'{k} {v}' for k, v in origins.items())})",
        *[f"- {name}: {count['cases']} cases, {count['patients']} patients" for name, count in splits.items()],
        "- only the train split was used for training; holdout and test were never seen",
        f"- licenses: {', '.join(f'{k} ({v} cases)' for k, v in licenses.items())}", "",
        *([f"Fine-tuned ({base_model['method']}) from the {base_model.get('format', 'radsynth')} base model "
            f"{base_model['hash'][:16]} on the cases matching "
            f"{base_model['filter']}; the base folder was not modified.", ""] if base_model else []),
        *([("Its label-map ControlNet is the base's, fine-tuned on the local labels, each drawn as a MAISI label "
            "index: " + ", ".join(f"{name} {index}" for name, index in base_model["label_indices"].items()) + "."),
           ""] if base_model and base_model.get("label_indices") else []),
        *(_distillation_lines(distilled, steps) if distilled else []),
        *(_privacy_lines(differential_privacy, base_model["method"]) if differential_privacy else []),
        "## Training", "",
        *(_frontier_lines(frontier) if frontier else []),
        f"- diffusion steps: {steps}; objective: {_saved_objective(folder)}; "
        f"autoencoder steps: {config.autoencoder.max_steps}",
        # Only a model trained here augments (a fine-tune or a student trains without it)
        *(_augment_lines(config.diffusion.augment)
          if config.diffusion.augment.probability and not (base_model or distilled) else []),
        *(["- autoencoder reconstruction on the holdout split (physical units): "
           + ", ".join(f"{k} {v:.4g}" for k, v in autoencoder_holdout.items())] if autoencoder_holdout else []),
        *(["- autoencoder reconstruction: not measured (the data has no holdout cases)"]
          if not (autoencoder_holdout or base_model or distilled) else []), "",
        "```yaml",
        yaml.safe_dump({key: config.model_dump(mode="json", by_alias=True)[key]
                        for key in ("autoencoder", "diffusion", "conditioning", "sampling")}, sort_keys=False).strip(),
        "```", "",
        "## Limitations", "",
        "Small data and many steps make copies of training images: read the privacy scores next to the realism",
        "scores before releasing samples. Phantom-trained models learn procedural shapes, not anatomy.", "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def _augment_lines(augment) -> list[str]:
    kinds = [kind for kind, on in (("axis flips", augment.flip), ("quarter turns", augment.rotate),
                                   (f"shifts up to {augment.max_shift:g} of each axis", augment.max_shift)) if on]
    return [f"- non-leaking augmentation of the training latents (EDM's): {', '.join(kinds)}, each with probability "
            f"{augment.probability:g}, the transform given to the model as a condition; samples are drawn at no "
            "transform"]


def _saved_objective(folder: Path) -> str:
    """What the saved model predicts, from its own index (a fine-tune's config may name another objective)."""
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("objective") or "n/a" if index.is_file() else "n/a"


def _frontier_lines(frontier: dict) -> list[str]:
    kept = frontier["kept"]
    if kept is None:
        choice = (f"none of the {frontier['points']} frontier points passed the gate's DCR-share and copy-rate limits, "
                  f"so the last weights (step {frontier['last_step']}) were kept; expect the release gate to refuse")
    else:
        choice = (f"the weights kept are those of step {frontier['kept_step']} (of {frontier['last_step']}): the most "
                  f"realistic of {frontier['private_points']} private points among {frontier['points']} (coverage "
                  f"{kept['coverage']:.3g}, real floor {kept['coverage_floor']:.3g}; DCR share {kept['dcr_share']:.3g}, "
                  f"limit {kept['dcr_share_limit']:.3g}; copy rate {kept['copy_rate']:.3g}, limit "
                  f"{kept['copy_rate_limit']:.3g})")
    return [f"- checkpoint chosen on the privacy-realism frontier (train/diffusion/frontier/): {choice}"]


def clipping_text(guarantee: dict) -> str:
    """How each patient's gradient was bounded (``PrivacyPlan.clipping``; guarantees from before it was a choice
    were clipped)."""
    verb = "scaled to norm" if guarantee.get("clipping") == "normalize" else "clipped to"
    return f"each patient's gradient {verb} {guarantee['max_grad_norm']:g}"


# What a private fine-tune trains (finetune.method; full is refused under privacy).
PRIVATE_ADAPTERS = {"lora": "the LoRA factors", "domain_embedding": "the domain embedding (the timestep embedding's "
                    "output bias)", "block_shifts": "the domain embedding and each residual block's shift (the "
                    "timestep projections' biases)"}


def _privacy_lines(guarantee: dict, method: str) -> list[str]:
    return ["## Differential privacy", "",
            f"Fine-tuned by DP-SGD: ({guarantee['epsilon']:.3g}, {guarantee['delta']:.3g})-differential privacy per "
            f"patient for the {guarantee['patients']} fine-tune patients (target epsilon {guarantee['target_epsilon']:g}; "
            f"{guarantee['steps_taken']} of {guarantee['steps']} planned steps; each patient sampled at "
            f"{guarantee['sample_rate']:.3g} per step, one case each; {clipping_text(guarantee)}; "
            f"noise multiplier {guarantee['noise_multiplier']:.4g}; Opacus {guarantee['accountant']} accountant).",
            f"Only {PRIVATE_ADAPTERS[method]} trained; the autoencoder, text encoder (and its vocabulary) and the rest "
            "of the UNet are the base's, which must not have been trained on these patients: the guarantee does not "
            "cover the base's own training data. The saved weights are the last step's: nothing was chosen by looking "
            "at the data. Prompts drawn at sampling from the test split's attribute values are outside the guarantee "
            "(set sampling.prompts for an end-to-end one).", ""]


def _distillation_lines(distilled: dict, steps: int) -> list[str]:
    return ["## Distillation", "",
            f"A few-step student ({distilled['method']} distillation, {steps} steps) of the trained model "
            f"{distilled['teacher_hash'][:16]}: it learnt the teacher's sampler at guidance {distilled['guidance_scale']:g} "
            f"on a {distilled['teacher_steps']}-step solver grid and samples in {distilled['steps']} steps without "
            "guidance, one network call per step. The ControlNet and mask generator are the teacher's.", ""]


def add_card_section(folder: Path, title: str, lines: list[str]) -> Path:
    """Put a ``## title`` section into the model card, replacing one of that title (figures measured later)."""
    path = folder / "README.md"
    text = path.read_text()
    heading = f"## {title}"
    if heading in text:
        before, _, after = text.partition(heading)
        rest = after.split("\n## ", 1)
        text = before + (f"## {rest[1]}" if len(rest) > 1 else "")
    path.write_text(text.rstrip("\n") + "\n\n" + "\n".join([heading, "", *lines, ""]))
    return path


def write_training_compute(folder: Path, runs: dict[str, Path], inherited: Path | None = None) -> dict:
    """What training the model in ``folder`` cost: each part's ``compute.json`` (written by its training loop in
    ``runs[part]``), and the parts of the model it was made from (``inherited``: a teacher's folder), gathered
    into ``folder/compute.json`` and the card's "Compute" section. The release divides it by the images made."""
    parts = dict((training_compute(inherited) or {}).get("parts", {})) if inherited is not None else {}
    parts |= {name: json.loads((run / COMPUTE_FILE).read_text()) for name, run in runs.items()
              if (run / COMPUTE_FILE).is_file()}
    energies = [part.get("energy_j") for part in parts.values()]
    compute = {"parts": parts, "training_seconds": round(sum(part["seconds"] for part in parts.values()), 2),
               "training_energy_j": round(sum(energies), 1) if energies and None not in energies else None}
    write_json(folder / COMPUTE_FILE, compute)
    add_card_section(folder, "Compute", [
        "| part | steps | seconds | device | energy |", "|---|---|---|---|---|",
        *[_compute_row(name, part) for name, part in parts.items()],
        "", f"Training in all: {compute['training_seconds']:.0f} s, energy {energy_text(compute['training_energy_j'])}. "
        "Energy is NVML's counter on NVIDIA GPUs; elsewhere it is not measured."])
    return compute


def _compute_row(name: str, part: dict) -> str:
    processes = part.get("processes", 1)
    device = part["device"] + (f" x {processes} processes" if processes > 1 else "")
    return f"| {name} | {part['steps']} | {part['seconds']:.0f} | {device} | {energy_text(part.get('energy_j'))} |"


def energy_text(joules: float | None) -> str:
    return "not measured" if joules is None else f"{joules / 3.6e6:.3g} kWh ({joules:.0f} J)"


def training_compute(folder: Path) -> dict | None:
    """A model folder's ``compute.json`` (``write_training_compute``), or None for a folder without one."""
    path = Path(folder) / COMPUTE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
