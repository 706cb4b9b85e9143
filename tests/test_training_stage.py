"""The train stage end to end on tiny phantom models: kill and resume, 2D and 3D, save / load, generate."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from radsynth.configs import load_config
from radsynth.generators.trainer import read_metrics
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.sampling.generate import generate
from radsynth.pipelines.training import train

TINY_2D = ["data.phantom.n_cases=24", "data.phantom.size=64", "data.preprocess.target_shape=[32,32]",
           "autoencoder.channels=[8,16,16]", "autoencoder.norm_num_groups=8", "autoencoder.max_steps=4",
           "autoencoder.batch_size=4", "diffusion.channels=[16,32,32]", "diffusion.norm_num_groups=8",
           "diffusion.num_head_channels=8", "diffusion.batch_size=4", "diffusion.log_every=1",
           "diffusion.warmup_steps=2", "conditioning.embed_dim=32", "sampling.num_inference_steps=5",
           "sampling.batch_size=4", "data.split.stratify_by=null"]


def tiny_config(run_dir, *extra):
    return load_config("demo", [*TINY_2D, f"runtime.output_dir={run_dir}", *extra])


def config_file(tmp_path, run_dir, *extra):
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(json.dumps(tiny_config(run_dir, *extra).model_dump(mode="json", by_alias=True)))
    return path


STEPS = ["diffusion.max_steps=16", "diffusion.checkpoint_every=4", "diffusion.validate_every=100"]


def test_training_killed_mid_run_resumes_and_continues_the_same_loss_curve(tmp_path):
    straight_dir = tmp_path / "straight"
    config = tiny_config(straight_dir, *STEPS)
    ingest(config, progress=False)
    train(config, progress=False)
    straight = read_metrics(straight_dir / "train" / "diffusion" / "metrics.csv", "loss")

    killed_dir = tmp_path / "killed"
    path = config_file(tmp_path, killed_dir, *STEPS, "diffusion.checkpoint_every=4")
    process = subprocess.Popen([sys.executable, "-m", "radsynth.flows.cli", "train", str(path), "--json"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed_dir / "train" / "diffusion" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints / "step-0000008").is_dir() and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed: make it longer"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "model").exists()

    result = train(tiny_config(killed_dir, *STEPS), progress=False)
    assert 8 <= result.resumed_from < 16 and result.diffusion_steps == 16
    resumed = read_metrics(killed_dir / "train" / "diffusion" / "metrics.csv", "loss")
    assert sorted(resumed) == list(range(1, 17))
    np.testing.assert_allclose([resumed[s] for s in range(1, 17)], [straight[s] for s in range(1, 17)], rtol=1e-5)


def test_3d_training_and_generation_write_nifti_with_the_training_grid(tmp_path):
    config = load_config("demo", [
        "data.phantom.kind=ct_torso", "data.phantom.n_cases=12", "data.phantom.shape=[32,32,32]",
        "data.preprocess.target_shape=[32,32,32]", "autoencoder.channels=[8,16,16]", "autoencoder.norm_num_groups=8",
        "autoencoder.max_steps=2", "autoencoder.batch_size=2", "diffusion.channels=[16,32,32]",
        "diffusion.norm_num_groups=8", "diffusion.num_head_channels=8", "diffusion.batch_size=2",
        "diffusion.max_steps=2", "diffusion.validate_every=2", "conditioning.embed_dim=32",
        "conditioning.attributes=[finding]", "sampling.num_inference_steps=5", "sampling.batch_size=2",
        "data.split.stratify_by=null", f"runtime.output_dir={tmp_path}"])
    ingest(config, progress=False)
    result = train(config, progress=False)
    assert (result.model_dir / "unet" / "config.json").is_file()
    assert json.loads((result.model_dir / "unet" / "config.json").read_text())["use_spacing"] is True
    assert (tmp_path / "train" / "diffusion" / "samples" / "step-0000002.png").is_file()
    out = generate(config, result.model_dir, 2, tmp_path / "samples", progress=False)
    assert out.model_hash == result.model_hash and len(out.written) == 2

    import nibabel as nib

    image = nib.load(tmp_path / "samples" / "syn_000000.nii.gz")
    assert image.shape == (32, 32, 32)
    np.testing.assert_allclose(np.linalg.norm(image.affine[:3, :3], axis=0), [350 / 32] * 3, rtol=1e-6)
    assert -1000.5 <= float(np.asarray(image.dataobj).min()) and float(np.asarray(image.dataobj).max()) <= 1000.5
    assert b"synthetic" in image.header["descrip"].tobytes()


def test_model_card_and_folder_carry_no_patient_or_case_identifiers(tmp_path):
    config = tiny_config(tmp_path, "diffusion.max_steps=2", "diffusion.validate_every=100")
    ingest(config, progress=False)
    result = train(config, progress=False)
    card = (result.model_dir / "README.md").read_text()
    assert "cases: 24" in card and "train:" in card and "CC0-1.0" in card
    from radsynth.pipelines.data.manifest import read_manifest

    records = read_manifest(tmp_path / "data" / "manifest.jsonl")
    text = "".join(p.read_text(errors="ignore") for p in result.model_dir.rglob("*") if p.suffix in (".json", ".md"))
    assert not any(record.patient_id in text or record.case_id in text for record in records)
    assert not list(result.model_dir.rglob("*.bin")) and not list(result.model_dir.rglob("*.pkl"))
    # What training cost, per part, in the folder and on the card
    compute = json.loads((result.model_dir / "compute.json").read_text())
    assert {name: part["steps"] for name, part in compute["parts"].items()} == {"autoencoder": 4, "diffusion": 2}
    assert compute["training_seconds"] == pytest.approx(sum(p["seconds"] for p in compute["parts"].values()), abs=0.02)
    assert compute["training_seconds"] > 0 and compute["training_energy_j"] is None  # no NVIDIA counter on a CPU
    assert "## Compute" in card and "| diffusion | 2 |" in card and "energy not measured" in card


@pytest.mark.parametrize("objective, scheduler", [("epsilon", "ddim"), ("rectified_flow", "flow_match_euler")])
def test_every_objective_trains_and_samples(tmp_path, objective, scheduler):
    config = tiny_config(tmp_path, f"diffusion.objective={objective}", f"sampling.scheduler={scheduler}",
                         "diffusion.max_steps=3", "diffusion.validate_every=3")
    ingest(config, progress=False)
    result = train(config, progress=False)
    out = generate(config, result.model_dir, 2, tmp_path / "samples", progress=False)
    assert len(out.written) == 2 and np.isfinite(out.latent_std)


def test_the_objective_is_saved_with_the_model_and_a_config_naming_another_does_not_change_sampling(tmp_path):
    from radsynth.configs import UserInputError
    from radsynth.pipelines.sampling.generate import load_pipeline

    config = tiny_config(tmp_path, "diffusion.objective=v_prediction", "diffusion.max_steps=3",
                         "diffusion.validate_every=3")
    ingest(config, progress=False)
    model = train(config, progress=False).model_dir
    assert json.loads((model / "model_index.json").read_text())["objective"] == "v_prediction"
    right = generate(config, model, 2, tmp_path / "right", progress=False)
    # A later run whose config trains epsilon models samples this v-prediction model as v-prediction all the same.
    other = tiny_config(tmp_path, "diffusion.objective=epsilon", "diffusion.max_steps=3")
    pipeline = load_pipeline(model, other)
    assert pipeline.config.objective == "v_prediction" and pipeline.scheduler.config.prediction_type == "v_prediction"
    wrong_config = generate(other, model, 2, tmp_path / "other", progress=False)
    for name in right.written:
        assert (tmp_path / "right" / f"{name}.png").read_bytes() == (tmp_path / "other" / f"{name}.png").read_bytes()
    # The sampler must suit the saved objective, whatever diffusion.objective says.
    flow_sampler = tiny_config(tmp_path, "diffusion.objective=rectified_flow", "sampling.scheduler=flow_match_euler")
    with pytest.raises(UserInputError, match="sampling.scheduler: 'flow_match_euler' cannot sample a model trained "
                                             "with objective 'v_prediction'"):
        load_pipeline(model, flow_sampler)
    assert wrong_config.written == right.written


def test_class_embeddings_train_save_and_follow_the_prompted_attribute(tmp_path):
    import torch

    from radsynth.pipelines.sampling.generate import load_pipeline

    config = tiny_config(tmp_path, "conditioning.class_attribute=finding", "diffusion.max_steps=3",
                         "diffusion.validate_every=3")
    ingest(config, progress=False)
    result = train(config, progress=False)
    pipeline = load_pipeline(result.model_dir, config)
    names = list(pipeline.config.class_names)
    assert pipeline.config.class_attribute == "finding" and "none" in names
    assert pipeline.unet.config.num_class_embeds == len(names) + 1
    diffusion = pipeline.diffusion()
    prompts = [f"finding: {names[-1]}; view: PA. film", "view: AP. film", "finding: unicorn; sex: F."]
    condition = diffusion.condition(prompts)  # read from the prompts' attribute headers
    assert condition.class_labels.tolist() == [len(names), 0, 0]  # unknown or absent -> 0, the null class
    assert diffusion.unconditional(condition).class_labels.tolist() == [0, 0, 0]
    # Attribute values as data win over the text: the class comes from the conditions given.
    given = diffusion.condition(prompts, conditions=[{"finding": names[1]}, {"finding": names[-1]}, {}])
    assert given.class_labels.tolist() == [2, len(names), 0]
    # The embedding is used: with the text fixed, another class changes the prediction.
    unet = pipeline.unet
    x, context = torch.randn(1, 4, 8, 8), pipeline.text_encoder.encode(["view: PA."])
    with torch.no_grad():
        unet.net.class_embedding.weight.normal_()
        first = unet(x, torch.tensor([500]), context, class_labels=torch.tensor([1]))
        second = unet(x, torch.tensor([500]), context, class_labels=torch.tensor([2]))
    assert not torch.allclose(first, second)
    assert len(generate(config, result.model_dir, 2, tmp_path / "samples", progress=False).written) == 2


def test_bf16_mixed_precision_with_gradient_accumulation_trains_and_resumes(tmp_path):
    config = tiny_config(tmp_path, "runtime.precision=bf16", "diffusion.gradient_accumulation_steps=2",
                         "diffusion.max_steps=4", "diffusion.checkpoint_every=2", "diffusion.validate_every=100")
    ingest(config, progress=False)
    first = train(config, progress=False)
    losses = read_metrics(tmp_path / "train" / "diffusion" / "metrics.csv", "loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    longer = train(tiny_config(tmp_path, "runtime.precision=bf16", "diffusion.gradient_accumulation_steps=2",
                               "diffusion.max_steps=6", "diffusion.checkpoint_every=2", "diffusion.validate_every=100"),
                   progress=False)
    assert first.diffusion_steps == 4 and longer.resumed_from == 4 and longer.diffusion_steps == 6


def test_a_training_part_starts_over_when_what_it_was_trained_from_changes(tmp_path):
    from radsynth.pipelines.training import part_fingerprint, start_over_if_changed

    base = tiny_config(tmp_path)
    stamp = part_fingerprint(base, "diffusion", upstream="autoencoder-a", also=("conditioning",))
    # How long a run goes and how often it logs, checkpoints or validates does not change what it learns so far:
    # it keeps resuming.
    bookkeeping = tiny_config(tmp_path, "diffusion.checkpoint_every=7", "diffusion.log_every=3",
                              "diffusion.max_steps=9")
    assert part_fingerprint(bookkeeping, "diffusion", upstream="autoencoder-a", also=("conditioning",)) == stamp
    changed = [part_fingerprint(tiny_config(tmp_path, "diffusion.learning_rate=1e-3"), "diffusion", "autoencoder-a",
                                also=("conditioning",)),
               part_fingerprint(base, "diffusion", upstream="autoencoder-b", also=("conditioning",)),
               part_fingerprint(tiny_config(tmp_path, "conditioning.attributes=[finding]"), "diffusion",
                                "autoencoder-a", also=("conditioning",)),
               part_fingerprint(tiny_config(tmp_path, "runtime.seed=1"), "diffusion", "autoencoder-a",
                                also=("conditioning",))]
    assert stamp not in changed and len(set(changed)) == len(changed)

    # A release that adds a setting, at its default, keeps the training; the setting changed from it does not.
    class WithNewSetting(type(base.diffusion)):
        new_setting: int = 3

    def with_new_setting(value: int) -> str:
        diffusion = WithNewSetting(**base.diffusion.model_dump(), new_setting=value)
        return part_fingerprint(base.model_copy(update={"diffusion": diffusion}), "diffusion", "autoencoder-a",
                                also=("conditioning",))

    assert with_new_setting(3) == stamp and with_new_setting(4) != stamp

    # "auto" precision trains, and is stamped, as what it resolved to here: the same training as naming that one.
    from radsynth.pipelines.training import loop_settings, training_precision

    auto = tiny_config(tmp_path, "runtime.precision=auto")
    resolved = training_precision(auto)
    assert resolved in ("no", "bf16") and loop_settings(auto, progress=False).mixed_precision == resolved
    assert part_fingerprint(tiny_config(tmp_path, "runtime.precision=auto"), "diffusion", "autoencoder-a",
                            also=("conditioning",)) == part_fingerprint(
        tiny_config(tmp_path, f"runtime.precision=\"{resolved}\""), "diffusion", "autoencoder-a", also=("conditioning",))

    folder = tmp_path / "diffusion"
    (folder / "checkpoints").mkdir(parents=True)
    start_over_if_changed(folder, stamp)  # a folder from before stamps is adopted, not deleted
    assert (folder / "checkpoints").is_dir()
    start_over_if_changed(folder, stamp)
    assert (folder / "checkpoints").is_dir()
    start_over_if_changed(folder, changed[0])
    assert not (folder / "checkpoints").exists()
    assert json.loads((folder / "fingerprint.json").read_text())["fingerprint"] == changed[0]


def test_masks_train_a_controlnet_beside_the_unchanged_base_model(tmp_path):
    from radsynth.configs import UserInputError
    from radsynth.generators.controlnet import RadsynthControlNet
    from radsynth.generators.data import CachedImages, ConditioningSpec
    from radsynth.pipelines.training import ingested_dataset

    base_only = tiny_config(tmp_path, "diffusion.max_steps=4")
    ingest(base_only, progress=False)
    first = train(base_only, progress=False)
    with_masks = tiny_config(tmp_path, "diffusion.max_steps=4", "conditioning.use_masks=true",
                             "controlnet.max_steps=3", "controlnet.batch_size=4", "controlnet.validate_every=2",
                             "controlnet.validation_cases=3", "controlnet.segmenter_steps=5")
    second = train(with_masks, progress=False)
    # Turning masks on trains a ControlNet; the base model is not retrained and its weights are the same.
    assert second.resumed_from == 4 and second.model_hash == first.model_hash
    metrics = tmp_path / "train" / "mask_controlnet" / "metrics.csv"
    assert sorted(read_metrics(metrics, "loss")) == [1, 2, 3]
    # Validation at step 2 and at the end logs the segmenter's Dice on generated images and on real ones.
    assert sorted(read_metrics(metrics, "dice/right_lung", kind="validation")) == [2, 3]
    ceiling = read_metrics(metrics, "dice_real/right_lung", kind="validation")
    assert ceiling[2] == ceiling[3] and 0 <= read_metrics(metrics, "dice_mean", kind="validation")[3] <= 1
    controlnet = RadsynthControlNet.from_pretrained(tmp_path / "model" / "mask_controlnet")
    records, _ = ingested_dataset(with_masks)
    vocabulary = records[0].label_names
    assert controlnet.config.num_labels == max(vocabulary) + 1 and len(vocabulary) > 2
    parts = json.loads((tmp_path / "model" / "compute.json").read_text())["parts"]
    assert {name: part["steps"] for name, part in parts.items()} == {"autoencoder": 4, "diffusion": 4,
                                                                      "mask_controlnet": 3}
    # The base pipeline's index leaves it out (an optional component); mask tasks load it beside the base.
    assert json.loads((tmp_path / "model" / "model_index.json").read_text())["mask_controlnet"] == [None, None]

    # A changed ControlNet setting retrains the ControlNet only.
    retuned = train(tiny_config(tmp_path, "diffusion.max_steps=4", "conditioning.use_masks=true",
                                "controlnet.max_steps=3", "controlnet.batch_size=4", "controlnet.learning_rate=1e-3",
                                "controlnet.validate_every=null"),
                    progress=False)
    assert retuned.resumed_from == 4 and retuned.model_hash == first.model_hash
    retrained = RadsynthControlNet.from_pretrained(tmp_path / "model" / "mask_controlnet")
    assert any(not np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(controlnet.state_dict().values(), retrained.state_dict().values()))

    # Cases without label maps cannot condition a ControlNet: one line saying so.
    _, summary = ingested_dataset(with_masks)
    unlabelled = [record.model_copy(update={"label": None}) for record in records[:3]]
    with pytest.raises(UserInputError, match="3 of 3 training cases have no label map"):
        CachedImages(unlabelled, summary["cache"], ConditioningSpec()).label_maps()
