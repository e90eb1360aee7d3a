"""A sentence encoder with a mean-pooling, cosine classification head.

This file is self-contained (torch and transformers only) because seedtune copies it next to
every fine-tuned encoder classifier it saves, so that

    AutoModelForSequenceClassification.from_pretrained(final_dir, trust_remote_code=True)

loads the whole classifier without seedtune installed.

logits = W normalize(mean_pool(encoder(x))) + b. seedtune initialises the rows of W to
``scale`` times the normalised embeddings of the label words, so the untrained classifier is the
zero-shot "nearest label description" classifier of a sentence-embedding model: zeroth-order
training starts from zero-shot quality instead of from a random head, which it handles badly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class NormalizedMeanPool(nn.Module):
    """The L2-normalised mean of the hidden states over the tokens the mask keeps."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


class MeanPoolingClassifier(PreTrainedModel):
    """encoder -> masked mean over tokens -> L2 normalise -> linear head."""

    base_model_prefix = "seedtune_classifier"  # not an attribute: keys load as they are saved
    supports_gradient_checkpointing = False
    # Attention runs inside the wrapped encoder, which chose its own implementation.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config, encoder: nn.Module | None = None):
        super().__init__(config)
        if encoder is None:
            try:
                encoder = AutoModel.from_config(config, add_pooling_layer=False)
            except TypeError:  # encoders without a pooler option
                encoder = AutoModel.from_config(config)
        # Stored under the encoder's own prefix ("bert", "roberta", ...), so the saved weights are
        # "bert.embeddings..." and plain AutoModel.from_pretrained loads the tuned encoder too.
        self.encoder_name = getattr(type(encoder), "base_model_prefix", "") or "backbone"
        self.add_module(self.encoder_name, encoder)
        self.pool = NormalizedMeanPool()  # a module of its own: with the encoder frozen, a frozen prefix
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @property
    def encoder(self) -> nn.Module:
        return getattr(self, self.encoder_name)

    def _init_weights(self, module: nn.Module) -> None:
        # Weights come from the pretrained encoder and the label words, never from here.
        pass

    def embed(self, input_ids, attention_mask, token_type_ids=None, position_ids=None) -> torch.Tensor:
        """The normalised mean-pooled sentence embedding. ``position_ids`` of shape (batch, length)
        make the position lookup per example, which per-example gradients (Opacus) need."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.pool(self.encoder(**kwargs).last_hidden_state, attention_mask)

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, position_ids=None, **unused):
        logits = self.classifier(self.embed(input_ids, attention_mask, token_type_ids, position_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
