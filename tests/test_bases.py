"""Pretrained bases from a local path: a Stable-Diffusion-family folder written with diffusers' and transformers'
own classes (tiny random weights, RoentGen's layout) is detected, wrapped, fine-tuned, sampled and saved as a
self-contained radsynth model; what cannot work is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radsynth.configs import UserInputError
from radsynth.flows.cli import main
from radsynth.generators.stable_diffusion import StableDiffusionAutoencoder, StableDiffusionUNet
from radsynth.pipelines.bases import base_format, check_compatible
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.finetuning import finetune
from radsynth.pipelines.sampling.generate import generate, load_pipeline

from .test_training_stage import config_file, tiny_config

# Stable Diffusion 1.x's schedule: what a fine-tune of it must keep (radsynth's own is 0.0015 to 0.0195).
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
WORDS = ["finding", "none", "nodule", "effusion", "chest", "view", "pa", "ap", "normal", "lung"]


def write_clip_tokenizer(folder):
    """A real CLIPTokenizer over a tiny byte-pair vocabulary: every letter, alone and word-final, and the words."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.:;-,")
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(f"{c}</w>" for c in letters)]
    merges = []
    for word in WORDS:  # merge left to right, so each listed word becomes one token
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            final = "</w>" if end == len(word) else ""
            merges.append(f"{left} {right}{final}")
            tokens.append(word[:end] + final)
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    """A Stable-Diffusion-family folder saved by StableDiffusionPipeline itself (safety checker left out)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("sd-base") / "roentgen-like"
    vocab_size = write_clip_tokenizer(folder.parent / "tokenizer-source")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=16, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, scheduler=scheduler,
        tokenizer=CLIPTokenizer.from_pretrained(folder.parent / "tokenizer-source"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def tuned(sd_base, tmp_path_factory):
    run = tmp_path_factory.mktemp("tuned")
    config = tiny_config(run, f"finetune.from={sd_base}", "finetune.max_steps=3", "finetune.learning_rate=0.01",
                         "finetune.max_cases=8")
    ingest(config, progress=False)
    return config, finetune(config, progress=False)


def test_a_stable_diffusion_folder_is_recognised_and_a_radsynth_folder_too(sd_base, tuned):
    config, result = tuned
    assert base_format(sd_base) == "diffusers"
    assert base_format(result.model_dir) == "radsynth"


def test_the_wrappers_compute_what_the_diffusers_models_compute(sd_base):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(sd_base / "unet").eval()
    vae = AutoencoderKL.from_pretrained(sd_base / "vae").eval()
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32)
    with torch.no_grad():
        expected = unet(x, torch.tensor([3, 700]), context).sample
        grey = torch.rand(2, 1, 32, 32) * 2 - 1
        mean = vae.encode(grey.expand(-1, 3, -1, -1)).latent_dist.mean * vae.config.scaling_factor
        decoded = vae.decode(mean / vae.config.scaling_factor).sample.mean(dim=1, keepdim=True)
        wrapped_unet = StableDiffusionUNet.from_diffusers(unet)
        wrapped_vae = StableDiffusionAutoencoder.from_diffusers(vae)
        torch.testing.assert_close(wrapped_unet(x, torch.tensor([3, 700]), encoder_hidden_states=context), expected)
        torch.testing.assert_close(wrapped_vae.encode(grey), mean)
        torch.testing.assert_close(wrapped_vae.decode(mean), decoded)
    assert wrapped_vae.decode(mean).shape == (2, 1, 32, 32) and wrapped_vae.downsample_factor == 2
    with pytest.raises(ValueError, match="grey 2D"):
        wrapped_vae.encode(torch.zeros(1, 3, 32, 32))


def test_a_fine_tune_of_a_stable_diffusion_base_keeps_its_schedule_and_changes_only_lora_targets(sd_base, tuned,
                                                                                                 tmp_path):
    config, result = tuned
    assert 1 <= result.cases <= 8 and result.steps == 3
    loaded = load_pipeline(result.model_dir, config, progress=False)
    assert isinstance(loaded.unet, StableDiffusionUNet) and isinstance(loaded.vae, StableDiffusionAutoencoder)
    assert loaded.config.objective == "epsilon" and loaded.config.noise_schedule == SD_SCHEDULE
    from diffusers import PNDMScheduler

    torch.testing.assert_close(loaded.objective.noise_scheduler.alphas_cumprod,
                               PNDMScheduler.from_pretrained(sd_base / "scheduler").alphas_cumprod)
    assert loaded.scheduler.config.beta_start == SD_SCHEDULE["beta_start"]
    assert loaded.config.image_shape == (32, 32) and loaded.config.modality == "xray"
    # LoRA on the attention projections only, merged: the other weights are the base's, bit for bit.
    tuned_unet = load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    base_unet = load_file(str(sd_base / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {key.removeprefix("net.") for key in tuned_unet} == set(base_unet)
    changed = {key for key in base_unet if not torch.equal(tuned_unet[f"net.{key}"], base_unet[key])}
    assert changed and all(key.split(".")[-2] in ("to_q", "to_k", "to_v", "0") for key in changed)
    assert all(".to_out.0." in key for key in changed if key.split(".")[-2] == "0")
    # The text encoder is bundled, its tokenizer with it: the folder is the whole model.
    bundle = result.model_dir / "text_encoder" / "hf_encoder"
    assert {"config.json", "tokenizer.json"} <= {path.name for path in bundle.iterdir()}
    card = (result.model_dir / "README.md").read_text()
    assert "from the diffusers base model" in card and str(sd_base) not in card
    out = generate(config, result.model_dir, 2, tmp_path / "samples", progress=False)
    assert out.model_hash == result.model_hash and len(out.written) == 2


def test_what_a_stable_diffusion_base_cannot_take_is_refused(sd_base, tmp_path):
    run = tmp_path / "run"
    config = tiny_config(run, f"finetune.from={sd_base}", "data.preprocess.target_shape=[30,30]")
    ingest(config, progress=False)
    with pytest.raises(UserInputError, match=r"multiple of 4, e\.g\. \[32, 32\]"):
        finetune(config, progress=False)
    with pytest.raises(UserInputError, match="finetune.base_format"):
        finetune(tiny_config(run, f"finetune.from={sd_base}", "finetune.base_format=radsynth"), progress=False)
    schedule = json.loads((sd_base / "scheduler" / "scheduler_config.json").read_text())
    broken = tmp_path / "sample-predicting"
    shutil.copytree(sd_base, broken)
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps({**schedule, "prediction_type": "sample"}))
    with pytest.raises(UserInputError, match="prediction_type 'sample'"):
        finetune(tiny_config(run, f"finetune.from={broken}", "data.preprocess.target_shape=[30,30]"), progress=False)


def test_folders_that_are_no_base_are_named_as_such(tmp_path, sd_base):
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    (tmp_path / "bundle" / "models").mkdir()
    with pytest.raises(UserInputError, match="no JSON with autoencoder_def and diffusion_unet_def"):
        base_format(tmp_path / "bundle")
    with pytest.raises(UserInputError, match="no model_index.json"):
        base_format(tmp_path)
    index = json.loads((sd_base / "model_index.json").read_text())
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "model_index.json").write_text(json.dumps({**index, "vae": [None, None]}))
    with pytest.raises(UserInputError, match="without the Stable-Diffusion-family components vae"):
        base_format(tmp_path / "partial")


def test_the_cli_refuses_a_base_it_cannot_use_in_one_line(tmp_path, capsys):
    (tmp_path / "not-a-model").mkdir()
    path = config_file(tmp_path, tmp_path / "run", f"finetune.from={tmp_path / 'not-a-model'}")
    assert main(["ingest", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("radsynth: error:") and "no model_index.json" in lines[-1]
    assert not list((tmp_path / "run").glob("model-*"))


# ---------------------------------------------------------------- a radsynth base against the local data

BASE = {"modality": "ct", "image_shape": (32, 32, 16), "spacing": (1.5, 1.5, 3.0), "intensity_low": -1000.0,
        "intensity_high": 1000.0, "class_attribute": "finding", "class_names": ("lesion", "none")}
LOCAL = {"modality": "ct", "spatial_dims": 3, "image_shape": (32, 32, 16), "spacing": (1.6, 1.5, 3.0),
         "intensity_low": -1000.0, "intensity_high": 1000.0}


def test_data_the_base_was_trained_like_is_accepted():
    check_compatible(BASE, LOCAL, {"lesion"})
    check_compatible({**BASE, "class_attribute": None, "class_names": ()}, LOCAL, {"anything"})
    check_compatible({**BASE, "modality": "mri"}, {**LOCAL, "modality": "mri", "intensity_high": 812.0}, set())


@pytest.mark.parametrize(("change", "key", "message"), [
    ({"modality": "mri"}, "finetune.from", "the base generates ct and the data is mri"),
    ({"image_shape": (64, 64, 16)}, "data.preprocess.target_shape", "the base's grid: [32, 32, 16]"),
    ({"spacing": (1.5, 1.5, 4.5)}, "data.preprocess.target_spacing", "field of view of 72 mm on axis 2"),
    ({"intensity_low": -200.0, "intensity_high": 400.0}, "data.preprocess.intensity.ct_window", "[-1000, 1000]"),
])
def test_data_off_the_bases_grid_field_of_view_window_or_modality_is_refused(change, key, message):
    with pytest.raises(UserInputError) as error:
        check_compatible(BASE, {**LOCAL, **change}, set())
    assert str(error.value).startswith(key) and message in str(error.value)


def test_a_class_the_base_never_saw_is_refused():
    with pytest.raises(UserInputError, match=r"finding values \['cyst'\] are not among the base's classes"):
        check_compatible(BASE, LOCAL, {"lesion", "cyst"})


def test_a_fine_tune_on_another_grid_is_refused_before_training(tmp_path):
    from radsynth.pipelines.training import train

    base_run, run = tmp_path / "base", tmp_path / "local"
    base_config = tiny_config(base_run, "diffusion.max_steps=1", "diffusion.validate_every=100")
    ingest(base_config, progress=False)
    base = train(base_config, progress=False)
    config = tiny_config(run, f"finetune.from={base.model_dir}", "data.preprocess.target_shape=[16,16]")
    ingest(config, progress=False)
    with pytest.raises(UserInputError, match=r"target_shape: \[16, 16\], but the base samples \[32, 32\]"):
        finetune(config, progress=False)
    assert not list(run.glob("model-*")) and not (run / "train").exists()


# ---------------------------------------------------------------- MONAI MAISI bundles

TINY_3D = ["data.phantom.n_cases=10", "data.phantom.shape=[32,32,32]", "data.preprocess.target_shape=[32,32,32]",
           "data.split.stratify_by=null", "autoencoder.batch_size=2", "diffusion.batch_size=2",
           "finetune.max_cases=4", "finetune.max_steps=2", "finetune.learning_rate=0.01",
           "finetune.maisi.body_region=[chest,abdomen]", "sampling.num_inference_steps=3", "sampling.batch_size=2",
           # The tiny phantoms' 11 mm voxels are far off MAISI's published spacings; these bundles are not MAISI's.
           "finetune.maisi.trained_spacing_mm=null"]


# A few entries of MAISI's label_dict.json, at MAISI's indices ("dummyN": an index MAISI leaves unused).
MAISI_LABELS = {"liver": 1, "dummy1": 2, "spleen": 3, "pancreas": 4, "right kidney": 5, "left kidney": 14,
                "dummy2": 16, "lung tumor": 23, "hepatic tumor": 26, "right lung upper lobe": 30}
TINY_CONTROLNET = {
    "_target_": "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
    "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "num_channels": [8, 16],
    "attention_levels": [False, True], "num_head_channels": [0, 8], "num_res_blocks": 1, "norm_num_groups": 8,
    "use_checkpointing": False, "conditioning_embedding_in_channels": 8, "conditioning_embedding_num_channels": [8, 16]}


def write_maisi_bundle(folder, scheduler: str, seed: int = 0, controlnet: bool = False):
    """A bundle as MAISI ships one: networks defined in JSON with @references, weights as torch.save'd dicts
    under models/ (the UNet's with its latent scale), written from MONAI's own MAISI classes; with ``controlnet``
    its ControlNet too (definition, weights, label_dict.json)."""
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    schedulers = {
        "rflow": {"_target_": "monai.networks.schedulers.rectified_flow.RFlowScheduler", "num_train_timesteps": 1000,
                  "use_discrete_timesteps": False, "use_timestep_transform": True, "sample_method": "uniform"},
        "ddpm": {"_target_": "monai.networks.schedulers.ddpm.DDPMScheduler", "num_train_timesteps": 1000,
                 "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta", "clip_sample": False},
    }
    network = {
        "spatial_dims": 3, "image_channels": 1, "latent_channels": 4, "include_body_region": True,
        "autoencoder_def": {
            "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
            "spatial_dims": "@spatial_dims", "in_channels": "@image_channels", "out_channels": "@image_channels",
            "latent_channels": "@latent_channels", "num_channels": [8, 16], "num_res_blocks": [1, 1],
            "norm_num_groups": 8, "norm_eps": 1e-6, "attention_levels": [False, False],
            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "use_checkpointing": False,
            "use_convtranspose": False, "norm_float16": False, "num_splits": 1, "dim_split": 1},
        "diffusion_unet_def": {
            "_target_": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
            "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "out_channels": "@latent_channels",
            "num_channels": [8, 16], "attention_levels": [False, True], "num_head_channels": [0, 8],
            "num_res_blocks": 1, "norm_num_groups": 8, "include_top_region_index_input": "@include_body_region",
            "include_bottom_region_index_input": "@include_body_region", "include_spacing_input": True},
        "noise_scheduler": schedulers[scheduler],
    }
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "config_network.json").write_text(json.dumps(network, indent=2))
    torch.manual_seed(seed)
    resolved = {key: network[value[1:]] if isinstance(value, str) and value.startswith("@") else value
                for key, value in network["autoencoder_def"].items() if key != "_target_"}
    torch.save(AutoencoderKlMaisi(**resolved).state_dict(), folder / "models" / "autoencoder_epoch273.pt")
    resolved = {key: network[value[1:]] if isinstance(value, str) and value.startswith("@") else value
                for key, value in network["diffusion_unet_def"].items() if key != "_target_"}
    unet = DiffusionModelUNetMaisi(**resolved)
    with torch.no_grad():  # MONAI zero-initialises the output layer: randomise it, so the UNet's output is seen
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(0.8)},
               folder / "models" / f"diff_unet_3d_{scheduler}.pt")
    if controlnet:
        network["controlnet_def"] = TINY_CONTROLNET
        (folder / "configs" / "config_network.json").write_text(json.dumps(network, indent=2))
        (folder / "configs" / "label_dict.json").write_text(json.dumps(MAISI_LABELS, indent=4))
        resolved = {key: network[value[1:]] if isinstance(value, str) and value.startswith("@") else value
                    for key, value in TINY_CONTROLNET.items() if key != "_target_"}
        net = ControlNetMaisi(**resolved)
        with torch.no_grad():  # a trained ControlNet's zero convolutions are not zero any more
            for parameter in net.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        torch.save({"epoch": 1, "controlnet_state_dict": net.state_dict()},
                   folder / "models" / f"controlnet_3d_{scheduler}.pt")
    return folder


@pytest.mark.parametrize("scheduler", ["rflow", "ddpm"])
def test_a_maisi_bundle_is_fine_tuned_sampled_and_saved_as_a_radsynth_model(tmp_path, scheduler):
    from radsynth.configs import load_config
    from radsynth.generators.maisi import MaisiAutoencoder, MaisiUNet

    bundle = write_maisi_bundle(tmp_path / "maisi", scheduler)
    assert base_format(bundle) == "maisi"
    config = load_config("demo-3d", [*TINY_3D, f"runtime.output_dir={tmp_path / 'run'}", f"finetune.from={bundle}",
                                     *(["sampling.scheduler=flow_match_euler"] if scheduler == "rflow" else [])])
    ingest(config, progress=False)
    result = finetune(config, progress=False)
    loaded = load_pipeline(result.model_dir, config, progress=False)
    assert isinstance(loaded.unet, MaisiUNet) and isinstance(loaded.vae, MaisiAutoencoder)
    assert loaded.vae.scaling_factor == pytest.approx(0.8) and loaded.config.modality == "ct"
    assert loaded.config.objective == ("rectified_flow" if scheduler == "rflow" else "epsilon")
    assert loaded.unet.config.negate_output == (scheduler == "rflow")
    if scheduler == "ddpm":  # MAISI v1's schedule is radsynth's own, stated explicitly
        assert loaded.config.noise_schedule == {"beta_schedule": "scaled_linear", "beta_start": 0.0015,
                                                "beta_end": 0.0195}
    tuned = load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    base = torch.load(bundle / "models" / f"diff_unet_3d_{scheduler}.pt", weights_only=True)["unet_state_dict"]
    changed = {key for key in base if not torch.equal(tuned[f"net.{key}"], base[key])}
    assert changed and all(key.split(".")[-2] in ("to_q", "to_k", "to_v", "out_proj") for key in changed)
    out = generate(config, result.model_dir, 2, tmp_path / "samples", progress=False)
    assert out.model_hash == result.model_hash and len(out.written) == 2


def test_the_maisi_unet_is_called_with_maisi_s_own_inputs_and_its_velocity_sign():
    """Spacing and body regions reach MONAI's UNet scaled by 100, as MAISI's inference scripts give them, and a
    rectified-flow UNet's output (clean - noise in MONAI) is negated into radsynth's velocity (noise - clean)."""
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    from radsynth.generators.maisi import MaisiUNet

    arguments = {"spatial_dims": 3, "in_channels": 4, "out_channels": 4, "num_channels": [8, 16],
                 "attention_levels": [False, True], "num_head_channels": [0, 8], "num_res_blocks": 1,
                 "norm_num_groups": 8, "include_top_region_index_input": True,
                 "include_bottom_region_index_input": True, "include_spacing_input": True}
    torch.manual_seed(0)
    wrapped = MaisiUNet(arguments, negate_output=True, top_region="chest", bottom_region="abdomen").eval()
    with torch.no_grad():
        for parameter in wrapped.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference = DiffusionModelUNetMaisi(**arguments).eval()
    reference.load_state_dict(wrapped.net.state_dict())
    x, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([250.0, 750.0])
    with torch.no_grad():
        expected = reference(x, t, top_region_index_tensor=torch.tensor([[0.0, 100, 0, 0]] * 2),
                             bottom_region_index_tensor=torch.tensor([[0.0, 0, 100, 0]] * 2),
                             spacing_tensor=torch.tensor([[150.0, 150.0, 300.0]] * 2))
        output = wrapped(x, t, torch.zeros(2, 1, 8), spacing=torch.tensor([1.5, 1.5, 3.0]))
    torch.testing.assert_close(output, -expected)
    with pytest.raises(ValueError, match="give top_region"):
        MaisiUNet(arguments)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda network: network["diffusion_unet_def"].update(_target_="os.system"), "_target_ is 'os.system'"),
    (lambda network: network["autoencoder_def"].update(num_channels="$[8, 16]"), "never evaluates"),
    (lambda network: network["diffusion_unet_def"].update(in_channels="@no_such_key"), "does not define"),
    (lambda network: network["autoencoder_def"].update(made_up_option=1), "made_up_option"),
    (lambda network: network["noise_scheduler"].update(_target_="monai.networks.schedulers.DDIMScheduler"),
     "noise_scheduler is DDIMScheduler"),
])
def test_a_bundle_config_radsynth_would_have_to_execute_or_guess_is_refused(tmp_path, edit, message):
    from radsynth.configs import load_config

    bundle = write_maisi_bundle(tmp_path / "maisi", "rflow")
    network = json.loads((bundle / "configs" / "config_network.json").read_text())
    edit(network)
    (bundle / "configs" / "config_network.json").write_text(json.dumps(network))
    config = load_config("demo-3d", [*TINY_3D, f"runtime.output_dir={tmp_path / 'run'}", f"finetune.from={bundle}"])
    ingest(config, progress=False)
    with pytest.raises(UserInputError, match=message):
        finetune(config, progress=False)


def test_what_a_maisi_base_cannot_take_is_refused(tmp_path):
    from radsynth.configs import load_config
    from radsynth.configs.schema import MaisiBaseConfig

    bundle = write_maisi_bundle(tmp_path / "maisi", "rflow")
    run = tmp_path / "run"

    def refused(*overrides):
        config = load_config("demo-3d", [*TINY_3D, f"runtime.output_dir={run}", f"finetune.from={bundle}", *overrides])
        ingest(config, progress=False)
        with pytest.raises(UserInputError) as error:
            finetune(config, progress=False)
        return str(error.value)

    assert refused("data.preprocess.intensity.ct_window=[-200,400]").startswith("data.preprocess.intensity.ct_window")
    # MAISI's published range by default: the phantoms' 350 mm / 32 voxels are too coarse for it.
    assert refused(f"finetune.maisi.trained_spacing_mm={json.dumps(MaisiBaseConfig().trained_spacing_mm)}") == (
        "data.preprocess.target_spacing: 10.94 mm on axis 0, outside the [0.5, 3] mm the MAISI base was trained on "
        "(finetune.maisi.trained_spacing_mm); resample to a spacing within it")
    assert refused("finetune.maisi.trained_fov_mm=[[400,1536],[400,1536],[64,3840]]").startswith(
        "data.preprocess.target_shape: a field of view of 350 mm on axis 0 (32 x 10.94 mm), outside the [400, 1536]")
    message = refused("data.phantom.kind=brain_mri", "data.preprocess.intensity.mode=percentile")
    assert message.startswith("finetune.from") and "no modality input, so it generates CT" in message
    assert "multiple of 4" in refused("data.preprocess.target_shape=[30,30,30]")
    assert "give top_region" in refused("finetune.maisi.body_region=null")
    (bundle / "models" / "diff_unet_3d_copy.pt").write_bytes((bundle / "models" / "diff_unet_3d_rflow.pt").read_bytes())
    assert "cannot tell which file" in refused()
    assert "finetune.maisi.diffusion_weights" in refused()
    (bundle / "models" / "diff_unet_3d_copy.pt").unlink()
    import pickle

    (bundle / "models" / "autoencoder_epoch273.pt").unlink()
    torch.save({"state_dict": {}, "note": pickle.dumps}, bundle / "models" / "autoencoder_epoch273.pt")
    assert "never unpickles" in refused()


# ---------------------------------------------------------------- MAISI's ControlNet on the local vocabulary

# The 3D phantom's labels MAISI has no name for, mapped by hand: onto free indices (2 and 16 are MAISI's
# "dummy" slots, 200 unused), onto the bundle's own tumour classes, and the body into the background.
PHANTOM_TO_MAISI = {"body": 0, "right_lung": 2, "left_lung": 16, "vertebrae": 200, "liver_tumour": 26,
                    "lung_nodule": 23}
MASKS_3D = ["conditioning.use_masks=true", "sampling.pairs=true", "controlnet.max_steps=2", "controlnet.batch_size=2",
            "controlnet.learning_rate=0.01", "controlnet.validate_every=null",
            f"finetune.maisi.label_indices={json.dumps(PHANTOM_TO_MAISI)}"]
PHANTOM_LABELS = {0: "background", 1: "body", 2: "right_lung", 3: "left_lung", 4: "liver", 5: "spleen",
                  6: "right_kidney", 7: "left_kidney", 8: "vertebrae", 9: "liver_tumour", 10: "lung_nodule"}


def test_local_labels_take_the_bundles_index_by_name_or_the_one_given_and_unmapped_ones_are_refused(tmp_path):
    from radsynth.pipelines.bases import maisi_label_indices

    bundle = write_maisi_bundle(tmp_path / "maisi", "rflow", controlnet=True)
    indices = maisi_label_indices(bundle, PHANTOM_TO_MAISI, PHANTOM_LABELS)
    # liver, spleen and the kidneys by name ("right_kidney" is "right kidney"); the rest as given.
    assert indices == [0, 0, 2, 16, 1, 3, 5, 14, 200, 26, 23]
    with pytest.raises(UserInputError, match=r"no MAISI index for the labels \['vertebrae'\].*free one: 6, 7, 8"):
        maisi_label_indices(bundle, {k: v for k, v in PHANTOM_TO_MAISI.items() if k != "vertebrae"}, PHANTOM_LABELS)
    with pytest.raises(UserInputError, match=r"the labels \['liver', 'vertebrae'\] share the index 1"):
        maisi_label_indices(bundle, {**PHANTOM_TO_MAISI, "vertebrae": 1}, PHANTOM_LABELS)
    with pytest.raises(UserInputError, match=r"names \['kidney'\], which are not labels of the data"):
        maisi_label_indices(bundle, {**PHANTOM_TO_MAISI, "kidney": 5}, PHANTOM_LABELS)
    # Several labels may be merged into the background; without a label_dict.json every label needs an index.
    assert maisi_label_indices(bundle, {**PHANTOM_TO_MAISI, "vertebrae": 0}, PHANTOM_LABELS)[8] == 0
    (bundle / "configs" / "label_dict.json").unlink()
    with pytest.raises(UserInputError, match=r"\['liver', 'spleen', 'right_kidney', 'left_kidney'\].*free one: 1, 3, 4"):
        maisi_label_indices(bundle, PHANTOM_TO_MAISI, PHANTOM_LABELS)


def test_the_maisi_controlnet_sees_the_bits_of_each_local_labels_maisi_index():
    """One-hot local labels in, MAISI's own encoding to ControlNetMaisi: bit k of the mapped index on channel k
    (as MAISI's binarize_labels gives it), so the residuals are the bundle ControlNet's on the mapped map."""
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

    from radsynth.generators.controlnet import one_hot_labels
    from radsynth.generators.maisi import MaisiControlNet

    arguments = {key: value for key, value in TINY_CONTROLNET.items() if key != "_target_"}
    arguments |= {"spatial_dims": 3, "in_channels": 4}
    indices = [0, 0, 2, 16, 1, 3, 5, 14, 200, 26, 23]
    torch.manual_seed(0)
    wrapped = MaisiControlNet(arguments, indices).eval()
    with torch.no_grad():
        for parameter in wrapped.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    reference = ControlNetMaisi(**arguments).eval()
    reference.load_state_dict(wrapped.net.state_dict())
    local = torch.randint(0, len(indices), (2, 1, 8, 8, 8))
    maisi = torch.tensor(indices)[local[:, 0]]
    bits = torch.stack([(maisi // 2**k) % 2 for k in range(8)], dim=1).float()
    assert torch.equal(wrapped.binary_labels(one_hot_labels(local, len(indices))), bits)
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([100.0, 900.0])
    with torch.no_grad():
        down, mid = wrapped(x, t, torch.zeros(2, 1, 8), local, conditioning_scale=0.5)
        expected_down, expected_mid = reference(x, t, controlnet_cond=bits, conditioning_scale=0.5)
    torch.testing.assert_close(mid, expected_mid)
    for residual, expected in zip(down, expected_down, strict=True):
        torch.testing.assert_close(residual, expected)
    with pytest.raises(ValueError, match="label map must be"):
        wrapped(x, t, None, torch.zeros(2, 1, 4, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("shipped", [True, False])
def test_the_fine_tunes_controlnet_starts_from_the_bundles_or_else_from_its_unet(tmp_path, shipped):
    from radsynth.configs import load_config
    from radsynth.generators.data import CachedImages, ConditioningSpec
    from radsynth.pipelines.bases import base_controlnet, load_base
    from radsynth.pipelines.training import ingested_dataset

    bundle = write_maisi_bundle(tmp_path / "maisi", "rflow", controlnet=True)
    if not shipped:
        (bundle / "models" / "controlnet_3d_rflow.pt").unlink()
    config = load_config("demo-3d", [*TINY_3D, *MASKS_3D, f"runtime.output_dir={tmp_path / 'run'}",
                                     f"finetune.from={bundle}"])
    ingest(config, progress=False)
    records, summary = ingested_dataset(config)
    images = CachedImages(records, summary["cache"], ConditioningSpec(config.conditioning.attributes))
    base = load_base(config, summary, records, images.spacings, progress=False)
    controlnet = base_controlnet(config, base, PHANTOM_LABELS)
    state = controlnet.net.state_dict()
    if shipped:
        bundled = torch.load(bundle / "models" / "controlnet_3d_rflow.pt", weights_only=True)["controlnet_state_dict"]
        assert all(torch.equal(state[key], value) for key, value in bundled.items()) and set(bundled) == set(state)
    else:
        unet = base.unet.net.state_dict()
        shared = [key for key in state if key.startswith(("down_blocks.", "middle_block.")) and key in unet
                  and unet[key].shape == state[key].shape]
        assert len(shared) > len(state) / 2 and all(torch.equal(state[key], unet[key]) for key in shared)
        assert not any(parameter.any() for parameter in controlnet.net.controlnet_mid_block.parameters())


def test_a_maisi_bundles_controlnet_is_fine_tuned_on_the_local_labels_and_draws_pairs(tmp_path):
    from radsynth.configs import load_config
    from radsynth.generators.maisi import MaisiControlNet

    bundle = write_maisi_bundle(tmp_path / "maisi", "rflow", controlnet=True)
    config = load_config("demo-3d", [*TINY_3D, *MASKS_3D, f"runtime.output_dir={tmp_path / 'run'}",
                                     f"finetune.from={bundle}", "sampling.scheduler=flow_match_euler"])
    ingest(config, progress=False)
    result = finetune(config, progress=False)
    loaded = load_pipeline(result.model_dir, config, progress=False)
    assert isinstance(loaded.mask_controlnet, MaisiControlNet)
    assert list(loaded.mask_controlnet.config.label_indices) == [0, 0, 2, 16, 1, 3, 5, 14, 200, 26, 23]
    bundled = torch.load(bundle / "models" / "controlnet_3d_rflow.pt", weights_only=True)["controlnet_state_dict"]
    tuned = loaded.mask_controlnet.net.state_dict()
    assert any(not torch.equal(tuned[key], value) for key, value in bundled.items())  # it trained
    assert "each drawn as a MAISI label index: body 0, right_lung 2, left_lung 16, liver 1," in (
        result.model_dir / "README.md").read_text()
    compute = json.loads((result.model_dir / "compute.json").read_text())
    assert compute["parts"]["controlnet"]["steps"] == 2
    out = generate(config, result.model_dir, 2, tmp_path / "samples", progress=False)
    assert len(out.written) == 2 and out.model_hash != result.model_hash  # the ControlNet is part of what drew them
    assert len(list(out.sample_dir.glob("*_label.nii.gz"))) == 2  # each image with the map it was drawn from


def test_what_a_maisi_controlnet_fine_tune_cannot_take_is_refused(tmp_path, sd_base):
    from radsynth.configs import load_config

    bundle = write_maisi_bundle(tmp_path / "maisi", "rflow")  # no ControlNet in it
    config = load_config("demo-3d", [*TINY_3D, *MASKS_3D, f"runtime.output_dir={tmp_path / 'run'}",
                                     f"finetune.from={bundle}"])
    ingest(config, progress=False)
    with pytest.raises(UserInputError, match="no controlnet_def"):
        finetune(config, progress=False)
    assert not list((tmp_path / "run").glob("model-*"))
    network = json.loads((bundle / "configs" / "config_network.json").read_text())
    network["controlnet_def"] = {**TINY_CONTROLNET, "conditioning_embedding_num_channels": [8, 16, 16]}
    (bundle / "configs" / "config_network.json").write_text(json.dumps(network))
    (bundle / "configs" / "label_dict.json").write_text(json.dumps(MAISI_LABELS))
    with pytest.raises(UserInputError, match="brings label maps down 4x, the autoencoder 2x"):
        finetune(config, progress=False)
    sd_config = tiny_config(tmp_path / "sd", f"finetune.from={sd_base}", "conditioning.use_masks=true")
    ingest(sd_config, progress=False)
    with pytest.raises(UserInputError, match="conditioning.use_masks: a Stable-Diffusion-family base has no"):
        finetune(sd_config, progress=False)


# ---------------------------------------------------------------- through the normal commands

@pytest.mark.slow
def test_external_bases_fine_tune_sample_score_and_release_through_radsynth_build(tmp_path, sd_base):
    """`radsynth build` from a Stable-Diffusion-family folder and from a MAISI bundle (its ControlNet drawing
    pairs): the fine-tune, the samples, the scorecard and the gate's decision, as for a model trained here."""
    from .test_flows import TINY_BUILD, build_config, last_json, radsynth
    from .test_scoring_evaluate import FAST

    path, run_dir = build_config(tmp_path, "sd", f"finetune.from={sd_base}", "finetune.max_steps=2")
    done = radsynth("build", str(path), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json(done)
    assert result["gate_passed"] and Path(result["model_dir"]).name.startswith("model-finetune-lora")
    card = (Path(result["release"]["release"]) / "README.md").read_text()
    assert result["model_hash"][:16] in card

    bundle = write_maisi_bundle(tmp_path / "maisi", "rflow", controlnet=True)
    from radsynth.configs import load_config

    config = load_config("demo-3d", [*TINY_3D, *MASKS_3D, f"runtime.output_dir={tmp_path / 'maisi-run'}",
                                     f"finetune.from={bundle}", "sampling.scheduler=flow_match_euler",
                                     "sampling.num_samples=4", *[o for o in TINY_BUILD if o.startswith("release.gate")],
                                     "release.formats=[nnunet]",
                                     *FAST, "scoring.utility=false"])
    maisi_path = tmp_path / "maisi.yaml"
    maisi_path.write_text(json.dumps(config.model_dump(mode="json", by_alias=True)))
    done = radsynth("build", str(maisi_path), "--json")
    # Ten phantom patients leave one or two for the holdout: too few to measure privacy, so the gate refuses,
    # after the fine-tune, its pairs and their scorecard.
    assert done.returncode == 3, done.stderr[-3000:]
    result = last_json(done)
    assert {"train", "evaluate", "release"} <= {name.split("-")[0] for name in result["tasks"]}
    assert any("holdout" in reason for reason in result["release"]["failed"]), result["release"]["failed"]
    assert len(list(Path(result["sample_dir"]).glob("*_label.nii.gz"))) == 4
