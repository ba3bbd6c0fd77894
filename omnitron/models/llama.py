"""Llama (Touvron et al. 2023: Llama 1 and 2; Grattafiori et al. 2024: Llama 3, 3.1, 3.2).

Reads top to bottom: config, building blocks, model, generation hooks, Hugging Face import/export.

  x = embed_tokens(idx)
  for each of n_layer blocks:   x = x + attn(rmsnorm(x));   x = x + mlp(rmsnorm(x))   (pre-norm)
  logits = rmsnorm(x) @ lm_head^T                                        (tied or untied to embed)

GPT-2's recipe with four changes: RMSNorm instead of LayerNorm (Zhang & Sennrich 2019), a SwiGLU MLP
(Shazeer 2020), rotary position embeddings on q and k (Su et al. 2021) instead of a position table,
and grouped-query attention (Ainslie et al. 2023): n_kv_head key/value heads, each shared by
n_head / n_kv_head query heads (n_kv_head = n_head: multi-head; 1: multi-query). Long-context
checkpoints rescale the rotary frequencies (rope_type: linear, dynamic, yarn, llama3).
Module and tensor names are Hugging Face's, so checkpoints load key for key.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitron import hub
from omnitron.kernels import KVCache, attention


# ----------------------------------------------------------------------------- config

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass
class Config:
    # Defaults: a small model that trains on a laptop CPU in minutes. Llama 2 7B is vocab_size=32000,
    # block_size=4096, n_layer=32, n_head=32, n_kv_head=32, n_embd=4096, intermediate_size=11008;
    # Llama 3 8B has vocab_size=128256, n_kv_head=8, intermediate_size=14336, rope_theta=500000.
    vocab_size: int = 32000
    block_size: int = 2048          # max_position_embeddings: the default cache length, dynamic's original context
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2              # key/value heads: n_head is multi-head attention, 1 multi-query
    n_embd: int = 128
    head_dim: int = 0               # 0: n_embd // n_head
    intermediate_size: int = 352    # SwiGLU width (about 8/3 n_embd)
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True     # lm_head shares embed_tokens' matrix (Llama 3.2 1B/3B); Llama 2, 3 8B: untied
    attention_bias: bool = False    # biases on q, k, v and o
    mlp_bias: bool = False          # biases on the MLP's three matrices
    rope_theta: float = 10000.0
    rope_type: str = "default"      # default | linear | dynamic | yarn | llama3 (see rope_frequencies)
    rope_factor: float = 1.0        # s: how many times the context is extended
    rope_original_max_len: int = 0  # yarn, llama3: the pretraining context; 0: block_size
    rope_low_freq_factor: float = 1.0   # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0    # yarn
    rope_beta_slow: float = 1.0     # yarn
    rope_attention_factor: float = 0.0  # yarn: scale of cos and sin; 0: 0.1 ln(s) + 1

    def __post_init__(self):
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.rope_original_max_len = self.rope_original_max_len or self.block_size
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be {', '.join(ROPE_TYPES)}; not {self.rope_type!r}")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor must be positive for rope_type {self.rope_type}, not {self.rope_factor}")


# ----------------------------------------------------------------------------- building blocks

def rope_frequencies(config, dim, seq_len, device=None):
    """Rotary inverse frequencies theta^(-2i/dim), i < dim/2 (RoFormer), rescaled for a longer context
    by config.rope_type, and the factor that multiplies cos and sin. The formulas of transformers'
    modeling_rope_utils.py, with s = rope_factor and L = the original context:
      linear   position interpolation (Chen et al. 2023): every frequency / s
      dynamic  dynamic NTK: once seq_len passes block_size the base grows to
               theta * (s * seq_len / block_size - (s - 1)) ** (dim / (dim - 2)); with a KV cache
               the cached keys keep the angles they were written with, as in transformers
      llama3   Llama 3.1: frequencies whose wavelength exceeds L / low_freq_factor are divided by s,
               those under L / high_freq_factor kept, those between interpolated smoothly
      yarn     YaRN (Peng et al. 2023): dimensions that turn fewer than beta_slow times in L are
               interpolated (/ s), more than beta_fast times kept, a linear ramp between; cos and sin
               are scaled by 0.1 ln(s) + 1 (the attention temperature)"""
    cfg, s, L = config, config.rope_factor, config.rope_original_max_len
    theta = cfg.rope_theta
    if cfg.rope_type == "dynamic" and seq_len > cfg.block_size:
        theta = theta * (s * seq_len / cfg.block_size - (s - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    if cfg.rope_type == "linear":
        return inv_freq / s, 1.0
    if cfg.rope_type == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        smooth = ((L / wavelen - low) / (high - low)).clamp(0, 1)  # 0: long wavelength, 1: short
        return (1 - smooth) * inv_freq / s + smooth * inv_freq, 1.0
    if cfg.rope_type == "yarn":
        def dim_turning(turns):  # the dimension whose frequency turns `turns` times in L positions
            return dim * math.log(L / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
        low = max(math.floor(dim_turning(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(dim_turning(cfg.rope_beta_slow)), dim - 1)
        i = torch.arange(dim // 2, device=device).float()
        ramp = ((i - low) / (high - low if high != low else 0.001)).clamp(0, 1)  # 0: keep, 1: interpolate
        scale = cfg.rope_attention_factor or (0.1 * math.log(s) + 1.0 if s > 1 else 1.0)
        return inv_freq / s * ramp + inv_freq * (1 - ramp), scale
    return inv_freq, 1.0


def rope_tables(config, dim, pos, seq_len):
    """cos and sin of the rotary angles p * inv_freq for positions pos (1 or B, T), shaped
    (1 or B, 1, T, dim) to broadcast over heads; rotate-half layout (pair i is dimensions i and
    i + dim/2). seq_len, the longest sequence so far, matters to dynamic scaling only."""
    inv_freq, scale = rope_frequencies(config, dim, seq_len, pos.device)
    angles = pos.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+d/2}) pair of the head dimension by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019), normalised in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32: float64 stays float64
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query attention: n_head query heads, n_kv_head key/value heads (the kernel shares
    each key/value head among n_head / n_kv_head consecutive query heads)."""

    def __init__(self, config, layer):
        super().__init__()
        self.head_dim, self.layer = config.head_dim, layer
        C, D, bias = config.n_embd, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(C, config.n_head * D, bias=bias)
        self.k_proj = nn.Linear(C, config.n_kv_head * D, bias=bias)
        self.v_proj = nn.Linear(C, config.n_kv_head * D, bias=bias)
        self.o_proj = nn.Linear(config.n_head * D, C, bias=bias)

    def forward(self, x, rope, cache=None, mask=None):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attention(q, k, v, causal=True, mask=mask, layer=self.layer, cache=cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        C, H, bias = config.n_embd, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(C, H, bias=bias)
        self.up_proj = nn.Linear(C, H, bias=bias)
        self.down_proj = nn.Linear(H, C, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def with_prefix(x, prefix, cache=None):
    """(prefix then x, P): the token embeddings x (B, T, C) after prefix (B, P, C), cast to x's dtype,
    and P (0 without a prefix). A non-empty prefix into a left-padded cache is a ValueError: the
    padding slots come first in every row, where the prefix would have to be."""
    if prefix is None:
        return x, 0
    if prefix.shape[1] and cache is not None and cache.pad is not None:
        raise ValueError("a prefix cannot be prefilled into a left-padded cache")
    return torch.cat((prefix.to(x.dtype), x), dim=1), prefix.shape[1]


# Copied from models/gpt.py:cross_entropy
def cross_entropy(logits, targets):
    """Mean cross-entropy of logits (B, T, vocab) against targets (B, T), -1 targets ignored: a scalar
    computed in fp32. Under autocast F.cross_entropy upcasts by itself (autocast's fp32 list:
    cross_entropy_loss on CPU, its log_softmax and nll_loss on CUDA), so the logits are upcast here
    only without autocast and only to at least fp32 (bf16 or fp16 become fp32; fp32 and float64 stay)."""
    if not torch.is_autocast_enabled(logits.device.type):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


# ----------------------------------------------------------------------------- model

class Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        """As transformers initialises Llama: N(0, 0.02) matrices, zero biases, unit norms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None, prefix=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy against
        targets (B, T) when given (-1 targets are ignored). With a cache, idx continues the
        sequence the cache holds (its rows possibly left-padded: kernels.KVCache). prefix (B, P,
        n_embd), optional: embeddings placed before the tokens' (an image's soft prompt:
        omnitron/multimodal.py), in the first P positions; the logits and the loss are the tokens'
        only. With a cache the prefix goes in once, with the prompt (the prefill)."""
        x, P = with_prefix(self.model.embed_tokens(idx), prefix, cache)
        T = x.shape[1]
        if cache is None:
            pos, mask, seq_len = torch.arange(T, device=idx.device)[None], None, T
        else:
            pos, mask = cache.positions(T, idx.device), cache.mask(T, idx.device)
            seq_len = cache.end(T) - cache.min_pad
        rope = rope_tables(self.config, self.config.head_dim, pos, seq_len)
        for block in self.model.layers:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.model.norm(x[:, P:]))
        return logits, None if targets is None else cross_entropy(logits, targets)

    # ------------------------------------------------------------------ what shared code relies on (DEVELOPERS.md)

    FAN_IN_FAN_OUT = ()  # names of the weights that Hugging Face's files store transposed: none

    @property
    def max_positions(self):
        """None: rotary positions are computed for any length (block_size is the default cache length)."""
        return None

    def fsdp_units(self):
        """The modules that FSDP shards one by one, bottom-up (the root is sharded last, by train.py)."""
        return list(self.model.layers)

    def aux_losses(self):
        """Auxiliary losses of the last forward, by name: none in a dense model."""
        return {}

    def aux_metrics(self):
        """Statistics of the last forward to log, not to train on (a router's dropped tokens): none here."""
        return {}

    @torch.no_grad()
    def convert_kv_heads(self, n_kv_head):
        """Grouped-query attention from a checkpoint with more key/value heads (Ainslie et al. 2023,
        section 2.1): each new key/value head is the mean of the heads of its group (consecutive
        heads, as the query heads that read them are), for weights and biases. In place; the
        paper then uptrains briefly (about 5% of pretraining) to recover quality."""
        cfg = self.config
        if n_kv_head < 1 or cfg.n_kv_head % n_kv_head:
            raise ValueError(f"cannot pool {cfg.n_kv_head} key/value heads into {n_kv_head} groups")
        for block in self.model.layers:
            attn = block.self_attn
            for name in ("k_proj", "v_proj"):
                old = getattr(attn, name)
                new = nn.Linear(cfg.n_embd, n_kv_head * cfg.head_dim, bias=old.bias is not None,
                                device=old.weight.device, dtype=old.weight.dtype)
                for p_new, p_old in zip(new.parameters(), old.parameters()):  # weight, then bias
                    grouped = p_old.float().view(n_kv_head, -1, cfg.head_dim, *p_old.shape[1:])
                    p_new.copy_(grouped.mean(dim=1).reshape(p_new.shape))
                setattr(attn, name, new)
        cfg.n_kv_head = n_kv_head
        return self

    # ------------------------------------------------------------------ counts

    def num_params(self, non_embedding=True):
        """Parameters (tied weights once); without the token embedding when non_embedding, unless it
        is tied to lm_head (then it is the output layer's matrix, which costs compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6 per weight of every matrix product,
        plus the attention scores and their weighted sum, 12 * n_layer * n_head * head_dim * seq_len
        (PaLM appendix B; sharing key/value heads does not change the count)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # ------------------------------------------------------------------ generation hooks

    def init_cache(self, batch_size, max_len=None, dtype=None, device=None, pad=None, static=False):
        """An empty kernels.KVCache for this model (pad and static: see there)."""
        cfg, p = self.config, self.lm_head.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim,
                       dtype or p.dtype, device or p.device, pad=pad, static=static)

    # ------------------------------------------------------------------ LoRA targets (lora.py)
    # --lora_targets' common names -> this file's linear layers, as module-name suffixes (PEFT's
    # target_modules rule: a module is adapted if its name ends with one). `all` is every one of them.
    LORA_TARGETS = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
                    "mlp": ["gate_proj", "up_proj", "down_proj"]}

    # ------------------------------------------------------------------ Hugging Face import / export
    # Tensor names are transformers' LlamaForCausalLM's: model.embed_tokens.weight,
    # model.layers.N.self_attn.{q,k,v,o}_proj.*, model.layers.N.mlp.{gate,up,down}_proj.*,
    # model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight
    # (absent when tied). Early Llama 2 conversions also carry rotary_emb.inv_freq buffers (ignored).

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device="cpu"):
        """The model of a Hugging Face directory (config.json + weights: hub.read_tensors), its tensors
        in their own dtype unless dtype is given. ValueError naming the option or tensor it refuses."""
        hf = hub.read_config(directory)
        if hf.get("model_type") != "llama":
            raise ValueError(f"{directory}/config.json has model_type {hf.get('model_type')!r}, not 'llama'")
        hub.check_config(hf, CONFIG_KEYS, f"{directory}/config.json")
        config = Config(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                        n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or 0,
                        intermediate_size=hf["intermediate_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                        tie_embeddings=hf.get("tie_word_embeddings", False),
                        attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                        **_rope_config(hf, directory))
        with torch.device("meta"):
            model = cls(config)
        hub.load_weights(model, directory, dtype, device,
                         rename=lambda key: None if key.endswith("rotary_emb.inv_freq") else key)
        config.tie_embeddings = model.lm_head.weight is model.model.embed_tokens.weight  # hub.load_weights may untie
        return model

    def save_pretrained(self, directory, metadata=None):
        """config.json + model.safetensors that transformers' LlamaForCausalLM loads (hub.write)."""
        cfg = self.config
        hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
              "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layer,
              "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
              "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
              "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias, "attention_dropout": 0.0,
              "rope_parameters": _rope_parameters(cfg), "initializer_range": 0.02,
              "bos_token_id": None, "eos_token_id": None,
              "dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}
        hub.write(directory, hf, hub.checkpoint_state(self), metadata)


# ----------------------------------------------------------------------------- config.json

# Every key of transformers' LlamaConfig (beyond hub.COMMON_KEYS), and what from_pretrained does with
# it (hub.HONOURED, INERT, TRAINING; a tuple: the values honoured, any other refused in one line).
CONFIG_KEYS = {
    "vocab_size": hub.HONOURED, "hidden_size": hub.HONOURED, "intermediate_size": hub.HONOURED,
    "num_hidden_layers": hub.HONOURED, "num_attention_heads": hub.HONOURED, "num_key_value_heads": hub.HONOURED,
    "head_dim": hub.HONOURED, "rms_norm_eps": hub.HONOURED, "attention_bias": hub.HONOURED, "mlp_bias": hub.HONOURED,
    "tie_word_embeddings": hub.HONOURED,   # Config.tie_embeddings (default false)
    "max_position_embeddings": hub.HONOURED,  # Config.block_size: dynamic scaling's original context
    "hidden_act": ("silu",),              # the SwiGLU gate: other activations are not implemented
    # rope_parameters (transformers 5) or rope_scaling + rope_theta (the Hub's form): its sub-keys in
    # hub.ROPE_KEYS; a top-level original_max_position_embeddings overrides the one inside (as there)
    "rope_parameters": hub.HONOURED, "rope_scaling": hub.HONOURED, "rope_theta": hub.HONOURED,
    "original_max_position_embeddings": hub.HONOURED,
    "pretraining_tp": hub.INERT,          # transformers 5 reads it nowhere (earlier: the same products, sliced)
    "attention_dropout": hub.TRAINING,    # the attention kernels have no dropout: not applied
}
ROPE_KEYS = hub.ROPE_KEYS


def _rope_config(hf, directory):
    """Our rope_* Config fields from config.json in the Hub's form (top-level rope_theta; rope_scaling
    with `type` or `rope_type`) or transformers 5's (rope_parameters holding rope_theta too), read as
    transformers reads them: rope_scaling, when there, replaces rope_parameters; a top-level
    original_max_position_embeddings wins over the one inside. ValueError naming a sub-key that
    ROPE_KEYS refuses or does not list."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    hub.check_config(rope, ROPE_KEYS, f"{directory}/config.json: rope_parameters", strict=True)
    return dict(rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                rope_type=rope.get("rope_type", rope.get("type", "default")), rope_factor=rope.get("factor") or 1.0,
                rope_original_max_len=hf.get("original_max_position_embeddings")
                or rope.get("original_max_position_embeddings") or 0,
                rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
                rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
                rope_beta_fast=rope.get("beta_fast") or 32.0, rope_beta_slow=rope.get("beta_slow") or 1.0,
                rope_attention_factor=rope.get("attention_factor") or 0.0)


def _rope_parameters(cfg):
    """transformers 5's rope_parameters for config.json."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor)
    if cfg.rope_type == "yarn":
        rope.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_attention_factor:
            rope["attention_factor"] = cfg.rope_attention_factor
    if cfg.rope_type in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = cfg.rope_original_max_len
    return rope
