"""How much the patients' gradients agree in a private fine-tune: what its noise leaves of the signal.

    python benchmarks/dp_agreement.py CONFIG --base MODEL_DIR --out DIR [--steps 40] [key=value ...]

Runs ``--steps`` steps of the private fine-tune ``CONFIG finetune.from=MODEL_DIR`` (``finetune.privacy.epsilon``
must be set; a learning rate of 1e-9 keeps the adapter at the base, so every step probes the same point) and
records each sampled patient's gradient as a unit vector. Prints, with the machine: ``agreement``, the norm of the
mean unit vector over the run (1: every patient pulls the same way; ``chance``, 1 / sqrt(patient-steps): no
agreement), and ``signal_to_noise``, what a run of the config's own length and noise keeps of it:
sqrt(steps) * agreement * patients per step / (noise multiplier * sqrt(trained parameters)), the norm of the
summed normalised gradients over the norm of the summed noise.
"""

from __future__ import annotations

import json
import math

import torch
from build_scores import figure_arguments, machine


def main() -> None:
    parser = figure_arguments(__doc__)
    parser.add_argument("--steps", type=int, default=40)
    args, overrides = parser.parse_known_args()
    from radsynth.configs import load_config
    from radsynth.generators import private_training
    from radsynth.pipelines.data.ingest import ingest
    from radsynth.pipelines.finetuning import _privacy_plan, finetune, matching_cases
    from radsynth.pipelines.training import ingested_dataset

    config = load_config(args.config, [*overrides, f"finetune.from={args.base.resolve()}",
                                       f"runtime.output_dir={args.out}"])
    if not config.finetune.privacy.enabled:
        raise SystemExit("set finetune.privacy.epsilon: the agreement is of a private run's per-patient gradients")
    ingest(config, progress=False)
    records, _ = ingested_dataset(config)
    plan = _privacy_plan(config, matching_cases(records, config.finetune.filter, config.finetune.max_cases))

    units = {"sum": None, "count": 0}  # the mean unit vector is all the agreement needs: a running sum, not each one
    recorded = private_training.patient_gradients

    def recording(parameters, losses):
        for grads, norm in recorded(parameters, losses):
            unit = (torch.cat([g.flatten() for g in grads]) / (norm + 1e-12)).double()
            units["sum"] = unit if units["sum"] is None else units["sum"] + unit
            units["count"] += 1
            yield grads, norm

    private_training.patient_gradients = recording
    probe = config.model_copy(update={"finetune": config.finetune.model_copy(
        update={"max_steps": args.steps, "learning_rate": 1e-9})})
    finetune(probe, progress=False)
    if not units["count"]:
        raise SystemExit(f"no step ran: {args.out} already holds this probe's fine-tune; give a fresh --out")
    agreement = float(torch.linalg.vector_norm(units["sum"] / units["count"]))
    parameters = units["sum"].numel()
    snr = (math.sqrt(plan.steps) * agreement * plan.expected_patients / (plan.noise_multiplier * math.sqrt(parameters)))
    print(json.dumps({"method": config.finetune.method, "noise_multiplicity": config.finetune.privacy.noise_multiplicity,
                      "trained_parameters": parameters, "patient_steps": units["count"],
                      "agreement": round(agreement, 4), "chance": round(1 / math.sqrt(units["count"]), 4),
                      "steps": plan.steps,
                      "noise_multiplier": plan.noise_multiplier, "patients_per_step": plan.expected_patients,
                      "signal_to_noise": round(snr, 3), "machine": machine()}))


if __name__ == "__main__":
    main()
