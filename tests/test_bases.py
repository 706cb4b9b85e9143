"""Pretrained bases from a local path: a Stable-Diffusion-family folder written with diffusers' and transformers'
own classes (tiny random weights, RoentGen's layout) is detected, wrapped, fine-tuned, sampled and saved as a
self-contained radsynth model; what cannot work is refused in one line."""

from __future__ import annotations

import json
import shutil

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
    with pytest.raises(UserInputError, match="MONAI bundle"):
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
