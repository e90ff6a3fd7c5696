"""The `text` baseline: the text encoder alone, pooled, then a linear head.

Video and audio are ignored. This is the model A-MESS starts from (its fusion gate
is small at initialisation), so the two are compared on equal terms.
"""

from __future__ import annotations

from torch import nn

from amess.config import Config
from amess.data.batch import Batch
from amess.models.base import IntentModel, IntentOutput, register_method
from amess.models.encoders import TextEncoder


@register_method("text")
class TextClassifier(IntentModel):
    """encoder(text) -> pool (`model.pooling`) -> dropout -> Linear(d, C)."""

    reads = ("text",)

    def __init__(self, *, config: Config, encoder: TextEncoder, num_labels: int, **_):
        super().__init__()
        self.encoder = encoder
        self.pooling = config.model.pooling
        self.dropout = nn.Dropout(config.model.dropout)
        self.head = nn.Linear(encoder.hidden_size, num_labels)

    def forward(self, batch: Batch) -> IntentOutput:
        hidden = self.encoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              token_type_ids=batch.token_type_ids)  # (b, n, d)
        pooled = self.encoder.pool(hidden, batch.attention_mask, self.pooling)  # (b, d)
        return IntentOutput(logits=self.head(self.dropout(pooled)), pooled=pooled)
