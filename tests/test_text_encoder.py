"""Text conditioning: the word tokenizer, the trained encoder, the frozen local Hugging Face encoder, prompts."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from radsynth.configs.errors import UserInputError  # noqa: E402
from radsynth.generators.prompts import age_bin, parse_prompt, render_prompt  # noqa: E402
from radsynth.generators.text_encoder import (  # noqa: E402
    BUNDLED_ENCODER,
    SPECIAL_TOKENS,
    PretrainedTextEncoder,
    RadsynthTextEncoder,
    WordTokenizer,
    load_text_encoder,
)

PAD, UNK, BOS, EOS = range(4)
CAPTIONS = [
    "PA chest radiograph of a 64-year-old female. Solitary 8 mm nodule in the left upper zone.",
    "AP chest radiograph of a 71-year-old male. Small right pleural effusion.",
    "PA chest radiograph of a 35-year-old male. Lungs clear.",
]


def tiny_encoder(max_length: int = 16, seed: int = 0) -> RadsynthTextEncoder:
    torch.manual_seed(seed)
    tokenizer = WordTokenizer.fit(CAPTIONS, max_length)
    return RadsynthTextEncoder(vocab=tokenizer.vocab, max_length=max_length, embed_dim=16, num_layers=2, num_heads=2)


# ---------------------------------------------------------------- tokenizer


def test_fit_ranks_by_count_then_alphabet_whatever_the_caption_order():
    captions = ["b a", "c a", "d"]
    tokenizer = WordTokenizer.fit(captions, max_length=8)
    assert tokenizer.vocab == [*SPECIAL_TOKENS, "a", "b", "c", "d"]
    assert WordTokenizer.fit(list(reversed(captions)), max_length=8).vocab == tokenizer.vocab
    assert WordTokenizer.fit(["d", "a c", "a b"], max_length=8).vocab == tokenizer.vocab
    # max_vocab counts the specials; the cut keeps the most frequent, then the alphabetically first.
    assert WordTokenizer.fit(captions, max_length=8, max_vocab=6).vocab == [*SPECIAL_TOKENS, "a", "b"]
    assert WordTokenizer.fit(captions, max_length=8, min_cases=2).vocab == [*SPECIAL_TOKENS, "a"]


def test_a_word_repeated_in_one_case_is_not_kept_and_words_k_cases_share_are():
    """min_cases counts cases, not occurrences: a name written ten times in one report stays out of the model."""
    captions = ["cough; Patient Roe Roe Roe Roe Roe Roe MRN 4711"] + [f"cough case {i}" for i in range(4)]
    vocab = WordTokenizer.fit(captions, max_length=16, min_cases=5).vocab
    assert vocab == [*SPECIAL_TOKENS, "cough"]
    assert "roe" in WordTokenizer.fit(captions, max_length=16, min_cases=1).vocab


def test_tokenize_lowercases_and_splits_numbers_words_and_punctuation():
    tokenize = WordTokenizer.tokenize
    assert tokenize("64-year-old") == ["64", "-", "year", "-", "old"]
    assert tokenize("8 mm") == tokenize("8mm") == ["8", "mm"]
    assert tokenize("Ratio 0.52.") == ["ratio", "0.52", "."]
    assert tokenize("finding: liver_tumour; age: 60-69.") == [
        "finding", ":", "liver_tumour", ";", "age", ":", "60", "-", "69", "."
    ]
    assert tokenize("PA  Chest\nfilm") == ["pa", "chest", "film"]
    # A prompt cannot forge a special token.
    assert tokenize("<pad>") == ["<", "pad", ">"]


def test_encode_pads_masks_and_maps_unknown_words():
    tokenizer = WordTokenizer([*SPECIAL_TOKENS, "nodule", "left"], max_length=6)
    input_ids, attention_mask = tokenizer.encode(["Left nodule", "right nodule"])
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.bool
    assert input_ids.tolist() == [[BOS, 5, 4, EOS, PAD, PAD], [BOS, UNK, 4, EOS, PAD, PAD]]
    assert attention_mask.tolist() == [[True] * 4 + [False] * 2] * 2
    assert tokenizer.decode(input_ids[0]) == "left nodule"


def test_empty_prompt_is_bos_eos_then_padding():
    input_ids, attention_mask = WordTokenizer([*SPECIAL_TOKENS, "a"], max_length=5).encode([""])
    assert input_ids.tolist() == [[BOS, EOS, PAD, PAD, PAD]]
    assert attention_mask.tolist() == [[True, True, False, False, False]]


def test_truncation_drops_trailing_words_but_keeps_eos():
    tokenizer = WordTokenizer([*SPECIAL_TOKENS, "a", "b", "c", "d", "e"], max_length=5)
    input_ids, attention_mask = tokenizer.encode(["a b c d e"])
    assert input_ids.tolist() == [[BOS, 4, 5, 6, EOS]]
    assert attention_mask.all()


def test_tokenizer_rejects_a_malformed_vocabulary():
    with pytest.raises(ValueError, match="special tokens"):
        WordTokenizer(["a", *SPECIAL_TOKENS], max_length=8)
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer([*SPECIAL_TOKENS, "a", "a"], max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        WordTokenizer(list(SPECIAL_TOKENS), max_length=1)


# ---------------------------------------------------------------- trained encoder


def test_encoder_output_shape_and_different_prompts_differ():
    encoder = tiny_encoder().eval()
    hidden = encoder.encode(["left upper zone nodule", "right pleural effusion", ""])
    assert hidden.shape == (3, 16, 16)
    assert encoder.embed_dim == 16
    assert (hidden[0, :6] - hidden[1, :6]).abs().max() > 1e-2
    assert (hidden[0] - hidden[2]).abs().max() > 1e-2


def test_padding_never_changes_the_real_positions():
    encoder = tiny_encoder().eval()
    input_ids, attention_mask = encoder.tokenizer.encode(["solitary nodule in the left upper zone"])
    real = int(attention_mask.sum())
    with torch.no_grad():
        reference = encoder(input_ids, attention_mask)
        # Other ids under the padding mask: the real positions must not see them.
        scrambled = input_ids.clone()
        scrambled[~attention_mask] = torch.randint(4, len(encoder.tokenizer), (int((~attention_mask).sum()),))
        assert torch.allclose(encoder(scrambled, attention_mask)[:, :real], reference[:, :real], atol=1e-6)
        # The same ids unmasked do change them, so the check above is not vacuous.
        assert not torch.allclose(encoder(scrambled, torch.ones_like(attention_mask))[:, :real], reference[:, :real])
        # Less padding (a shorter sequence) leaves them unchanged too.
        assert torch.allclose(encoder(input_ids[:, : real + 1], attention_mask[:, : real + 1])[:, :real],
                              reference[:, :real], atol=1e-6)


def test_batch_mates_do_not_change_a_prompts_hidden_states():
    encoder = tiny_encoder().eval()
    with torch.no_grad():  # eval + no grad: torch's fused inference path
        alone = encoder.encode(["small right effusion"])
    together = encoder.encode(["small right effusion", "pa chest radiograph of a 64-year-old female with a nodule"])
    real = int(encoder.tokenizer.encode(["small right effusion"])[1].sum())
    assert torch.allclose(together[0, :real], alone[0, :real], atol=1e-6)
    # Training mode gives the same states, padded positions included (no dropout, no nested-tensor zeros).
    assert torch.allclose(encoder.train().encode(["small right effusion"]), alone, atol=1e-5)


def test_save_and_load_restore_vocabulary_and_outputs(tmp_path):
    encoder = tiny_encoder().eval()
    encoder.save_pretrained(tmp_path / "text_encoder")
    loaded = RadsynthTextEncoder.from_pretrained(tmp_path / "text_encoder").eval()
    assert loaded.tokenizer.vocab == encoder.tokenizer.vocab
    assert loaded.tokenizer.max_length == encoder.tokenizer.max_length
    prompts = ["left upper zone nodule", "unseenword effusion", ""]
    assert torch.equal(loaded.encode(prompts), encoder.encode(prompts))


def test_gradients_reach_used_token_embeddings_only():
    encoder = tiny_encoder().train()
    encoder.encode(["left nodule"]).pow(2).mean().backward()
    grad = encoder.token_embedding.weight.grad
    vocab = encoder.tokenizer.vocab
    used = {vocab.index(word) for word in ("left", "nodule")} | {BOS, EOS}
    for index in range(len(vocab)):
        touched = bool(grad[index].abs().sum() > 0)
        assert touched == (index in used), vocab[index]


def test_encoder_learns_a_toy_regression():
    encoder = tiny_encoder(seed=1).train()
    prompts = ["left upper zone nodule", "right pleural effusion", "lungs clear", ""]
    targets = torch.randn(len(prompts), encoder.embed_dim, generator=torch.Generator().manual_seed(0))
    optimiser = torch.optim.Adam(encoder.parameters(), lr=1e-2)

    def loss() -> torch.Tensor:
        return (encoder.encode(prompts)[:, 0] - targets).pow(2).mean()

    initial = loss().item()
    for _ in range(30):
        optimiser.zero_grad()
        step_loss = loss()
        step_loss.backward()
        optimiser.step()
    assert loss().item() < 0.5 * initial


def test_encoder_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="divisible"):
        RadsynthTextEncoder(vocab=list(SPECIAL_TOKENS), max_length=8, embed_dim=10, num_heads=4)


def test_factory_fits_a_tokenizer_for_a_trained_encoder():
    encoder = load_text_encoder("trained", captions=CAPTIONS, max_length=12, embed_dim=8, num_heads=2)
    assert isinstance(encoder, RadsynthTextEncoder)
    assert encoder.tokenizer.vocab == WordTokenizer.fit(CAPTIONS, 12).vocab
    assert encoder.encode(["lungs clear"]).shape == (1, 12, 8)
    with pytest.raises(UserInputError, match="conditioning.text_encoder"):
        load_text_encoder("clip", captions=CAPTIONS)
    with pytest.raises(UserInputError, match="conditioning.pretrained_path"):
        load_text_encoder("pretrained")


# ---------------------------------------------------------------- frozen Hugging Face encoder


def test_pretrained_encoder_missing_folder_names_the_path(tmp_path):
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(UserInputError, match="text encoder folder not found") as error:
        load_text_encoder("pretrained", pretrained_path=missing)
    assert str(missing) in str(error.value) and "nothing is downloaded" in str(error.value)


def test_pretrained_encoder_folder_without_a_model_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="cannot load") as error:
        PretrainedTextEncoder(pretrained_path=str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(error.value)


def test_pretrained_encoder_loads_locally_frozen_and_offline(tiny_bert, tmp_path, monkeypatch):
    attempts = []

    def no_network(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    encoder = load_text_encoder("pretrained", pretrained_path=tiny_bert, max_length=10)
    encoder.train()  # a frozen encoder ignores the enclosing model's training mode
    hidden = encoder.encode(["8 mm left nodule", "right effusion", ""])
    assert attempts == []
    assert isinstance(encoder, PretrainedTextEncoder)
    assert hidden.shape == (3, 10, 32) and encoder.embed_dim == 32
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    assert not encoder.model.training and not hidden.requires_grad
    assert (hidden[0] - hidden[1]).abs().max() > 1e-3
    # Deterministic (dropout off, which would move values by ~0.1) and the same after a save/load through
    # diffusers' loader. A batch of one may take other matmul kernels than a batch of three: rounding only.
    torch.testing.assert_close(encoder.encode(["8 mm left nodule"]), hidden[:1], rtol=0, atol=1e-5)
    encoder.save_pretrained(tmp_path / "saved")
    loaded = PretrainedTextEncoder.from_pretrained(tmp_path / "saved")
    assert torch.equal(loaded.encode(["8 mm left nodule", "right effusion", ""]), hidden)
    assert attempts == []


def test_a_saved_pretrained_encoder_is_self_contained(tiny_bert, tmp_path):
    """Saved, the encoder carries its tokenizer and architecture: it loads with its source folder gone, and no
    local path is written into the folder (nor into its config, so a model's hash does not depend on one)."""
    import shutil

    encoder = load_text_encoder("pretrained", pretrained_path=tiny_bert, max_length=10)
    expected = encoder.encode(["8 mm left nodule", "right effusion"])
    encoder.save_pretrained(tmp_path / "saved")
    shutil.rmtree(tiny_bert)
    loaded = PretrainedTextEncoder.from_pretrained(tmp_path / "saved", low_cpu_mem_usage=False)
    assert torch.equal(loaded.encode(["8 mm left nodule", "right effusion"]), expected)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(encoder.config) == {"max_length": 10}
    assert loaded.tokenizer.get_vocab() == encoder.tokenizer.get_vocab()
    for path in (tmp_path / "saved").rglob("*"):
        if path.is_file() and path.suffix != ".safetensors":
            assert str(tiny_bert) not in path.read_text(), path
    # Stored once: the bundle has the architecture and tokenizer, the component's safetensors the weights.
    assert not list((tmp_path / "saved" / BUNDLED_ENCODER).glob("*.safetensors"))


def test_a_saved_pretrained_encoder_without_its_bundle_is_a_user_error(tiny_bert, tmp_path):
    import shutil

    load_text_encoder("pretrained", pretrained_path=tiny_bert).save_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved" / BUNDLED_ENCODER)
    with pytest.raises(UserInputError, match=BUNDLED_ENCODER) as error:
        PretrainedTextEncoder.from_pretrained(tmp_path / "saved")
    assert str(tmp_path / "saved") in str(error.value)


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize(("age", "expected"), [(0, "0-9"), (9, "0-9"), (64, "60-69"), ("64", "60-69"),
                                               (69.9, "60-69"), (70, "70-79"), (89, "80-89"), (90, "90+"),
                                               (104, "90+"), ("unknown", "unknown")])
def test_age_bins_are_decades_with_an_open_top(age, expected):
    assert age_bin(age) == expected


def test_render_prompt_follows_keys_skips_missing_and_appends_text():
    attributes = {"finding": "nodule", "view": "PA", "sex": "F", "age": 64, "side": None, "zone": "",
                  "size": math.nan, "lesion_size_mm": 12.0, "unused": "x"}
    keys = ["finding", "view", "side", "zone", "size", "sex", "age", "lesion_size_mm", "absent"]
    assert render_prompt("Solitary  nodule.\n", attributes, keys) == (
        "finding: nodule; view: PA; sex: F; age: 60-69; lesion_size_mm: 12. Solitary nodule."
    )
    assert render_prompt("text", attributes, ["age", "finding"]) == "age: 60-69; finding: nodule. text"
    assert render_prompt("", {"age": 91}, ["age"]) == "age: 90+."
    assert render_prompt("only text", attributes, []) == "only text"
    assert render_prompt("", {"finding": None}, ["finding"]) == ""


def test_parse_prompt_inverts_render_prompt_and_ignores_free_text():
    attributes = {"finding": "nodule", "sex": "F", "age": 64, "ratio": 0.52}
    keys = ["finding", "sex", "age", "ratio"]
    prompt = render_prompt("Solitary nodule. Left lung.", attributes, keys)
    assert parse_prompt(prompt) == {"finding": "nodule", "sex": "F", "age": "60-69", "ratio": "0.52"}
    assert parse_prompt(render_prompt("", {"finding": "none"}, ["finding"])) == {"finding": "none"}
    assert parse_prompt("A chest radiograph: no findings.") == {}
    assert parse_prompt("") == {}
