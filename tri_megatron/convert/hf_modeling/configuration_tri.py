"""Hugging Face configuration for Tri models exported by tri_megatron (loaded with trust_remote_code).

Self-contained: imports only transformers. Two classes share one implementation:

* ``TriConfig`` (model_type ``tri``): any tri_megatron model (SSMax, iRoPE, sliding windows, MTP).
* ``TrillionConfig`` (model_type ``trillion``): the Tri-70B layout, with the field names of Trillion
  Labs' published config, so tools that know that config read ours.

Layer pattern fields:

* ``global_attention_freq`` k: layer i (0-based) is a NoPE, full-attention layer iff (i+1) % k == 0
  (megatron-core's ``no_rope_freq=k``; Trillion's ``global_attention_freq``).
* ``no_rope_layers``: per layer, **1 = uses RoPE**, 0 = NoPE (Llama-4 polarity; megatron-core's list
  form of ``no_rope_freq`` has the opposite polarity, 1 = skip RoPE).
* ``sliding_window`` W: a query on a ``sliding_attention`` layer sees the W most recent keys,
  itself included. ``layer_types`` lists ``full_attention`` / ``sliding_attention`` per layer.
* ``attn_temperature_tuning``: on NoPE layers q *= log(floor((pos+1)/floor_scale)+1)*attn_scale+1.
* ``ssmax``: on every layer q *= s_h*log(pos+1), s learnable per layer and head (``self_attn.ssmax_scale``).
* ``num_nextn_predict_layers`` D: multi-token-prediction modules stored DeepSeek-V3 style as extra
  layers ``model.layers.{L+j}``; ``mtp_layer_types`` gives their attention type.
"""

from transformers import PretrainedConfig


class TriConfig(PretrainedConfig):
    model_type = "tri"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        # Long only because a transformers config lists every field with its default in its signature.
        self,
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        use_cache=True,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        global_attention_freq=None,
        no_rope_layers=None,
        sliding_window=None,
        layer_types=None,
        attn_temperature_tuning=False,
        floor_scale=8192.0,
        attn_scale=0.1,
        ssmax=False,
        num_nextn_predict_layers=0,
        mtp_layer_types=None,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.global_attention_freq = global_attention_freq
        k = global_attention_freq
        if no_rope_layers is None:
            no_rope_layers = [0 if k and (i + 1) % k == 0 else 1 for i in range(num_hidden_layers)]
        self.no_rope_layers = list(no_rope_layers)
        self.sliding_window = sliding_window
        if sliding_window and layer_types is None:
            layer_types = ["full_attention" if k and (i + 1) % k == 0 else "sliding_attention"
                           for i in range(num_hidden_layers)]
        self.layer_types = list(layer_types) if sliding_window else None
        self.attn_temperature_tuning = attn_temperature_tuning
        self.floor_scale = floor_scale
        self.attn_scale = attn_scale
        self.ssmax = ssmax
        self.num_nextn_predict_layers = num_nextn_predict_layers or 0
        if mtp_layer_types is None:
            mtp_layer_types = ["sliding_attention" if sliding_window else "full_attention"] * self.num_nextn_predict_layers
        self.mtp_layer_types = list(mtp_layer_types)
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        if len(self.no_rope_layers) != num_hidden_layers:
            raise ValueError(f"no_rope_layers has {len(self.no_rope_layers)} entries for {num_hidden_layers} layers")
        if self.layer_types is not None and len(self.layer_types) != num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {num_hidden_layers} layers")
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class TrillionConfig(TriConfig):
    """The Tri-70B layout under Trillion Labs' model_type and field names."""

    model_type = "trillion"

    def __init__(self, **kwargs):  # defined here so that transformers keeps TriConfig's __init__
        super().__init__(**kwargs)
