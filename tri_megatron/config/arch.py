"""The Tri architecture as one frozen, typed record, with every quantity derived from it.

``ModelArch`` is the only description of a model's shape in the project: presets are ``ModelArch``
values (``tri_megatron.config.presets``), ``--model`` plus architecture flags resolve to one, checkpoints store
``arch.meta()`` in tri_meta.json and conversion reads it back with ``ModelArch.from_meta``. What is
derived from the architecture is a method here, computed once: the padded vocabulary, the exact
parameter count, the architecture part of megatron-core's ``TransformerConfig``, the checkpoint
metadata, the layer pattern of iRoPE and sliding windows, and the Hugging Face config.

This module imports nothing from the rest of the package except the pure HF config mapping, so any
layer may depend on it.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

VOCAB_MULTIPLE = 128
"""The vocabulary is padded to a multiple of this, independent of the layout, so checkpoints reshard."""


@dataclasses.dataclass(frozen=True)
class ModelArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    context_length: int
    """Longest sequence the model is built for (megatron's ``max_position_embeddings``); the training
    length (``TrainingConfig.seq_length``) is at most this."""
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    untie_embeddings_and_output_weights: bool = True
    no_rope_freq: Optional[int] = None
    """iRoPE: every k-th layer (1-based k, 2k, ...) skips RoPE; None = every layer uses RoPE."""
    window_size: Optional[int] = None
    """Sliding window: the keys a query sees, itself included; None = full causal attention."""
    window_attn_skip_freq: Optional[int] = None
    """Every k-th layer keeps full attention when ``window_size`` is set; None = all layers windowed."""
    attn_temperature_tuning: bool = False
    """Llama-4 / Tri-70B query temperature tuning on NoPE layers."""
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1
    ssmax: bool = False
    """Scalable-Softmax: q scaled by s_h * log(n) on every layer, learnable s per layer and head."""
    mtp_num_layers: int = 0
    """Multi-token prediction depth D (extra layers after the decoder)."""
    init_method_std: float = 0.02
    layernorm_zero_centered_gamma: bool = False
    """Norm weights stored as gamma - 1 (megatron's option; checkpoints written by Megatron-LM may use it)."""
    name: str = "tri"
    """The preset it came from (for logs and metadata only; never compared)."""

    # Fields whose values decide the weights' names and shapes: a checkpoint loads only when they agree.
    WEIGHT_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "kv_channels", "vocab_size", "mtp_num_layers", "ssmax", "untie_embeddings_and_output_weights")

    def __post_init__(self):
        # 0 switches a feature off, as on the command line; stored as None so there is one "off".
        for name in ("no_rope_freq", "window_size", "window_attn_skip_freq"):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)
        object.__setattr__(self, "mtp_num_layers", int(self.mtp_num_layers or 0))

    def replace(self, **changes) -> "ModelArch":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ sizes
    def padded_vocab_size(self, tp: int = 1) -> int:
        """The vocabulary the model is built with: a multiple of 128 whatever the layout.

        Raises ValueError when it does not split evenly over ``tp`` tensor-parallel ranks."""
        padded = -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        if padded % tp:
            raise ValueError(
                f"vocabulary {self.vocab_size} (padded to {padded}) does not split over --tensor-model-parallel-size "
                f"{tp}; use a TP size dividing {padded}")
        return padded

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.kv_channels

    def layer_parameters(self) -> int:
        """Parameters of one transformer layer (no biases, RMSNorm, SwiGLU)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        attention = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        mlp = 2 * h * f + f * h  # fc1 = [gate; up], fc2
        return attention + mlp + 2 * h + (self.num_attention_heads if self.ssmax else 0)

    def num_parameters(self) -> int:
        """Exact parameter count of the megatron-core model built from this record (unpadded vocabulary)."""
        h = self.hidden_size
        embeddings = self.vocab_size * h * (2 if self.untie_embeddings_and_output_weights else 1)
        # MTP layer: enorm + hnorm + eh_proj (2h -> h) + a transformer layer + its final norm.
        mtp = self.mtp_num_layers * (2 * h + 2 * h * h + self.layer_parameters() + h)
        return self.num_layers * self.layer_parameters() + h + embeddings + mtp

    # ------------------------------------------------------------------ layer pattern
    def is_nope_layer(self, layer_number: int) -> bool:
        """Whether 1-based decoder layer ``layer_number`` skips RoPE (MTP layers, numbered after the
        decoder's, always use RoPE)."""
        return bool(self.no_rope_freq) and layer_number <= self.num_layers and layer_number % self.no_rope_freq == 0

    def is_window_layer(self, layer_number: int, seq_length: Optional[int] = None) -> bool:
        """megatron-core's rule for 1-based global layer numbers (MTP layers are L+1..L+D); a window at
        least as long as the sequence is no window."""
        if not self.window_size or (seq_length is not None and self.window_size >= seq_length):
            return False
        return self.window_attn_skip_freq is None or layer_number % self.window_attn_skip_freq != 0

    # ------------------------------------------------------------------ other systems' views
    def transformer_config_kwargs(self) -> dict:
        """The architecture's part of megatron-core's ``TransformerConfig`` (model/config.py adds the
        layout, precision and runtime)."""
        return dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels, normalization="RMSNorm", layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True, add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0,
            attention_dropout=0.0, init_method_std=self.init_method_std,
            layernorm_zero_centered_gamma=self.layernorm_zero_centered_gamma,
            mtp_num_layers=self.mtp_num_layers or None, no_rope_freq=self.no_rope_freq,
            # megatron's window is (keys before, keys after); ours counts the query itself
            window_size=(self.window_size - 1, 0) if self.window_size else None,
            window_attn_skip_freq=self.window_attn_skip_freq,
            ssmax=self.ssmax, attn_temperature_tuning=self.attn_temperature_tuning,
            attn_floor_scale=self.attn_floor_scale, attn_scale=self.attn_scale,
        )

    def meta(self) -> dict:
        """tri_meta.json's "model" record. Key names are those of the flags (``max_position_embeddings``,
        ``model``) so that older checkpoints read the same."""
        m = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("context_length", "name", "init_method_std")}
        m.update(model=self.name, max_position_embeddings=self.context_length)
        return m

    @classmethod
    def from_meta(cls, m: dict) -> "ModelArch":
        """The record tri_meta.json's "model" (or ``meta_from_hf_config``) describes; missing optional
        fields take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in m.items() if k in names and v is not None}
        values["context_length"] = m.get("max_position_embeddings") or m.get("seq_length") or 4096
        values["name"] = m.get("model") or "tri"
        values["ssmax"] = bool(m.get("ssmax"))
        values["attn_temperature_tuning"] = bool(m.get("attn_temperature_tuning"))
        return cls(**values)

    def weight_mismatch(self, saved: dict) -> Optional[tuple]:
        """(field, saved value, our value) of the first weight field in which the ``saved`` meta record
        differs from this architecture, or None when the weights fit."""
        for field in self.WEIGHT_FIELDS:
            ours = getattr(self, field)
            if field in saved and saved[field] != ours and not (field == "mtp_num_layers" and not saved[field] and not ours):
                return field, saved[field], ours
        return None
