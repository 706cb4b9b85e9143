"""Differentially private fine-tuning: the accountant, per-patient clipping and sampling, and the guarantee in the
model, its samples and the cards."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from radsynth.configs import UserInputError
from radsynth.generators.data import CachedLatents
from radsynth.generators.private_training import (
    PatientSampler,
    clipped_gradient_sum,
    plan_privacy,
    spent_epsilon,
)
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.finetuning import _privacy_plan, _run_key, finetune, matching_cases
from radsynth.pipelines.release.card import write_dataset_card
from radsynth.pipelines.sampling.generate import generate
from radsynth.pipelines.training import ingested_dataset, model_dir, train

from .test_training_stage import config_file, tiny_config

# Opacus's own reference values (opacus/tests/accountants_test.py): sigma 1.5, q 0.04, 90 epochs, delta 1e-5.
OPACUS_RDP_EPSILON = 7.32911117143
OPACUS_NOISE_FOR_EPSILON_8_IN_2000_STEPS = 1.3562


def test_the_accountant_gives_the_librarys_reference_values():
    assert spent_epsilon(1.5, 0.04, int(90 / 0.04), 1e-5) == pytest.approx(OPACUS_RDP_EPSILON, abs=1e-6)
    plan = plan_privacy(8.0, 1e-5, 1.0, patients=1000, patients_per_step=40, steps=2000)
    assert plan.sample_rate == pytest.approx(0.04)
    assert plan.noise_multiplier == pytest.approx(OPACUS_NOISE_FOR_EPSILON_8_IN_2000_STEPS, abs=1e-4)
    # The calibrated plan spends its budget without exceeding it, and spends nothing before its first step.
    assert 8.0 - 0.05 < plan.spent(2000) <= 8.0 and plan.spent(0) == 0.0
    assert plan.spent(1000) < plan.spent(2000)


def test_one_unsampled_gaussian_step_matches_the_closed_form():
    # No subsampling (q = 1), one step: the Gaussian mechanism's Renyi DP is alpha / (2 sigma^2) exactly, turned
    # into (epsilon, delta) by the conversion Opacus uses (Balle et al. 2020), minimised over its orders.
    sigma, delta = 2.0, 1e-5
    orders = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
    rdp = orders / (2 * sigma**2)
    closed_form = np.min(rdp + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1))
    assert spent_epsilon(sigma, 1.0, 1, delta) == pytest.approx(closed_form, rel=1e-9)


def test_each_patients_contribution_is_bounded_however_extreme_their_data():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    parameters = list(model.parameters())
    inputs = [torch.randn(3) * 0.1 for _ in range(3)] + [torch.full((3,), 1e4)]  # the last patient is extreme
    targets = [torch.zeros(1)] * 3 + [torch.full((1,), -1e6)]

    def losses(indices):
        return ((model(inputs[i]) - targets[i]).pow(2).sum() for i in indices)

    bound = 5.0
    with_extreme, norms = clipped_gradient_sum(parameters, losses(range(4)), bound)
    without, _ = clipped_gradient_sum(parameters, losses(range(3)), bound)
    assert norms[3] > 1e6 * bound  # the extreme patient's raw gradient is huge ...
    contribution = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(with_extreme, without)))
    assert contribution.item() == pytest.approx(bound, rel=1e-5)  # ... and moves the sum by exactly the bound
    # A patient below the bound is summed as it is (scaled by 1): the sum is their plain gradients'.
    small = [i for i in range(3) if norms[i] < bound]
    assert small
    plain = [torch.zeros_like(p) for p in parameters]
    for i in small:
        for running, grad in zip(plain, torch.autograd.grad(next(losses([i])), parameters)):
            running += grad
    clipped_small, _ = clipped_gradient_sum(parameters, losses(small), bound)
    for a, b in zip(clipped_small, plain):
        torch.testing.assert_close(a, b)


def test_normalised_clipping_moves_the_sum_by_exactly_the_bound_for_every_patient():
    # Automatic clipping: a patient with a tiny gradient counts as much as an extreme one, and no one more.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    parameters = list(model.parameters())
    inputs = [torch.randn(3), torch.randn(3), torch.full((3,), 1e4)]
    with torch.no_grad():  # the first patient is almost fitted already, the last far off
        targets = [model(inputs[0]) + 1e-4, model(inputs[1]) + 1.0, torch.full((1,), -1e6)]

    def losses(indices):
        return ((model(inputs[i]) - targets[i]).pow(2).sum() for i in indices)

    bound = 0.5
    everyone, norms = clipped_gradient_sum(parameters, losses(range(3)), bound, normalize=True)
    assert min(norms) < 1e-2 * bound < 1e6 * bound < max(norms)  # one far below the bound, one far above
    for left_out in range(3):
        others, _ = clipped_gradient_sum(parameters, losses([i for i in range(3) if i != left_out]), bound,
                                         normalize=True)
        contribution = torch.sqrt(sum((a - b).pow(2).sum() for a, b in zip(everyone, others)))
        assert contribution.item() == pytest.approx(bound, rel=1e-4)


def test_patients_are_poisson_sampled_and_count_once_whatever_their_number_of_cases():
    rows = ["a"] * 20 + ["b", "c", "d", "e"]  # patient a has 20 cases, the others one each
    sampler = PatientSampler(rows, sample_rate=0.25)
    rng = np.random.default_rng(0)
    draws = [sampler.rows(rng) for _ in range(4000)]
    patients = [[rows[i] for i in drawn] for drawn in draws]
    assert all(len(p) == len(set(p)) for p in patients)  # never two cases of one patient in a step
    share_a = np.mean(["a" in p for p in patients])
    share_b = np.mean(["b" in p for p in patients])
    assert abs(share_a - 0.25) < 0.03 and abs(share_b - 0.25) < 0.03  # a is no likelier for having more cases
    sizes = [len(d) for d in draws]
    assert 0 in sizes and max(sizes) >= 4  # Poisson: the batch size varies, empty steps included


def test_an_unreachable_epsilon_or_a_delta_too_large_for_the_patients_is_refused():
    with pytest.raises(UserInputError, match="finetune.privacy.epsilon: 1e-05 cannot be reached in 500 steps"):
        plan_privacy(1e-5, 1e-5, 1.0, patients=40, patients_per_step=8, steps=500)
    with pytest.raises(UserInputError, match=r"finetune.privacy.delta: 0.05 is not below 1 / 40 patients"):
        plan_privacy(4.0, 0.05, 1.0, patients=40, patients_per_step=8, steps=500)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    run = tmp_path_factory.mktemp("dp-base")
    config = tiny_config(run, "diffusion.max_steps=3", "diffusion.validate_every=100", "data.phantom.n_cases=40")
    ingest(config, progress=False)
    return train(config, progress=False)


PRIVATE = ["finetune.privacy.epsilon=8", "finetune.privacy.delta=1e-3", "finetune.max_steps=4",
           "diffusion.checkpoint_every=2", "finetune.learning_rate=0.01", "data.phantom.n_cases=40"]


def private_config(run, base, *extra):
    config = tiny_config(run, f"finetune.from={base.model_dir}", *PRIVATE, *extra)
    ingest(config, progress=False)
    return config


def test_a_private_finetune_records_its_guarantee_in_the_model_card_and_every_sample(base_model, tmp_path):
    config = private_config(tmp_path / "private", base_model)
    result = finetune(config, progress=False)
    index = json.loads((result.model_dir / "model_index.json").read_text())
    guarantee = index["differential_privacy"]
    assert guarantee["unit"] == "patient" and guarantee["steps_taken"] == 4 == result.steps
    assert 0 < guarantee["epsilon"] <= guarantee["target_epsilon"] == 8
    records, _ = ingested_dataset(config)
    subset = matching_cases(records, {}, config.finetune.max_cases)
    # The unit is the patient: fewer of them than cases, some having several.
    assert guarantee["patients"] == len({record.patient_id for record in subset}) < result.cases == len(subset)
    card = (result.model_dir / "README.md").read_text()
    assert "## Differential privacy" in card and f"({guarantee['epsilon']:.3g}, 0.001)-differential privacy" in card
    assert guarantee["clipping"] == "normalize" and "each patient's gradient scaled to norm 1;" in card
    # Only LoRA targets changed: the rest of the UNet is the base's, bit for bit.
    tuned = load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(base_model.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = {k for k in tuned if not torch.equal(tuned[k], original[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "out_proj") for k in changed)
    # Every sample says what it was drawn from; the run's secret seed is nowhere in the model.
    out = generate(config, result.model_dir, 2, tmp_path / "samples", progress=False)
    sidecars = [json.loads(path.read_text()) for path in sorted(out.sample_dir.glob("*.json"))
                if path.name != "compute.json"]
    assert sidecars and all(s["differential_privacy"]["epsilon"] == guarantee["epsilon"] for s in sidecars)
    secret = json.loads(next((tmp_path / "private").rglob("checkpoints/step-0000004/privacy.json")).read_text())["seed"]
    assert not any(secret in path.read_text(errors="ignore") for path in result.model_dir.rglob("*.json"))


def test_noise_multiplicity_draws_many_times_on_one_case_of_one_patient(base_model, tmp_path, monkeypatch):
    # What DP-SGD clips must be one patient's gradient: each loss it clips averages K draws of timestep and noise on
    # a single case, and a step takes as many such losses as it sampled patients (the guarantee rests on this).
    batches = []
    original = CachedLatents.batch

    def recording(self, indices, generator):
        batches.append([int(i) for i in indices])
        return original(self, indices, generator)

    monkeypatch.setattr(CachedLatents, "batch", recording)
    config = private_config(tmp_path / "k4", base_model, "finetune.privacy.noise_multiplicity=4",
                            "finetune.privacy.clipping=clip")
    result = finetune(config, progress=False)
    assert len(batches) >= 4  # some patients were sampled in four steps
    assert all(len(rows) == 4 and len(set(rows)) == 1 for rows in batches)
    # How the gradients were bounded is part of the mechanism the card states.
    assert json.loads((result.model_dir / "model_index.json").read_text())["differential_privacy"]["clipping"] == "clip"
    assert "each patient's gradient clipped to 1;" in (result.model_dir / "README.md").read_text()


def test_a_private_domain_embedding_moves_only_the_timestep_embedding_s_bias(base_model, tmp_path):
    config = private_config(tmp_path / "domain", base_model, "finetune.method=domain_embedding")
    result = finetune(config, progress=False)
    guarantee = json.loads((result.model_dir / "model_index.json").read_text())["differential_privacy"]
    assert 0 < guarantee["epsilon"] <= 8 and result.model_dir.name.startswith("model-finetune-domain_embedding-")
    tuned = load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(base_model.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {k for k in tuned if not torch.equal(tuned[k], original[k])} == {"net.time_embed.2.bias"}
    assert "Only the domain embedding (the timestep embedding's output bias) trained" in (
        result.model_dir / "README.md").read_text()


def test_private_block_shifts_move_only_the_timestep_embedding_and_projection_biases(base_model, tmp_path):
    config = private_config(tmp_path / "shifts", base_model, "finetune.method=block_shifts")
    result = finetune(config, progress=False)
    assert result.model_dir.name.startswith("model-finetune-block_shifts-")
    tuned = load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(base_model.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = {k for k in tuned if not torch.equal(tuned[k], original[k])}
    assert "net.time_embed.2.bias" in changed and len(changed) > 1
    assert all(k == "net.time_embed.2.bias" or k.endswith(".time_emb_proj.bias") for k in changed)
    assert "Only the domain embedding and each residual block's shift" in (result.model_dir / "README.md").read_text()


def test_a_private_run_resumes_only_under_the_sample_rate_its_noise_was_planned_for(base_model, tmp_path):
    config = private_config(tmp_path / "run", base_model)
    wider = config.model_copy(update={"diffusion": config.diffusion.model_copy(update={"batch_size": 16})})
    assert _run_key(config, "base") != _run_key(wider, "base")
    public = config.model_copy(update={"finetune": config.finetune.model_copy(
        update={"privacy": config.finetune.privacy.model_copy(update={"epsilon": None})})})
    public_wider = public.model_copy(update={"diffusion": wider.diffusion})
    assert _run_key(public, "base") == _run_key(public_wider, "base")  # a public run may continue at any batch


@pytest.mark.slow
def test_a_killed_private_finetune_resumes_with_the_same_secret_draws(base_model, tmp_path):
    straight = finetune(private_config(tmp_path / "straight", base_model), progress=False)
    resumed_config = private_config(tmp_path / "resumed", base_model)
    first = finetune(resumed_config, progress=False)
    checkpoints = sorted(tmp_path.glob("resumed/train/*/checkpoints/step-*"))
    assert [c.name for c in checkpoints][-2:] == ["step-0000002", "step-0000004"]
    shutil.rmtree(checkpoints[-1])  # killed after step 2's checkpoint
    again = finetune(resumed_config, progress=False)
    assert again.model_hash == first.model_hash  # the same patients and noise after the resume
    # Two runs draw their own secret seeds: their noise differs, so their weights do.
    assert straight.model_hash != first.model_hash


def radsynth(*args):
    return subprocess.run([sys.executable, "-m", "radsynth.flows.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_bad_privacy_settings_are_one_line_and_exit_2(base_model, tmp_path):
    run = tmp_path / "cli"
    path = config_file(tmp_path, run, f"finetune.from={base_model.model_dir}", *PRIVATE)
    cases = {"finetune.privacy.epsilon=1e-6": "finetune.privacy.epsilon: 1e-06 cannot be reached",
             "finetune.privacy.delta=0.5": "finetune.privacy.delta: 0.5 is not below 1 /",
             "finetune.method=full": "finetune.method: full fine-tuning is not offered under finetune.privacy"}
    for override, message in cases.items():
        done = radsynth("train", str(path), override, "--json")
        assert done.returncode == 2, (override, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, (override, done.stderr)
    assert not list(run.glob("model-finetune-*")) and not list(run.glob("train/model-finetune-*"))  # nothing written
    for override, key in {"finetune.privacy.epsilon=-1": "finetune.privacy.epsilon: Input should be greater than 0",
                          "finetune.privacy.epsilon=inf": "finetune.privacy.epsilon: Input should be a finite number",
                          "finetune.privacy.accountant=moments": "finetune.privacy.accountant",
                          "finetune.privacy.clipping=adaptive": "finetune.privacy.clipping",
                          "finetune.privacy.noise_multiplicity=0": "finetune.privacy.noise_multiplicity"}.items():
        with pytest.raises(UserInputError, match=key):
            tiny_config(run, override)


def test_a_base_trained_on_these_patients_is_refused(tmp_path):
    config = tiny_config(tmp_path, f"finetune.from={tmp_path / 'model'}", *PRIVATE)
    assert model_dir(config) == tmp_path / "model"
    with pytest.raises(UserInputError, match="finetune.from: is the model this config trains on these very patients"):
        _privacy_plan(config, [])


def test_the_dataset_card_shows_the_formal_guarantee_beside_the_empirical_figures(tmp_path):
    guarantee = {"epsilon": 7.93, "delta": 1e-5, "unit": "patient", "steps_taken": 400, "noise_multiplier": 1.1,
                 "sample_rate": 0.2, "max_grad_norm": 1.0, "patients": 40, "accountant": "rdp"}
    rows = [{"metric": "dcr_share", "stratum": "all", "value": 0.52, "ci_low": 0.45, "ci_high": 0.6},
            {"metric": "membership_inference_auc", "stratum": "all", "value": 0.51, "ci_low": 0.4, "ci_high": 0.62}]
    provenance = {"dataset": {"name": "x", "n_samples": 4, "modality": "xray"},
                  "generator": {"model_hash": "ab" * 32, "differential_privacy": guarantee},
                  "scorecard": {"rows": rows}}
    card = write_dataset_card(tmp_path, provenance).read_text()
    assert "Formal guarantee: (7.93, 1e-05)-differential privacy per patient for the 40 patients" in card
    assert "DCR share 0.52 (0.45 to 0.6); membership-inference AUC 0.51 (0.4 to 0.62)" in card
    provenance["generator"].pop("differential_privacy")
    assert "Formal guarantee: none" in write_dataset_card(tmp_path, provenance).read_text()
