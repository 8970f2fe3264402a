"""Model configuration: one frozen dataclass, saved in every checkpoint and carried into exports.

Dimension letters used across ``persrec.models``: B batch, N sequence, M memory tokens,
L layers, H heads, Dh head width, D model width, I number of items (+1 for padding id 0).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .items import ItemRepr, NewItemIds


class Architecture(str, enum.Enum):
    """Backbone family."""

    HSTU = "hstu"
    SASREC = "sasrec"


class MemoryPolicy(str, enum.Enum):
    """How history enters the memory tokens (see the README's model section).

    RECOMPRESS: paper layout ``[H | T | R]``; the memory is recomputed from the last aged-out items.
    INCREMENTAL: ``[S1 | T | S2 | T | ... | R]``; each token block reads the previous block and one
    segment, so serving folds a new segment into the stored memory without the raw history.
    """

    RECOMPRESS = "recompress"
    INCREMENTAL = "incremental"


@dataclass(frozen=True)
class ModelConfig:
    num_items: int  # item ids are 1..num_items; 0 is padding
    architecture: Architecture = Architecture.HSTU
    dim: int = 50  # D: embedding and residual width
    num_layers: int = 2  # L
    num_heads: int = 1  # H
    head_dim: int = 50  # Dh: width of each head's q, k, v and u (published ML-1M: dqk = dv = 50)
    max_len: int = 200  # longest item sequence seen in training; also the attention normaliser
    dropout: float = 0.2
    num_memory_tokens: int = 0  # M: learnable memory tokens; 0 = plain full-sequence model
    recent_len: int = 50  # items served from the raw recent window (the rest goes to memory)
    policy: MemoryPolicy = MemoryPolicy.RECOMPRESS
    # The fold cadence: history items per token block in training, and per fold in the stream
    # (a window folds whole segments of this length; export and worker take it from here)
    segment_len: int = 50
    # INCREMENTAL: a fold's tokens start from the previous memory, not from the shared tokens
    # alone (a learned projection of its top layer's keys and values is added to them). A memory
    # holds each layer's keys and values, made from the layers below; without the carry, a fold
    # reads the previous memory only through those layers, so the memory of an L-layer model
    # forgets every segment but its last L - 1 (tests/models/test_lifelong.py). With it, the
    # chain reaches back to a user's first event (a recurrent memory). Trained segment by
    # segment: ``history=lifelong`` with ``fold_grad >= 1``.
    memory_carry: bool = False
    time_bias: bool = False  # add a relative time bias (needs timestamps)
    num_time_buckets: int = 64  # buckets ln(|t_q - t_k|) / 0.301 (clamped), i.e. factors of ~1.35 s
    request_time: bool = False  # t_q = time of the event the query predicts (official), not its own
    temperature: float = 0.05  # sampled-softmax temperature on cosine similarities
    num_negatives: int = 128  # uniform negatives in the sampled softmax (see train.Negatives)
    # Details where the official HSTU code differs from ours (models.recipe names both sets):
    norm_affine: bool = True  # LayerNorms with a learned scale and shift (official: none)
    projection_bias: bool = True  # the uvqk projection has a bias (official: none)
    official_init: bool = False  # uvqk ~ N(0, .02), output projection xavier_uniform
    bias_init_std: float = 0.0  # relative position/time biases start at N(0, std) (official .02)
    attention_norm: int = 0  # attention divided by this constant; 0 = max_len (official 211)
    abs_positions: bool = False  # learned absolute position embedding from the row start
    # items as vectors (models.items): learned id embeddings, projected text embeddings of
    # text_dim numbers (a frozen sentence encoder's), or both summed
    item_repr: ItemRepr = ItemRepr.ID
    text_dim: int = 0
    # id+text, in training: each step drops the id part of a random share of the items (the
    # model sees them by text alone, as it will see an item published after training)
    id_dropout: float = 0.0
    # id+text: the id part of an item the model was not trained on (published after training):
    # zero, or the id its text predicts (a ridge map from the trained items' texts to their ids,
    # fitted wherever training evaluates or saves the model: models.items.fit_text_to_id)
    new_item_ids: NewItemIds = NewItemIds.ZERO
    # the encoder that made the text embeddings (models.text.encoder_named): what a served model
    # encodes new items with; "" for a model trained on embeddings of an unnamed encoder
    text_encoder: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", Architecture(self.architecture))
        object.__setattr__(self, "policy", MemoryPolicy(self.policy))
        object.__setattr__(self, "item_repr", ItemRepr(self.item_repr))
        object.__setattr__(self, "new_item_ids", NewItemIds(self.new_item_ids))
        if self.item_repr.has_text and self.text_dim < 1:
            raise ValueError(f"item_repr {self.item_repr.value!r} needs text_dim >= 1")
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.id_dropout and self.item_repr is not ItemRepr.ID_TEXT:
            raise ValueError("id_dropout needs item_repr 'id+text' (an item must keep its text)")
        if self.new_item_ids is NewItemIds.TEXT and self.item_repr is not ItemRepr.ID_TEXT:
            raise ValueError("new_item_ids 'text' needs item_repr 'id+text'")
        if self.num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {self.num_items}")
        if self.num_memory_tokens < 0:
            raise ValueError("num_memory_tokens must be >= 0")
        if self.num_memory_tokens and self.architecture is not Architecture.HSTU:
            raise ValueError("memory tokens are implemented for the HSTU backbone only")
        if self.recent_len < 1 or self.segment_len < 1 or self.max_len < 2:
            raise ValueError("recent_len, segment_len must be >= 1 and max_len >= 2")
        if self.architecture is Architecture.SASREC and self.dim % self.num_heads:
            raise ValueError("SASRec needs dim divisible by num_heads")
        if self.abs_positions and self.num_memory_tokens:
            # A memory row replaces a history of any length, so "position from the row start"
            # of the recent items would depend on history the serving path no longer has.
            raise ValueError("abs_positions needs num_memory_tokens=0")
        if self.memory_carry and (not self.num_memory_tokens or self.policy is not MemoryPolicy.INCREMENTAL):
            raise ValueError("memory_carry needs memory tokens and the INCREMENTAL policy")
        if self.request_time and not self.time_bias:
            raise ValueError("request_time needs time_bias")
        if self.num_time_buckets < 1 or self.attention_norm < 0:
            raise ValueError("num_time_buckets must be >= 1 and attention_norm >= 0")

    @property
    def has_memory(self) -> bool:
        return self.num_memory_tokens > 0

    @property
    def memory_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one user's memory: ``[L, 2, M, H, Dh]`` (keys at index 0, values at 1)."""
        return (self.num_layers, 2, self.num_memory_tokens, self.num_heads, self.head_dim)

    @property
    def attention_divisor(self) -> int:
        """The constant the pointwise attention is divided by (never the query count, so a
        sequence split into memory + recent gives the scores of one pass over all of it)."""
        return self.attention_norm or self.max_len

    @property
    def max_distance(self) -> int:
        """Largest relative position with its own bias; longer distances share the last one."""
        return self.max_len + 2 * self.num_memory_tokens

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["architecture"] = self.architecture.value
        d["policy"] = self.policy.value
        d["item_repr"] = self.item_repr.value
        d["new_item_ids"] = self.new_item_ids.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Fields missing from ``d`` take their defaults, which are the behaviour of the
        checkpoints written before those fields existed."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def fingerprint(self) -> str:
        """Stable hash of the configuration (part of a model version id)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
