"""Tri causal LM for Hugging Face transformers, as trained by tri_megatron (loaded with trust_remote_code).

Self-contained (imports only torch and transformers) and written to give the same logits as the
megatron-core model: RMSNorm, RoPE (non-interleaved, rotate_half), grouped-query attention, SwiGLU,
iRoPE (NoPE every k-th layer), sliding windows (W keys including the query itself), SSMax
(q *= s_h*log(pos+1), s learnable per layer and head) and Llama-4 / Tri-70B query temperature tuning
on NoPE layers (q *= log(floor((pos+1)/floor_scale)+1)*attn_scale+1), both applied after RoPE.
``pos`` is the token's position id (RoPE angle and query factor alike). Packed sequences, as trained with
``--reset-position-ids --reset-attention-mask``: when ``position_ids`` restart at 0 inside a row (what
transformers passes for packed, padding-free batches), each restart begins a new document and a token
attends only to earlier tokens of its own document -- positions, SSMax's n, temperature tuning and
attention all restart, as in the megatron-core training path.

Multi-token-prediction (MTP) modules are stored DeepSeek-V3 style as extra layers
``model.layers.{L+j}`` (enorm, hnorm, eh_proj, shared_head.norm and the block's own weights). They are
loaded but not used by ``forward``; ``mtp_logits(input_ids)`` runs them the way megatron-core does
(eh_proj input = [enorm(embedding of tokens shifted by j+1); hnorm(previous hidden)], tokens shifted
left with zero fill; every depth uses the shared embedding and output head).
"""

import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_tri import TriConfig, TrillionConfig

try:
    from transformers.cache_utils import DynamicCache
except ImportError:  # pragma: no cover - very old transformers
    DynamicCache = None

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
# transformers >= 5.24 passes and returns the KV cache as ``cache``; older releases as ``past_key_values``.
# Forward accepts both names and the outputs use the field the installed release declares.
_CACHE_FIELD = "cache" if "cache" in getattr(BaseModelOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _given_cache(past_key_values, kwargs):
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache as either `cache` or `past_key_values`, not both")
    return cache if cache is not None else past_key_values


class TriRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """cos, sin [b, s, head_dim] for integer positions [b, s] (fp32 maths, as megatron-core)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TriAttention(nn.Module):
    def __init__(self, config, layer_idx, use_rope, window, temperature):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.use_rope = bool(use_rope)
        self.window = window
        self.temperature = bool(temperature)
        self.floor_scale = config.floor_scale
        self.attn_scale = config.attn_scale
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        if config.ssmax:
            self.ssmax_scale = nn.Parameter(torch.ones(self.num_heads))
        else:
            self.ssmax_scale = None

    def _query_factor(self, positions):
        """Per-query factor [b, heads or 1, s, 1] in fp32, or None."""
        pos = positions.float()
        if self.ssmax_scale is not None:
            return torch.log1p(pos)[:, None, :, None] * self.ssmax_scale.float()[None, :, None, None]
        if self.temperature and not self.use_rope:
            f = torch.log(torch.floor((pos + 1.0) / self.floor_scale) + 1.0) * self.attn_scale + 1.0
            return f[:, None, :, None]
        return None

    def forward(self, x, positions, cos, sin, past_key_values=None, past_len=0, attention_mask=None,
                documents=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_rope:
            c, sn = cos[:, None], sin[:, None]
            q = q * c + rotate_half(q) * sn
            k = k * c + rotate_half(k) * sn
        factor = self._query_factor(positions)
        if factor is not None:
            q = (q.float() * factor).to(q.dtype)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # Caches return the most recent keys (a sliding cache keeps only the window): key j of the
        # returned tensor sits at sequence index past_len + s - len + j.
        q_idx = past_len + torch.arange(s, device=x.device)
        k_idx = past_len + s - k.shape[2] + torch.arange(k.shape[2], device=x.device)
        allowed = k_idx[None, :] <= q_idx[:, None]
        if self.window:
            allowed = allowed & (k_idx[None, :] > q_idx[:, None] - self.window)
        allowed = allowed[None, None]
        if documents is not None and k.shape[2] == s:  # packed documents (no cache before this call)
            allowed = allowed & (documents[:, None, :, None] == documents[:, None, None, :])
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, k_idx].bool()[:, None, None, :]
            allowed = allowed | ~allowed.any(-1, keepdim=True)  # fully padded rows: avoid NaN
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class TriMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, f, bias=bias)
        self.up_proj = nn.Linear(h, f, bias=bias)
        self.down_proj = nn.Linear(f, h, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TriDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, use_rope=True, window=None, temperature=False):
        super().__init__()
        self.input_layernorm = TriRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TriAttention(config, layer_idx, use_rope, window, temperature)
        self.post_attention_layernorm = TriRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TriMLP(config)

    def forward(self, x, positions, cos, sin, past_key_values=None, past_len=0, attention_mask=None,
                documents=None):
        x = x + self.self_attn(self.input_layernorm(x), positions, cos, sin, past_key_values, past_len, attention_mask,
                               documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class TriSharedHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = TriRMSNorm(config.hidden_size, config.rms_norm_eps)


class TriMTPLayer(TriDecoderLayer):
    """One MTP depth: enorm, hnorm, eh_proj, a decoder block and shared_head.norm (DeepSeek-V3 names)."""

    def __init__(self, config, layer_idx, window=None):
        super().__init__(config, layer_idx, use_rope=True, window=window, temperature=False)
        self.enorm = TriRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = TriRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = TriSharedHead(config)


class TriPreTrainedModel(PreTrainedModel):
    config_class = TriConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["TriDecoderLayer", "TriMTPLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, TriRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, TriAttention) and module.ssmax_scale is not None:
            module.ssmax_scale.fill_(1.0 / math.log(max(self.config.max_position_embeddings, 2)))


class TriModel(TriPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        n = config.num_hidden_layers
        types = config.layer_types or ["full_attention"] * n
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers = [
            TriDecoderLayer(config, i, use_rope=config.no_rope_layers[i],
                            window=config.sliding_window if types[i] == "sliding_attention" else None,
                            temperature=config.attn_temperature_tuning)
            for i in range(n)
        ]
        layers += [
            TriMTPLayer(config, n + j, window=config.sliding_window if t == "sliding_attention" else None)
            for j, t in enumerate(config.mtp_layer_types[: config.num_nextn_predict_layers])
        ]
        self.layers = nn.ModuleList(layers)
        self.norm = TriRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rope(self, positions, dtype):
        return rope_cos_sin(positions, self.config.head_dim, float(self.config.rope_theta), dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        past_key_values = _given_cache(past_key_values, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None and DynamicCache is not None:
            try:
                past_key_values = DynamicCache(config=self.config)
            except TypeError:  # transformers 4.x
                past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        b, s = x.shape[:2]
        if position_ids is None:
            position_ids = (past_len + torch.arange(s, device=x.device))[None].expand(b, s)
        cos, sin = self._rope(position_ids, x.dtype)
        documents = None
        if past_len == 0 and s > 1 and bool((position_ids[:, 1:] == 0).any()):  # packed: restarts begin documents
            documents = torch.cumsum((position_ids == 0).long(), dim=1)
        for layer in self.layers[: self.config.num_hidden_layers]:
            x = layer(x, position_ids, cos, sin, past_key_values, past_len, attention_mask, documents)
        x = self.norm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: past_key_values if use_cache else None})


class TriForCausalLM(TriPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:  # pragma: no cover
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = TriModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        past_key_values = _given_cache(past_key_values, kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})

    @torch.no_grad()
    def mtp_logits(self, input_ids):
        """Logits of each MTP depth j = 1..D ([b, s, vocab] each), megatron-core's MTP semantics."""
        cfg = self.config
        h = self.model(input_ids=input_ids, use_cache=False).last_hidden_state
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device)[None].expand(b, s)
        cos, sin = self.model._rope(positions, h.dtype)
        ids, outs = input_ids, []
        for layer in self.model.layers[cfg.num_hidden_layers:]:
            ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
            e = layer.enorm(self.model.embed_tokens(ids))
            x = layer.eh_proj(torch.cat([e, layer.hnorm(h)], dim=-1))
            h = layer.shared_head.norm(TriDecoderLayer.forward(layer, x, positions, cos, sin))
            outs.append(self.lm_head(h))
        return outs


class TrillionForCausalLM(TriForCausalLM):
    """The same model under Trillion Labs' architecture name (config model_type ``trillion``)."""

    config_class = TrillionConfig
