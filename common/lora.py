"""LoRA adapters through ``peft``: a low-rank trainable subset for zeroth-order training.

The adapters are injected into the base model before the task wraps it, with a seeded
initialisation (A from peft's Kaiming init under ``model.init_seed``, B = 0), so every party of a
run builds the same adapters from the config alone and the run's log replays onto them. Only the
adapter matrices (and the ``prune.always`` tensors, e.g. a classification head) are trainable.

Saving writes the adapters in peft's own format (``adapter_config.json`` and
``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained``) and, beside them, the
model with the adapters merged, which plain ``from_pretrained`` loads.

Zeroth-order on LoRA moves far fewer coordinates per step, so it needs a larger step size than
full-parameter ZO (ANCHORS.md); with B = 0 a perturbation of A alone changes nothing at first.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

ADAPTER_DIR = "adapter"


def add_lora(model: nn.Module, *, rank: int, alpha: float, targets: tuple[str, ...], seed: int) -> nn.Module:
    """``model`` with LoRA adapters of rank ``rank`` on modules ``targets`` (empty: peft's
    default for the model type), initialised from ``seed`` without touching the global RNG."""
    from peft import LoraConfig, get_peft_model  # imported on use: it costs every process ~1 s otherwise

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets) or None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 calls a transformers API that transformers 5 deprecates; nothing to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        wrapped = get_peft_model(model, config)
    for param in wrapped.parameters():
        param.requires_grad_(False)  # forward passes only
    return wrapped.eval()


def is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def find_adapted(module: nn.Module) -> nn.Module | None:
    """The peft model inside ``module``, if any (none can exist before peft is imported)."""
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    return next((m for m in module.modules() if isinstance(m, peft.PeftModel)), None)


def save_adapter(module: nn.Module, directory: Path) -> None:
    """peft's own adapter files for the adapters inside ``module``, the same bytes in every process.

    peft keeps ``target_modules`` as a set, which JSON writes in the order of the process's string
    hash seed; it is written sorted so that an export equals the run's ``final/`` file for file.
    """
    adapted = find_adapted(module)
    configs = list(adapted.peft_config.values())
    kept = [config.target_modules for config in configs]
    for config in configs:
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    try:
        adapted.save_pretrained(directory / ADAPTER_DIR)
    finally:
        for config, targets in zip(configs, kept):
            config.target_modules = targets


def merged_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose adapted model has its adapters merged into plain weights."""
    from peft import PeftModel

    merged = copy.deepcopy(module)
    for parent in list(merged.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, PeftModel):
                setattr(parent, child_name, child.merge_and_unload())
    if isinstance(merged, PeftModel):
        merged = merged.merge_and_unload()
    return merged
