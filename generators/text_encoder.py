"""Text conditioning: prompts -> token hidden states (B, T, D) for the diffusion UNet's cross-attention.

Two encoders share one interface, `encode(prompts) -> (B, max_length, embed_dim)` on the module's device:

- `RadsynthTextEncoder` (default): a small transformer trained jointly with the diffusion model, over a
  word-level `WordTokenizer` fitted on the training captions. The vocabulary is part of the model's config,
  so `save_pretrained` / `from_pretrained` carry the tokenizer with the weights and nothing else is needed to
  encode a prompt later.
- `PretrainedTextEncoder` (optional): a frozen Hugging Face encoder read from a local folder. transformers
  is imported only here, only when used, and never downloads.

`load_text_encoder` picks one from the `conditioning` config section's values.
"""

from __future__ import annotations

import contextvars
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from radsynth.configs.errors import UserInputError

__all__ = [
    "BUNDLED_ENCODER",
    "SPECIAL_TOKENS",
    "PretrainedTextEncoder",
    "RadsynthTextEncoder",
    "WordTokenizer",
    "load_text_encoder",
]

# A saved PretrainedTextEncoder's tokenizer and architecture, inside its component folder.
BUNDLED_ENCODER = "hf_encoder"
# Set by PretrainedTextEncoder.from_pretrained for the constructor diffusers calls beneath it (per thread).
_LOADING_BUNDLED: contextvars.ContextVar[str | None] = contextvars.ContextVar("loading_bundled", default=None)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3, in this order, at the head of every vocabulary

# A token is a number (decimals kept whole: "0.52", "8"), a run of letters (underscores included, so attribute
# values such as "liver_tumour" stay one word), or a single other symbol. Digits and letters always split, so
# "8mm" and "8 mm" give the same tokens, and "64-year-old" gives 64 / - / year / - / old.
_TOKEN_PATTERN = re.compile(r"\d+(?:\.\d+)?|[^\W\d]+|[^\w\s]")


class WordTokenizer:
    """Lower-cased word-level tokenizer with a fixed output length.

    Every encoded prompt is ``<bos> tokens <eos> <pad>...`` of exactly `max_length` ids. A prompt that is too
    long loses words from its end, but keeps its ``<eos>``: the encoder then always sees where the prompt stops,
    whether or not it was cut. The empty (null) prompt is ``<bos> <eos>`` plus padding.
    """

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3  # positions of SPECIAL_TOKENS

    def __init__(self, vocab: Sequence[str], max_length: int) -> None:
        vocab = list(vocab)
        if tuple(vocab[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with the special tokens {SPECIAL_TOKENS}, got {vocab[:4]}")
        if len(set(vocab)) != len(vocab):
            duplicates = sorted(word for word, count in Counter(vocab).items() if count > 1)
            raise ValueError(f"vocabulary has duplicate entries: {duplicates[:10]}")
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <bos> and <eos> (>= 2), got {max_length}")
        self.vocab = vocab
        self.max_length = int(max_length)
        self._ids = {word: index for index, word in enumerate(vocab)}

    @classmethod
    def fit(
        cls, captions: Iterable[str], max_length: int, max_vocab: int = 4096, min_cases: int = 1
    ) -> WordTokenizer:
        """The vocabulary of `captions`: words found in at least `min_cases` captions, the most widespread first.

        The vocabulary is saved with the model, so a word of one case's report (a name, a record number) must not
        get into it: with `min_cases` k, only words that k cases share do. `max_vocab` counts the four special
        tokens. Ties are broken alphabetically, so the result depends on the captions' words, never their order.
        """
        if max_vocab <= len(SPECIAL_TOKENS):
            raise ValueError(f"max_vocab must exceed the {len(SPECIAL_TOKENS)} special tokens, got {max_vocab}")
        counts = Counter(token for caption in captions for token in set(cls.tokenize(caption)))
        ranked = sorted((item for item in counts.items() if item[1] >= min_cases), key=lambda item: (-item[1], item[0]))
        words = [word for word, _ in ranked[: max_vocab - len(SPECIAL_TOKENS)]]
        return cls([*SPECIAL_TOKENS, *words], max_length)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        # Special tokens cannot come out of here ("<pad>" splits into < / pad / >), so user text never forges one.
        return _TOKEN_PATTERN.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """(input_ids LongTensor (B, max_length), attention_mask BoolTensor (B, max_length), True on real tokens)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        input_ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            words = self.tokenize(prompt)[: self.max_length - 2]
            ids = [self.bos_id, *(self._ids.get(word, self.unk_id) for word in words), self.eos_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
        return input_ids, input_ids != self.pad_id

    def decode(self, input_ids: Sequence[int] | Tensor) -> str:
        """The words behind one row of ids, special tokens dropped (for logs and debugging)."""
        ids = input_ids.tolist() if isinstance(input_ids, Tensor) else list(input_ids)
        return " ".join(self.vocab[index] for index in ids if index >= len(SPECIAL_TOKENS))


class RadsynthTextEncoder(ModelMixin, ConfigMixin):
    """A small pre-norm transformer over word tokens: learned token + position embeddings, a final LayerNorm.

    Padding is masked as attention keys, so a prompt's hidden states at its real positions depend on its own
    tokens only, never on how much padding or which batch-mates it has. Outputs at padded positions are
    kept (not zeroed): the UNet's cross-attention sees all `max_length` positions.
    """

    @register_to_config
    def __init__(
        self,
        vocab: list[str],
        max_length: int = 64,
        embed_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self._tokenizer = WordTokenizer(vocab, max_length)
        self.token_embedding = nn.Embedding(len(vocab), embed_dim, padding_idx=WordTokenizer.pad_id)
        self.position_embedding = nn.Embedding(max_length, embed_dim)
        # No dropout: hidden states are a deterministic function of the prompt in train and eval mode alike;
        # the trainer regularises conditioning by dropping whole prompts (classifier-free guidance).
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, dim_feedforward=4 * embed_dim, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        # No nested tensors: torch turns them off for pre-norm layers anyway (with a warning), and where they
        # apply they zero the padded positions at inference only, so outputs would differ from training.
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(embed_dim)
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        # Small embeddings (as BERT / CLIP) so that the residual stream starts near the LayerNorms' range.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        with torch.no_grad():
            self.token_embedding.weight[WordTokenizer.pad_id].zero_()

    @property
    def tokenizer(self) -> WordTokenizer:
        return self._tokenizer

    @property
    def embed_dim(self) -> int:
        """Width of the hidden states: the UNet's `cross_attention_dim`."""
        return self.config.embed_dim

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Hidden states (B, T, embed_dim) for ids (B, T), T <= max_length; mask True on real tokens."""
        if input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed max_length {self.config.max_length}")
        if attention_mask is None:
            attention_mask = input_ids != WordTokenizer.pad_id
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.token_embedding(input_ids) + self.position_embedding(positions)
        hidden = self.layers(hidden, src_key_padding_mask=~attention_mask.bool())
        return self.final_norm(hidden)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask on this encoder's device: ``forward``'s inputs."""
        input_ids, attention_mask = self._tokenizer.encode(prompts)
        return input_ids.to(self.device), attention_mask.to(self.device)

    def encode(self, prompts: str | Sequence[str]) -> Tensor:
        return self(*self.tokenize(prompts))


class PretrainedTextEncoder(ModelMixin, ConfigMixin):
    """A frozen Hugging Face text encoder (BERT-like, CLIP or T5) and its tokenizer, from a local folder.

    Never trained: every parameter has requires_grad False and the network stays in eval mode (no dropout)
    even inside a model that is training. Saved with a pipeline, the component folder is self-contained: the
    weights as any component's, and the tokenizer and architecture in `BUNDLED_ENCODER` beside them. The folder
    it was first read from is not part of the model (`ignore_for_config`): a model folder loads on another machine,
    its hash does not depend on a path, and no local path is written into a folder that may be shared.
    """

    ignore_for_config = ["pretrained_path", "tokenizer_path"]

    @register_to_config
    def __init__(self, pretrained_path: str | None = None, max_length: int = 64,
                 tokenizer_path: str | None = None) -> None:
        super().__init__()
        bundled = _LOADING_BUNDLED.get()
        if pretrained_path is None and bundled is None:
            raise ValueError("PretrainedTextEncoder needs pretrained_path (a local Hugging Face folder)")
        # Loading a saved encoder: the architecture comes from the bundle, the weights from the component's own
        # safetensors, so they are stored once.
        # tokenizer_path: where the tokenizer is when it is not beside the model (a diffusers folder's tokenizer/).
        self.tokenizer, self.source_config, self.model = _load_local_hf_encoder(
            Path(pretrained_path or bundled), weights=pretrained_path is not None,
            tokenizer_path=Path(tokenizer_path) if pretrained_path and tokenizer_path else None)
        self.model.requires_grad_(False)
        self.model.eval()

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        super().save_pretrained(save_directory, **kwargs)
        bundle = Path(save_directory) / BUNDLED_ENCODER
        self.tokenizer.save_pretrained(bundle)
        self.source_config.save_pretrained(bundle)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> PretrainedTextEncoder:
        folder = Path(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        bundle = folder / BUNDLED_ENCODER
        if not (bundle / "config.json").is_file():
            raise UserInputError(folder, f"a saved pretrained text encoder without its {BUNDLED_ENCODER}/ (tokenizer "
                                 "and architecture)", "a folder written by this radsynth's save_pretrained")
        token = _LOADING_BUNDLED.set(str(bundle))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            _LOADING_BUNDLED.reset(token)

    @property
    def embed_dim(self) -> int:
        """Width of the hidden states: the UNet's `cross_attention_dim`."""
        return self.model.config.hidden_size

    def train(self, mode: bool = True) -> PretrainedTextEncoder:
        super().train(mode)
        self.model.eval()  # frozen: dropout stays off whatever the enclosing model does
        return self

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask on this encoder's device: ``forward``'s inputs."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.config.max_length,
            return_tensors="pt",
        )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def encode(self, prompts: str | Sequence[str]) -> Tensor:
        return self(*self.tokenize(prompts))


def _load_local_hf_encoder(path: Path, weights: bool = True,
                           tokenizer_path: Path | None = None) -> tuple[object, object, nn.Module]:
    """(tokenizer, the folder's model config, the text tower); weights False builds the architecture only."""
    for folder in (path, tokenizer_path or path):
        if not folder.is_dir():
            raise UserInputError(
                folder, "text encoder folder not found", "a local Hugging Face model folder; nothing is downloaded"
            )
    # Imported here: transformers is heavy and only this optional encoder needs it.
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        # use_kernels=False: since transformers 5.25 a model swaps in kernels from the Hugging Face Hub by default,
        # which is network at run time (and fails on the meta device diffusers builds components on).
        model = (AutoModel.from_pretrained(path, local_files_only=True, use_kernels=False) if weights
                 else AutoModel.from_config(config))
    except (OSError, ValueError, KeyError) as error:
        raise UserInputError(
            path, f"cannot load a Hugging Face text encoder and tokenizer from it ({error})",
            "a local folder written by transformers' save_pretrained (config.json, weights, tokenizer files)",
        ) from error
    # Only the text tower's token states are wanted: CLIP folders load a dual encoder, T5 an encoder-decoder.
    if hasattr(model, "text_model"):
        model = model.text_model
    elif getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return tokenizer, config, model


def load_text_encoder(
    kind: str,
    pretrained_path: str | Path | None = None,
    captions: Iterable[str] | None = None,
    max_length: int = 64,
    embed_dim: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    max_vocab: int = 4096,
    min_cases: int = 1,
) -> RadsynthTextEncoder | PretrainedTextEncoder:
    """The encoder named by `conditioning.text_encoder`.

    "trained": a fresh `RadsynthTextEncoder` over a tokenizer fitted on `captions` (pass the training split's
    prompts as `render_prompt` writes them, so attribute words are in the vocabulary). "pretrained": the
    frozen encoder in `pretrained_path`; `embed_dim` and the vocabulary arguments do not apply, its width is
    `encoder.embed_dim`.
    """
    if kind == "trained":
        if captions is None:
            raise ValueError("a trained text encoder needs the training captions to fit its tokenizer")
        tokenizer = WordTokenizer.fit(captions, max_length, max_vocab=max_vocab, min_cases=min_cases)
        return RadsynthTextEncoder(
            vocab=tokenizer.vocab, max_length=max_length, embed_dim=embed_dim,
            num_layers=num_layers, num_heads=num_heads,
        )
    if kind == "pretrained":
        if not pretrained_path:
            raise UserInputError(
                "conditioning.pretrained_path", "missing", "required when text_encoder is 'pretrained'"
            )
        return PretrainedTextEncoder(pretrained_path=str(pretrained_path), max_length=max_length)
    raise UserInputError("conditioning.text_encoder", f"unknown encoder {kind!r}", "one of: trained, pretrained")
