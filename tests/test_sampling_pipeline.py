"""Sampling: the text-to-image pipeline on tiny random 2D and 3D models (shapes, ranges, seeds, guidance,
save/load, model hash) and the sample writers (NIfTI with affine, 16-bit PNG, JSON sidecar, atomicity)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from radsynth.configs import load_config
from radsynth.configs.errors import UserInputError
from radsynth.generators.autoencoder import RadsynthAutoencoder
from radsynth.generators.objectives import build_inference_scheduler
from radsynth.generators.text_encoder import RadsynthTextEncoder, WordTokenizer
from radsynth.generators.unet import RadsynthUNet
from radsynth.pipelines.data.preprocess import IntensityMap
from radsynth.pipelines.sampling.generate import sample_seed, sampler_settings
from radsynth.pipelines.sampling.pipeline import model_hash
from radsynth.pipelines.sampling.text_to_image import RadsynthTextToImagePipeline
from radsynth.pipelines.sampling.writers import write_sample

from .conftest import REPO

PROMPTS = ["finding: nodule; view: PA. small nodule right upper lobe", "finding: none. normal chest"]
SHAPES = {2: (16, 16), 3: (8, 8, 8)}  # image side / 2 = latent side (autoencoder with two levels)


def make_pipeline(
    spatial_dims: int,
    objective: str = "v_prediction",
    scheduler: str = "ddim",
    seed: int = 0,
    text_encoder=None,
    **config,
) -> RadsynthTextToImagePipeline:
    torch.manual_seed(seed)
    vae = RadsynthAutoencoder(
        spatial_dims=spatial_dims, channels=(8, 16), latent_channels=4, attention_levels=(False, False),
        norm_num_groups=8,
    )
    vae.set_scaling_factor(0.5)
    unet = RadsynthUNet(
        spatial_dims=spatial_dims, in_channels=4, out_channels=4, channels=(8, 16), attention_levels=(False, True),
        num_head_channels=8, cross_attention_dim=text_encoder.embed_dim if text_encoder else 16, norm_num_groups=8,
        use_spacing=spatial_dims == 3,
    )
    if text_encoder is None:
        vocab = WordTokenizer.fit(PROMPTS, max_length=12).vocab
        text_encoder = RadsynthTextEncoder(vocab=vocab, max_length=12, embed_dim=16, num_layers=1, num_heads=2)
    # MONAI zero-initialises the UNet's output conv and attention projections, so a fresh UNet predicts zeros and
    # ignores its prompt; randomise them so that prompts and guidance reach the images.
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    pipeline = RadsynthTextToImagePipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, scheduler=build_inference_scheduler(objective, scheduler),
        spatial_dims=spatial_dims, image_shape=SHAPES[spatial_dims], spacing=(1.5,) * spatial_dims,
        **{"modality": "ct", "intensity_low": -200.0, "intensity_high": 400.0, **config},
    )
    pipeline.set_progress_bar_config(disable=True)
    # Eval mode, as from_pretrained returns models (PyTorch's transformer takes a different kernel path in eval).
    for module in (unet, vae, text_encoder):
        module.eval()
    return pipeline


def run(pipeline, seed=0, steps=3, **kwargs):
    return pipeline(PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize(
    ("spatial_dims", "objective", "scheduler"),
    [(2, "v_prediction", "ddim"), (3, "rectified_flow", "flow_match_euler"), (2, "epsilon", "dpm_solver")],
)
def test_images_have_the_configured_shape_range_and_physical_units(spatial_dims, objective, scheduler):
    pipeline = make_pipeline(spatial_dims, objective, scheduler)
    # A loud decoder, so that its raw output certainly leaves [-1, 1] and the documented clip is exercised.
    with torch.no_grad():
        pipeline.vae.net.decoder.blocks[-1].conv.weight.mul_(20)

    normalised = run(pipeline, guidance_scale=1.0)
    physical = run(pipeline, guidance_scale=1.0, output_type="physical")
    as_tensor = run(pipeline, guidance_scale=1.0, output_type="pt")

    assert normalised.images.shape == (2, 1, *SHAPES[spatial_dims])
    assert isinstance(normalised.images, np.ndarray) and isinstance(as_tensor.images, torch.Tensor)
    np.testing.assert_array_equal(as_tensor.images.numpy(), normalised.images)
    assert normalised.images.min() >= -1 and normalised.images.max() <= 1
    assert np.isin([-1.0, 1.0], normalised.images).all()  # saturated at both ends: the clip did act
    assert normalised.images.std() > 0.1
    inverse = IntensityMap("ct_window", -200.0, 400.0).inverse(normalised.images)
    np.testing.assert_allclose(physical.images, inverse, rtol=0, atol=1e-3)
    assert physical.images.min() >= -200 and physical.images.max() <= 400
    assert np.isfinite(normalised.latent_std) and normalised.latent_std > 0.1


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_same_seed_same_images_other_seed_other_images(spatial_dims):
    pipeline = make_pipeline(spatial_dims)
    first, again, other = run(pipeline, seed=7).images, run(pipeline, seed=7).images, run(pipeline, seed=8).images
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3


def test_one_generator_per_prompt_regenerates_a_single_sample_exactly():
    # The sampling flow seeds each sample on its own, so a shard's sample can be redone without its batch.
    pipeline = make_pipeline(2, "v_prediction", "ddpm")  # DDPM: its step noise must follow the per-sample seed too
    generators = [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)]
    batch = pipeline(PROMPTS, num_inference_steps=3, generator=generators).images
    alone = pipeline(PROMPTS[1:], num_inference_steps=3, generator=torch.Generator().manual_seed(12)).images
    np.testing.assert_allclose(batch[1:], alone, atol=1e-4)
    with pytest.raises(ValueError, match="2 generators for 1 prompts"):
        pipeline(PROMPTS[:1], num_inference_steps=2, generator=generators)


def test_guidance_batches_null_and_conditional_prompts_only_when_above_one():
    pipeline = make_pipeline(2)
    calls: list[tuple[int, torch.Tensor]] = []
    hook = pipeline.unet.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args[0].shape[0], kwargs["encoder_hidden_states"])),
        with_kwargs=True,
    )
    try:
        unguided = run(pipeline, steps=3, guidance_scale=1.0).images
        assert [batch for batch, _ in calls] == [2, 2, 2]
        calls.clear()
        guided = run(pipeline, steps=3, guidance_scale=3.0).images
        assert [batch for batch, _ in calls] == [4, 4, 4]
    finally:
        hook.remove()
    context = calls[0][1]
    with torch.no_grad():
        null, conditional = pipeline.text_encoder.encode(["", ""]), pipeline.text_encoder.encode(PROMPTS)
    torch.testing.assert_close(context[:2], null)  # [null, cond] order: the guidance formula depends on it
    torch.testing.assert_close(context[2:], conditional)
    assert np.abs(guided - unguided).mean() > 1e-3


@pytest.mark.parametrize(("objective", "scheduler"), [("v_prediction", "ddim"), ("rectified_flow", "flow_match_euler")])
def test_a_guidance_interval_guides_only_the_steps_at_its_noise_levels(objective, scheduler):
    pipeline = make_pipeline(2, objective, scheduler)
    batches: list[int] = []
    hook = pipeline.unet.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    try:
        # Four DDIM steps of a 1000-step schedule sit at noise levels 0.999, 0.749, 0.499 and 0.249 (timesteps
        # 999 ... 249); flow matching's at its sigmas 1, 0.667, 0.334, 0.001. The interval guides the middle two.
        middle = run(pipeline, steps=4, guidance_scale=3.0, guidance_interval=(0.3, 0.8)).images
        assert batches == [2, 4, 4, 2]
        batches.clear()
        everywhere = run(pipeline, steps=4, guidance_scale=3.0, guidance_interval=(0.0, 1.0)).images
        assert batches == [4, 4, 4, 4]
    finally:
        hook.remove()
    np.testing.assert_array_equal(everywhere, run(pipeline, steps=4, guidance_scale=3.0).images)
    nowhere = run(pipeline, steps=4, guidance_scale=3.0, guidance_interval=(0.9, 0.95)).images
    unguided = run(pipeline, steps=4, guidance_scale=1.0).images
    np.testing.assert_array_equal(nowhere, unguided)
    assert np.abs(middle - everywhere).mean() > 1e-4 and np.abs(middle - unguided).mean() > 1e-4


def test_a_guidance_interval_keys_the_seeds_and_the_sidecar_and_leaves_earlier_seeds_alone():
    model = SimpleNamespace(config=SimpleNamespace(distilled_guidance_scale=None))
    plain = load_config(REPO / "configs" / "demo.yaml", ["sampling.guidance_interval=null"])
    interval = load_config(REPO / "configs" / "demo.yaml", ["sampling.guidance_interval=[0.2,0.6]"])
    assert "guidance_interval" not in sampler_settings(plain, model)  # the seeds of earlier releases stand
    settings = sampler_settings(interval, model)
    assert settings["guidance_interval"] == [0.2, 0.6]  # written into each sidecar as it is
    assert sample_seed("m", interval, 0, settings) != sample_seed("m", plain, 0, sampler_settings(plain, model))
    student = SimpleNamespace(config=SimpleNamespace(distilled_guidance_scale=2.0))
    assert "guidance_interval" not in sampler_settings(interval, student)  # a student runs unguided


def test_latent_clip_bounds_the_sampled_latents():
    # With DDIM the last step returns the predicted clean latents, so they cannot leave the clip range.
    free = run(make_pipeline(2, "epsilon", "ddim"), guidance_scale=1.0)
    clipped = run(make_pipeline(2, "epsilon", "ddim", latent_clip=0.05), guidance_scale=1.0)
    assert free.latent_std > 0.1
    assert clipped.latent_std <= 0.05 * 1.01  # std (n - 1) of values in [-0.05, 0.05]


def test_save_and_load_restore_components_config_and_images(tmp_path):
    pipeline = make_pipeline(3, "rectified_flow", "flow_match_euler", latent_clip=3.0, modality="mri")
    pipeline.save_pretrained(tmp_path)

    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.suffix for path in files if path.name != "pipeline.py"} == {".json", ".safetensors"}  # no pickle
    folders = {path.name for path in tmp_path.iterdir() if path.is_dir()}
    assert folders == {"unet", "vae", "text_encoder", "scheduler"}
    assert not folders & {"controlnet", "ddpm", "ddim"}  # diffusers would mistake these for pipelines

    loaded = RadsynthTextToImagePipeline.from_pretrained(tmp_path, use_safetensors=True)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        assert type(getattr(loaded, name)) is type(getattr(pipeline, name))
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipeline.scheduler.config)
    assert loaded.vae.config.scaling_factor == 0.5
    assert loaded.text_encoder.tokenizer.vocab == pipeline.text_encoder.tokenizer.vocab
    for key in ("modality", "spatial_dims", "image_shape", "spacing", "intensity_low", "intensity_high", "latent_clip"):
        assert loaded.config[key] == pipeline.config[key], key
    assert (loaded.config.modality, loaded.config.image_shape, loaded.config.spacing) == ("mri", (8, 8, 8), (1.5,) * 3)

    np.testing.assert_array_equal(run(loaded, seed=3, steps=2).images, run(pipeline, seed=3, steps=2).images)
    assert model_hash(loaded) == model_hash(pipeline)


def test_model_hash_follows_weights_and_model_config():
    pipeline = make_pipeline(2)
    original = model_hash(pipeline)
    assert original == model_hash(make_pipeline(2))  # same seed, same weights: same hash
    assert len(original) == 64 and int(original, 16) >= 0

    weight = pipeline.unet.net.conv_in.conv.weight
    with torch.no_grad():
        weight[0, 0, 0, 0] += 1e-3
    changed = model_hash(pipeline)
    with torch.no_grad():
        weight[0, 0, 0, 0] -= 1e-3
    assert changed != original

    pipeline.vae.set_scaling_factor(0.25)  # the same weights decode differently: a different model
    assert model_hash(pipeline) != original

    pipeline.vae.set_scaling_factor(0.5)
    pipeline.scheduler = build_inference_scheduler("v_prediction", "dpm_solver")  # a sampling choice, not the model
    assert model_hash(pipeline) == original


def test_given_latents_of_the_wrong_shape_are_refused():
    pipeline = make_pipeline(2)
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 4, 8, 8\)"):
        pipeline(PROMPTS, num_inference_steps=2, latents=torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="output_type"):
        pipeline(PROMPTS, num_inference_steps=2, output_type="pil")


# ------------------------------------------------------------------------------------------------ writers

PROVENANCE = {"prompt": "finding: nodule", "seed": 1234, "scheduler": "ddim", "num_inference_steps": 50,
              "guidance_scale": 3.0, "model_hash": "ab" * 32}


def test_nifti_sample_keeps_its_affine_and_says_it_is_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.uniform(-1000, 1000, size=(6, 7, 5)).astype(np.float32)
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [1.0, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 5.0], [0.0, 0.0, 0.0, 1.0]])
    paths = write_sample(tmp_path / "out", "sample_0007", image, affine, "nifti",
                         {**PROVENANCE, "case_split": "synthetic", "is_synthetic": False})

    written = nib.load(str(paths.image))
    np.testing.assert_array_equal(written.affine, affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), image)
    assert b"synthetic" in written.header["descrip"].tobytes()
    sidecar = json.loads(paths.sidecar.read_text())
    assert paths.sidecar.name == "sample_0007.json" and paths.image.name == "sample_0007.nii.gz"
    assert sidecar["is_synthetic"] is True  # the writer's mark wins over anything the caller passed
    assert {key: sidecar[key] for key in PROVENANCE} == PROVENANCE
    assert sidecar["case_split"] == "synthetic" and sidecar["file"] == "sample_0007.nii.gz"
    np.testing.assert_allclose(sidecar["spacing"], [1.0, 1.5, 2.0])
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["sample_0007.json", "sample_0007.nii.gz"]


def test_2d_nifti_sample_from_a_spacing_is_one_slice_with_that_pixel_size(tmp_path):
    image = np.arange(12, dtype=np.float32).reshape(3, 4)
    paths = write_sample(tmp_path, "s0", image, (0.5, 0.7), "nifti", PROVENANCE)
    written = nib.load(str(paths.image))
    assert written.shape == (3, 4, 1)
    np.testing.assert_allclose(written.affine, np.diag([0.5, 0.7, 1.0, 1.0]), atol=1e-6)  # NIfTI stores float32
    np.testing.assert_array_equal(np.asarray(written.dataobj)[..., 0], image)


def test_png16_sample_inverts_to_physical_units_within_one_quantisation_step(tmp_path):
    low, high = -200.0, 400.0
    image = np.random.default_rng(1).uniform(low, high, size=(16, 12))
    image[0, :3] = [low, high, 1000.0]  # the ends map to 0 and 65535; outside the range is clipped
    paths = write_sample(tmp_path, "s1", image, (0.8, 0.8), "png16", PROVENANCE, png_range=(low, high))

    with PILImage.open(paths.image) as handle:
        pixels = np.asarray(handle)
    assert pixels.dtype == np.uint16 and pixels.shape == (16, 12)
    assert pixels[0, :3].tolist() == [0, 65535, 65535]
    sidecar = json.loads(paths.sidecar.read_text())
    assert (sidecar["png_low"], sidecar["png_high"]) == (low, high) and "65535" in sidecar["png_mapping"]
    restored = sidecar["png_low"] + pixels / 65535 * (sidecar["png_high"] - sidecar["png_low"])
    step = (high - low) / 65535
    np.testing.assert_allclose(restored, np.clip(image, low, high), rtol=0, atol=step / 2 + 1e-9)


def test_png16_without_a_range_uses_the_samples_own_extremes(tmp_path):
    image = np.linspace(3.0, 7.0, 20).reshape(4, 5)
    paths = write_sample(tmp_path, "s2", image, (1.0, 1.0), "png16", PROVENANCE)
    with PILImage.open(paths.image) as handle:
        pixels = np.asarray(handle)
    assert (pixels.min(), pixels.max()) == (0, 65535)
    sidecar = json.loads(paths.sidecar.read_text())
    assert (sidecar["png_low"], sidecar["png_high"]) == (3.0, 7.0)


def test_writer_refuses_bad_requests_before_touching_the_disk(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserInputError, match="sampling.output_format: png16 holds 2D images"):
        write_sample(out, "s", np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), "png16", PROVENANCE)
    with pytest.raises(ValueError, match="missing provenance fields: model_hash"):
        incomplete = {key: value for key, value in PROVENANCE.items() if key != "model_hash"}
        write_sample(out, "s", np.zeros((4, 4)), (1.0, 1.0), "nifti", incomplete)
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_sample(out, "s", np.zeros((4, 4)), (1.0, 1.0), "nifti", {**PROVENANCE, "generator": torch.Generator()})
    with pytest.raises(ValueError, match="plain file name"):
        write_sample(out, "../escape", np.zeros((4, 4)), (1.0, 1.0), "nifti", PROVENANCE)
    with pytest.raises(ValueError, match="NaN"):
        write_sample(out, "s", np.full((4, 4), np.nan), (1.0, 1.0), "nifti", PROVENANCE)
    assert not out.exists()


def test_a_failed_sidecar_write_leaves_no_image_and_no_temporary_file(tmp_path):
    (tmp_path / "s3.json").mkdir()  # the sidecar's rename onto this name fails after the image is written
    with pytest.raises(OSError):
        write_sample(tmp_path, "s3", np.ones((4, 4, 4), np.float32), (1.0, 1.0, 1.0), "nifti", PROVENANCE)
    assert [path.name for path in tmp_path.iterdir()] == ["s3.json"]
    assert not any((tmp_path / "s3.json").iterdir())


@pytest.mark.parametrize("fmt, shape", [("nifti", (6, 7, 5)), ("png16", (9, 8))])
def test_a_label_map_is_written_on_the_image_grid_as_integers(tmp_path, fmt, shape):
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 100, size=shape)
    label = rng.integers(0, 4, size=shape)
    affine = np.diag([0.5, 0.7, 2.0, 1.0])[: len(shape) + 1, : len(shape) + 1] if fmt == "nifti" else (0.5, 0.7)
    paths = write_sample(tmp_path, "pair_1", image, affine, fmt, {**PROVENANCE, "mask_source": "generated"}, label=label)
    sidecar = json.loads(paths.sidecar.read_text())
    assert paths.label.name == sidecar["label_file"] == f"pair_1_label{''.join(paths.image.suffixes)}"
    if fmt == "nifti":
        written, image_file = nib.load(str(paths.label)), nib.load(str(paths.image))
        np.testing.assert_array_equal(written.affine, image_file.affine)
        values = np.asarray(written.dataobj)
    else:
        with PILImage.open(paths.label) as handle:
            values = np.asarray(handle)
    assert np.issubdtype(values.dtype, np.integer)
    np.testing.assert_array_equal(values, label)


def test_a_label_map_off_the_image_grid_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ValueError, match="label shape"):
        write_sample(tmp_path / "out", "s", np.zeros((4, 4)), (1.0, 1.0), "png16", PROVENANCE, label=np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="non-negative integers"):
        write_sample(tmp_path / "out", "s", np.zeros((4, 4)), (1.0, 1.0), "png16", PROVENANCE, label=np.zeros((4, 4)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 90 s on a 2-core CPU: kept out of the CI lane
def test_loading_a_saved_model_never_patches_torch_for_other_threads(tmp_path):
    """Sampling shards on threads load the model side by side. A loader that patches ``torch.nn.Module`` for
    the process (accelerate's init_empty_weights) makes modules another thread builds meanwhile land on the
    meta device: watch the class attributes while a load runs in another thread."""
    import threading

    from radsynth.configs import load_config
    from radsynth.pipelines.sampling.generate import load_pipeline

    make_pipeline(2).save_pretrained(tmp_path)
    config = load_config("demo", ["runtime.device=cpu"])
    original = torch.nn.Module.register_parameter
    patched, done = [], threading.Event()

    def load_repeatedly():
        try:
            for _ in range(5):
                load_pipeline(tmp_path, config, progress=False)
        finally:
            done.set()

    loader = threading.Thread(target=load_repeatedly)
    loader.start()
    while not done.is_set():
        patched.append(torch.nn.Module.register_parameter is not original)
    loader.join()
    assert len(patched) > 100 and not any(patched)


def test_diffusers_alone_loads_a_saved_model_in_a_fresh_process(tmp_path):
    """``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``, radsynth never imported by the
    caller, returns the saved pipeline class and draws the same images."""
    import subprocess
    import sys

    pipeline = make_pipeline(2)
    pipeline.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "expected.npy", run(pipeline, seed=3, steps=2).images)
    code = f"""
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
assert not any(name.startswith("radsynth") for name in sys.modules)
torch.set_num_threads({torch.get_num_threads()})  # the thread count changes float sums: keep the parent's
pipeline = DiffusionPipeline.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
pipeline.set_progress_bar_config(disable=True)
images = pipeline({PROMPTS!r}, num_inference_steps=2, generator=torch.Generator().manual_seed(3)).images
print(type(pipeline).__name__, np.array_equal(images, np.load({str(tmp_path / "expected.npy")!r})))
"""
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["RadsynthTextToImagePipeline", "True"]
    # Without trust_remote_code diffusers refuses to run the folder's code, as it should.
    refused = subprocess.run([sys.executable, "-c", code.replace(", trust_remote_code=True", "")],
                             capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr


def test_a_model_with_a_pretrained_text_encoder_loads_without_the_encoders_folder(tiny_bert, tmp_path):
    """The model folder is self-contained: the Hugging Face encoder it was trained with is bundled, so it
    samples the same images, with the same hash, once the encoder's own folder is gone."""
    import shutil

    from radsynth.generators.text_encoder import load_text_encoder

    pipeline = make_pipeline(2, text_encoder=load_text_encoder("pretrained", pretrained_path=tiny_bert, max_length=12))
    pipeline.save_pretrained(tmp_path / "model")
    shutil.rmtree(tiny_bert)
    loaded = RadsynthTextToImagePipeline.from_model_dir(tmp_path / "model")
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(loaded, seed=3, steps=2).images, run(pipeline, seed=3, steps=2).images)
    assert model_hash(loaded) == model_hash(pipeline)


def test_radsynth_never_runs_the_code_in_a_model_folder(tmp_path):
    """A model folder is user-writable: radsynth's own loaders read the class name from the index and ignore
    the folder's pipeline.py, which diffusers would otherwise execute."""
    from radsynth.pipelines.sampling.mask_to_image import RadsynthMaskToImagePipeline

    make_pipeline(2).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "RadsynthTextToImagePipeline"]
    from radsynth.pipelines.sampling import diffusers_entry

    assert (tmp_path / "pipeline.py").read_text() == open(diffusers_entry.__file__).read()
    marker = tmp_path / "executed"
    (tmp_path / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    loaded = RadsynthTextToImagePipeline.from_model_dir(tmp_path)
    assert type(loaded) is RadsynthTextToImagePipeline
    with pytest.raises(FileNotFoundError, match="mask_controlnet"):  # another task reads the same folder
        RadsynthMaskToImagePipeline.from_model_dir(tmp_path)
    assert not marker.exists()
