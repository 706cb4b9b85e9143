"""Differentially private training (DP-SGD) of a diffusion model's trained parameters, per patient.

The guarantee is user-level: the unit it protects is a patient, whatever number of cases they have. Each step
samples every patient independently with probability ``sample_rate`` (Poisson sampling, which the accountant's
amplification-by-subsampling bound assumes), takes one of each sampled patient's cases, scales that patient's
gradient to norm ``max_grad_norm`` (or, with ``clipping: clip``, only down to it) and sums; Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm`` is added to the sum, which is divided by the
expected number of patients per step. Whatever one patient's data, the noisy sum moves by at most
``max_grad_norm`` with or without them: that is the sensitivity the accountant (Opacus's RDP or PRV accountant)
composes over the steps into the spent (epsilon, delta).

Two choices change how much of the signal survives the noise, never the guarantee. A bound far above the
gradients' norms buries them (the noise is scaled to the bound, not to them); normalising makes every patient
contribute exactly the bound whatever the gradients' scale, and Adam's update does not depend on that scale.
And a diffusion loss's gradient on one case varies mostly with its random timestep and noise: averaging
``noise_multiplicity`` draws on the case before clipping keeps more of what the patients agree on (DPDM's noise
multiplicity, Dockhorn et al. 2022); it is still that one patient's gradient. Neither lifts the ceiling that the
noise sets with few patients and many trained parameters (README, "Differentially private fine-tuning").

The patients sampled and the noise come from a secret seed drawn from the operating system when a run starts and
kept in its checkpoints (never in the config or the model): a known seed would let anyone subtract the noise and
see which patients each step used. Everything else random in a step (timesteps, latent noise, condition
dropout) stays on radsynth's reproducible stream; it only enters through the clipped, noised sum.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from radsynth.configs.errors import UserInputError

from .data import step_generator
from .diffusion_trainer import DiffusionTrainer


@dataclass(frozen=True)
class PrivacyPlan:
    """The mechanism of one private run, fixed before its first step."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    sample_rate: float  # each patient's chance of being in a step
    noise_multiplier: float  # noise std over max_grad_norm
    steps: int  # the steps the noise is calibrated for
    patients: int
    accountant: str = "rdp"
    clipping: str = "normalize"  # every patient's gradient scaled to max_grad_norm; "clip": only those above it

    @property
    def expected_patients(self) -> float:
        return self.sample_rate * self.patients

    def spent(self, steps: int) -> float:
        """The epsilon spent after ``steps`` steps of this mechanism, at ``delta``."""
        return spent_epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta, self.accountant)

    def summary(self, steps_taken: int) -> dict:
        """What the model and dataset cards report: the guarantee spent, and the mechanism that spent it."""
        return {**asdict(self), "steps_taken": steps_taken, "epsilon": round(self.spent(steps_taken), 4),
                "unit": "patient"}


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Opacus's accountant over ``steps`` Poisson-subsampled Gaussian steps; 0 for no steps."""
    if steps == 0:
        return 0.0
    from opacus.accountants import create_accountant

    ledger = create_accountant(mechanism=accountant)
    ledger.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore", UserWarning)
        return float(ledger.get_epsilon(delta=delta))


def plan_privacy(target_epsilon: float, delta: float, max_grad_norm: float, patients: int, patients_per_step: int,
                 steps: int, accountant: str = "rdp", clipping: str = "normalize") -> PrivacyPlan:
    """The noise that lets ``steps`` steps spend at most ``target_epsilon``, or one line saying why none can."""
    if delta >= 1.0 / patients:
        raise UserInputError("finetune.privacy.delta", f"{delta:g} is not below 1 / {patients} patients: a mechanism "
                             "that may reveal one patient in full would meet it", f"a delta below {1.0 / patients:.2g}, "
                             "e.g. 1e-5")
    sample_rate = min(1.0, patients_per_step / patients)
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            noise = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                         steps=steps, accountant=accountant, epsilon_tolerance=0.01)
    except ValueError:  # Opacus gives up past a noise multiplier of ~1e6: no useful gradient is left
        raise UserInputError("finetune.privacy.epsilon", f"{target_epsilon:g} cannot be reached in {steps} steps "
                             f"sampling {sample_rate:.3g} of {patients} patients (the noise needed drowns every "
                             "gradient)", "a larger epsilon, or fewer finetune.max_steps") from None
    return PrivacyPlan(target_epsilon, delta, max_grad_norm, sample_rate, float(noise), steps, patients, accountant,
                       clipping)


class PatientSampler:
    """Poisson sampling of patients, one case per sampled patient: a patient with many cases counts once."""

    def __init__(self, patient_of_row: Sequence[str], sample_rate: float):
        patients = sorted(set(patient_of_row))
        self.rows_of = [np.flatnonzero(np.asarray(patient_of_row) == patient) for patient in patients]
        self.sample_rate = sample_rate

    def rows(self, rng: np.random.Generator) -> np.ndarray:
        chosen = np.flatnonzero(rng.random(len(self.rows_of)) < self.sample_rate)
        return np.asarray([rng.choice(self.rows_of[patient]) for patient in chosen], dtype=np.int64)


def patient_gradients(parameters: Sequence[torch.nn.Parameter], losses: Iterable[torch.Tensor]
                      ) -> Iterator[tuple[list[torch.Tensor], float]]:
    """Each patient's gradient of ``parameters`` and its L2 norm over all of them, one patient at a time.
    ``losses``: one per patient, built lazily so only one graph lives at a time."""
    for loss in losses:
        grads = [torch.zeros_like(p) if g is None else g
                 for p, g in zip(parameters, torch.autograd.grad(loss, parameters, allow_unused=True))]
        yield grads, torch.sqrt(sum(g.pow(2).sum() for g in grads)).item()


def clipped_gradient_sum(parameters: Sequence[torch.nn.Parameter], losses: Iterable[torch.Tensor],
                         max_grad_norm: float, normalize: bool = False) -> tuple[list[torch.Tensor], list[float]]:
    """The sum over patients of each patient's gradient, scaled down to an L2 norm of at most ``max_grad_norm``
    (over all ``parameters`` together; with ``normalize``, scaled to exactly that norm, up or down), and each
    patient's norm before clipping."""
    total = [torch.zeros_like(p) for p in parameters]
    norms = []
    for grads, norm in patient_gradients(parameters, losses):
        scale = max_grad_norm / (norm + 1e-12)
        if not normalize:
            scale = min(1.0, scale)
        for running, grad in zip(total, grads):
            running.add_(grad, alpha=scale)
        norms.append(norm)
    return total, norms


class PrivacyState:
    """The secret seed of a run's sampling and noise, saved in its checkpoints so a resumed run is exact."""

    def __init__(self) -> None:
        self.seed = secrets.randbits(63)

    def state_dict(self) -> dict:
        return {"seed": str(self.seed)}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])


class PrivateDiffusionTrainer(DiffusionTrainer):
    """``DiffusionTrainer`` whose step is DP-SGD over patients (``PrivacyPlan``); one process, no accumulation."""

    def __init__(self, *args, plan: PrivacyPlan, patient_of_row: Sequence[str], noise_multiplicity: int = 1,
                 **kwargs):
        super().__init__(*args, **kwargs)
        settings = self.loop.settings
        if self.loop.accelerator.num_processes > 1 or settings.gradient_accumulation_steps > 1:
            raise UserInputError("finetune.privacy", "runs in one process without gradient accumulation (each "
                                 "patient's clipped gradient is summed in one place)",
                                 "runtime.launch.num_processes: 1 and gradient_accumulation_steps: 1")
        if settings.max_steps > plan.steps:
            raise ValueError(f"the noise is calibrated for {plan.steps} steps, the loop would take {settings.max_steps}")
        self.plan, self.noise_multiplicity = plan, noise_multiplicity
        self.sampler = PatientSampler(patient_of_row, plan.sample_rate)
        self.secret = PrivacyState()
        self.loop.register_state("privacy", self.secret)

    def train_step(self, step: int) -> dict[str, float]:
        plan = self.plan
        spent = plan.spent(step + 1)
        if spent > plan.target_epsilon:  # cannot happen for a calibrated plan; never step past it if it did
            raise RuntimeError(f"step {step + 1} would spend epsilon {spent:.4g}, more than {plan.target_epsilon}")
        secret = np.random.default_rng([self.secret.seed, step])
        rows = self.sampler.rows(secret)
        generator = step_generator(self.seed, step)
        losses = []

        def patient_losses():
            for row in rows:
                # Several draws of timestep, noise and posterior on the one case (DPDM's noise multiplicity): their
                # mean gradient is still this patient's alone, so the sensitivity and the epsilon are unchanged.
                loss = self.loss(self.latents.batch([row] * self.noise_multiplicity, generator), generator)
                losses.append(loss.item())
                yield loss

        total, norms = clipped_gradient_sum(self.parameters, patient_losses(), plan.max_grad_norm,
                                            normalize=plan.clipping == "normalize")
        noise_stream = torch.Generator().manual_seed(int(secret.integers(2**62)))
        for parameter, summed in zip(self.parameters, total):
            noise = torch.randn(summed.shape, generator=noise_stream, dtype=summed.dtype)
            parameter.grad = (summed + noise.to(summed.device) * plan.noise_multiplier * plan.max_grad_norm
                              ) / plan.expected_patients
        self.apply_gradients()
        if self.ema is not None:
            self.ema.step(self.parameters)
        return {"loss": float(np.mean(losses)) if losses else math.nan, "patients": float(len(rows)),
                "clipped": float(np.mean([n > plan.max_grad_norm for n in norms])) if norms else 0.0,
                "epsilon": spent, "lr": self.schedule.get_last_lr()[0]}
