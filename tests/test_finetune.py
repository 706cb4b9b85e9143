"""Fine-tuning on a rare finding: LoRA changes only attention projections, a domain embedding only the timestep
embedding's output bias, and neither the base folder."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from radsynth.configs import UserInputError
from radsynth.generators.domain_embedding import add_block_shifts, add_domain_embedding
from radsynth.generators.lora import add_lora, merge_lora
from radsynth.generators.unet import RadsynthUNet
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.finetuning import finetune
from radsynth.pipelines.sampling.generate import generate
from radsynth.pipelines.training import train

from .test_training_stage import tiny_config


def folder_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    config = tiny_config(run, "diffusion.max_steps=3", "diffusion.validate_every=100", "data.phantom.n_cases=40")
    ingest(config, progress=False)
    return run, train(config, progress=False)


def test_lora_merge_is_exactly_the_low_rank_update_and_starts_as_identity():
    torch.manual_seed(0)
    unet = RadsynthUNet(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=8, cross_attention_dim=32)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    reference = unet(x, torch.tensor([10, 500]), context)
    factors = add_lora(unet, rank=4, alpha=4)
    assert all(p.requires_grad for p in factors)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    torch.testing.assert_close(unet(x, torch.tensor([10, 500]), context), reference)  # B = 0 at the start
    with torch.no_grad():
        for p in factors:
            p.add_(0.05 * torch.randn_like(p))
    adapted = unet(x, torch.tensor([10, 500]), context)
    merge_lora(unet)
    assert not any("lora_" in k for k in unet.state_dict())
    torch.testing.assert_close(unet(x, torch.tensor([10, 500]), context), adapted, rtol=1e-4, atol=1e-5)
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "out_proj") for k in changed)


def _trained_looking_unet():
    """A small UNet whose every parameter is non-zero, and an input: MONAI starts its output convolutions at zero,
    which no trained base has (a zero layer would hide whether a shift reaches the output)."""
    torch.manual_seed(0)
    unet = RadsynthUNet(channels=(16, 32, 32), norm_num_groups=8, num_head_channels=8, cross_attention_dim=32)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.05)
    return unet, (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 32))


def test_a_domain_embedding_trains_one_vector_of_the_timestep_embedding_and_starts_at_the_base():
    unet, (x, t, context) = _trained_looking_unet()
    reference = unet(x, t, context)
    (shift,) = add_domain_embedding(unet)
    assert shift.shape == (16 * 4,)  # MONAI's time_embed_dim: channels[0] * 4
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == ["net.time_embed.2.bias"]
    torch.testing.assert_close(unet(x, t, context), reference)  # trained from where the base left it
    unet(x, t, context).square().mean().backward()
    assert shift.grad.abs().sum() > 0  # every residual block reads it
    assert all(p.grad is None for n, p in unet.named_parameters() if p is not shift)


def test_block_shifts_train_the_domain_embedding_and_every_residual_block_s_shift_and_start_at_the_base():
    unet, (x, t, context) = _trained_looking_unet()
    reference = unet(x, t, context)
    shifts = add_block_shifts(unet)
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]
    blocks = [n for n, _ in unet.named_modules() if n.endswith(".time_emb_proj")]
    assert len(blocks) >= 7  # down, middle and up residual blocks
    assert sorted(trained) == sorted(["net.time_embed.2.bias", *(f"{n}.bias" for n in blocks)])
    assert sum(s.numel() for s in shifts) == 16 * 4 + sum(unet.get_submodule(n).out_features for n in blocks)
    torch.testing.assert_close(unet(x, t, context), reference)
    unet(x, t, context).square().mean().backward()
    assert all(s.grad.abs().sum() > 0 for s in shifts)  # every block's shift moves the output
    embedding_only = torch.nn.Module()
    embedding_only.time_embed = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.SiLU(), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no residual block"):
        add_block_shifts(embedding_only)


def test_a_domain_embedding_finds_a_diffusers_unet_s_timestep_embedding_and_refuses_a_model_without_one():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), down_block_types=(
        "DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, layers_per_block=1, attention_head_dim=4)
    (shift,) = add_domain_embedding(unet)
    assert shift is unet.time_embedding.linear_2.bias
    assert len(add_block_shifts(unet)) == 1 + sum(1 for n, _ in unet.named_modules() if n.endswith("time_emb_proj"))
    with pytest.raises(ValueError, match="no timestep embedding"):
        add_domain_embedding(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("method", ["lora", "domain_embedding", "block_shifts", "full"])
def test_finetuning_leaves_the_base_folder_intact_and_writes_a_loadable_model(base_model, tmp_path, method):
    run, base = base_model
    digest_before = folder_digest(base.model_dir)
    config = tiny_config(run, f"finetune.from={base.model_dir}", "finetune.filter={finding: effusion}",
                         f"finetune.method={method}", "finetune.max_steps=4", "finetune.learning_rate=0.01")
    result = finetune(config, progress=False)
    assert folder_digest(base.model_dir) == digest_before
    assert result.base_model_hash == base.model_hash and result.model_hash != base.model_hash
    assert 1 <= result.cases <= 50
    tuned = load_file(str(result.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(base.model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert tuned.keys() == original.keys()  # a plain UNet: LoRA merged, nothing extra
    changed = {k for k in tuned if not torch.equal(tuned[k], original[k])}
    if method == "lora":
        assert changed and all(k.rsplit(".", 2)[-2] in ("to_q", "to_k", "to_v", "out_proj") for k in changed)
    elif method == "domain_embedding":
        assert changed == {"net.time_embed.2.bias"}
    elif method == "block_shifts":
        assert "net.time_embed.2.bias" in changed and len(changed) > 1
        assert all(k == "net.time_embed.2.bias" or k.endswith(".time_emb_proj.bias") for k in changed)
    else:
        assert any(k.rsplit(".", 2)[-2] not in ("to_q", "to_k", "to_v", "out_proj") for k in changed)
    assert "Fine-tuned" in (result.model_dir / "README.md").read_text()
    out = generate(config, result.model_dir, 2, tmp_path / "samples", progress=False)
    assert out.model_hash == result.model_hash


def test_a_finetune_generates_in_the_local_data_s_units_not_the_base_s(base_model, tmp_path):
    run, base = base_model
    config = tiny_config(tmp_path, f"finetune.from={base.model_dir}", "finetune.max_steps=1",
                         "data.preprocess.intensity.percentiles=[10, 90]")
    local = ingest(config, progress=False).summary["intensity_train"]
    result = finetune(config, progress=False)
    index = json.loads((result.model_dir / "model_index.json").read_text())
    base_index = json.loads((base.model_dir / "model_index.json").read_text())
    assert (index["intensity_low"], index["intensity_high"]) == (local["low"], local["high"])
    assert (index["intensity_low"], index["intensity_high"]) != (base_index["intensity_low"],
                                                                 base_index["intensity_high"])
    assert index["modality"] == "xray"


def test_a_fine_tune_with_masks_trains_a_controlnet_beside_what_it_saved_and_draws_pairs_from_it(base_model,
                                                                                                tmp_path):
    from radsynth.generators.controlnet import RadsynthControlNet
    from radsynth.pipelines.data.phantoms.chest_xray import LABEL_NAMES
    from radsynth.pipelines.sampling.generate import load_pipeline

    run, base = base_model
    config = tiny_config(run, f"finetune.from={base.model_dir}", "finetune.filter={finding: effusion}",
                         "finetune.max_steps=1", "conditioning.use_masks=true", "sampling.pairs=true",
                         "controlnet.max_steps=2", "controlnet.validate_every=null", "controlnet.learning_rate=0.01")
    result = finetune(config, progress=False)
    loaded = load_pipeline(result.model_dir, config, progress=False)
    assert isinstance(loaded.mask_controlnet, RadsynthControlNet)
    assert loaded.mask_controlnet.num_labels == len(LABEL_NAMES)  # the phantom's whole vocabulary
    # Trained: its zero convolutions (where a new ControlNet starts) have moved.
    assert any(parameter.any() for parameter in loaded.mask_controlnet.net.controlnet_mid_block.parameters())
    assert json.loads((result.model_dir / "compute.json").read_text())["parts"]["controlnet"]["steps"] == 2
    out = generate(config, result.model_dir, 2, tmp_path / "pairs", progress=False)
    assert len(list(out.sample_dir.glob("*_label.png"))) == 2


def test_a_filter_that_matches_no_case_is_a_user_error(base_model):
    run, base = base_model
    config = tiny_config(run, f"finetune.from={base.model_dir}", "finetune.filter={finding: unicorn}")
    with pytest.raises(UserInputError, match="no train-split case matches"):
        finetune(config, progress=False)


def test_a_saved_model_loads_in_a_fresh_process_that_imports_only_the_pipeline(base_model):
    """diffusers loads components only from already-imported modules: the pipeline module must import them."""
    import subprocess
    import sys

    _, base = base_model
    code = ("from radsynth.pipelines.sampling.text_to_image import RadsynthTextToImagePipeline as P; "
            "from radsynth.pipelines.sampling.pipeline import model_hash; "
            f"print(model_hash(P.from_pretrained({str(base.model_dir)!r}, use_safetensors=True)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip().splitlines()[-1] == base.model_hash
