"""GPT-2 (Radford et al. 2019), the decoder-only Transformer of Vaswani et al. (2017).

Reads top to bottom: config, building blocks, model, generation hooks, Hugging Face import/export.

  x = wte(idx) (+ positions)
  for each of n_layer blocks:   x = x + attn(ln_1(x));   x = x + mlp(ln_2(x))     (pre-LayerNorm)
  logits = ln_f(x) @ wte^T                         (tied embeddings; untied: lm_head's own matrix)

Positions: `learned` (GPT-2's table), `sinusoidal` (Vaswani et al.'s fixed sin/cos, added to sqrt(n_embd) wte), `rope`
(RoFormer's rotary embedding of q and k) or `none` (NoPE: no position input at all; the causal mask
alone tells a token how far in it is: Haviv et al. 2022, Kazemnejad et al. 2023). Only `learned`
exists in Hugging Face's GPT-2. With `rope`, rope_type rescales the rotary frequencies for a context
longer than block_size (linear interpolation, dynamic NTK, YaRN, Llama 3.1's), as models/llama.py does.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitron import hub
from omnitron.kernels import KVCache, attention


# ----------------------------------------------------------------------------- config

POSITIONS = ("learned", "sinusoidal", "rope", "none")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass
class Config:
    # Defaults: a small model that trains on a laptop CPU in minutes. GPT-2 small (124M) is
    # vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768.
    vocab_size: int = 50257
    block_size: int = 1024          # longest sequence (the size of the learned position table)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0            # on embeddings and on each residual branch
    bias: bool = True               # biases in the linear layers and LayerNorms
    pos: str = "learned"            # learned | sinusoidal | rope | none (NoPE)
    rope_theta: float = 10000.0
    rope_type: str = "default"      # pos rope: default | linear | dynamic | yarn | llama3 (see rope_frequencies)
    rope_factor: float = 1.0        # s: how many times the context is extended
    rope_original_max_len: int = 0  # yarn, llama3: the pretraining context; 0: block_size
    rope_low_freq_factor: float = 1.0   # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0    # yarn
    rope_beta_slow: float = 1.0     # yarn
    rope_attention_factor: float = 0.0  # yarn: scale of cos and sin; 0: 0.1 ln(s) + 1
    layer_norm_eps: float = 1e-5
    n_inner: int = 0                # MLP width; 0: 4 * n_embd
    activation: str = "gelu_new"    # the MLP's, by Hugging Face's name: a key of ACTIVATIONS
    tie_embeddings: bool = True     # lm_head shares wte's matrix (every OpenAI GPT-2)
    scale_attn_weights: bool = True  # scores q.k / sqrt(head_dim); False: q.k (Hugging Face's option)
    scale_attn_by_inverse_layer_idx: bool = False  # layer i's scores also / (i + 1) (Stanford CRFM's Mistral runs)

    def __post_init__(self):
        self.rope_original_max_len = self.rope_original_max_len or self.block_size
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be {', '.join(POSITIONS)}; not {self.pos!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be {', '.join(ROPE_TYPES)}; not {self.rope_type!r}")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor must be positive for rope_type {self.rope_type}, not {self.rope_factor}")
        if self.rope_type != "default" and self.pos != "rope":
            raise ValueError(f"rope_type {self.rope_type} rescales rotary positions: it needs pos rope, not {self.pos}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; not {self.activation!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def n_kv_head(self):
        """Every query head has its own key and value head (no grouped-query attention here)."""
        return self.n_head


# ----------------------------------------------------------------------------- building blocks

def gelu_tanh(x):
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's."""
    return F.gelu(x, approximate="tanh")


def quick_gelu(x):
    """x * sigmoid(1.702 x), a cheaper approximation of GELU (Hendrycks & Gimpel 2016)."""
    return x * torch.sigmoid(1.702 * x)


# The MLP activations, by the names of transformers' ACT2FN (config.json's activation_function).
ACTIVATIONS = {
    "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,  # the same formula with its constants rounded
    "gelu": F.gelu,          # exact: x * Phi(x)
    "quick_gelu": quick_gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu,
}


def sinusoidal_positions(pos, dim):
    """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)).
    pos (B, T) -> (B, T, dim)."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=pos.device) * (-math.log(10000.0) / dim))
    angles = pos.float()[..., None] * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave sin, cos


# Copied from models/llama.py:rope_frequencies
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


# Copied from models/llama.py:rope_tables
def rope_tables(config, dim, pos, seq_len):
    """cos and sin of the rotary angles p * inv_freq for positions pos (1 or B, T), shaped
    (1 or B, 1, T, dim) to broadcast over heads; rotate-half layout (pair i is dimensions i and
    i + dim/2). seq_len, the longest sequence so far, matters to dynamic scaling only."""
    inv_freq, scale = rope_frequencies(config, dim, seq_len, pos.device)
    angles = pos.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos() * scale, angles.sin() * scale


# Copied from models/llama.py:apply_rope
def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+d/2}) pair of the head dimension by its angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.head_dim, self.layer = config.n_head, config.head_dim, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        # The kernels divide the scores by sqrt(head_dim); Hugging Face's GPT-2 options change that
        # divisor, and multiplying q by this factor does the same to every score of the layer.
        self.q_scale = ((1.0 if config.scale_attn_weights else math.sqrt(self.head_dim))
                        / (layer + 1 if config.scale_attn_by_inverse_layer_idx else 1))

    def forward(self, x, rope=None, cache=None, mask=None):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        y = attention(q, k, v, causal=True, mask=mask, layer=self.layer, cache=cache)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.n_inner or 4 * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        return x + self.mlp(self.ln_2(x))


# Copied from models/llama.py:with_prefix
def with_prefix(x, prefix, cache=None):
    """(prefix then x, P): the token embeddings x (B, T, C) after prefix (B, P, C), cast to x's dtype,
    and P (0 without a prefix). A non-empty prefix into a left-padded cache is a ValueError: the
    padding slots come first in every row, where the prefix would have to be."""
    if prefix is None:
        return x, 0
    if prefix.shape[1] and cache is not None and cache.pad is not None:
        raise ValueError("a prefix cannot be prefilled into a left-padded cache")
    return torch.cat((prefix.to(x.dtype), x), dim=1), prefix.shape[1]


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
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None, prefix=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy against
        targets (B, T) when given (-1 targets are ignored). With a cache, idx continues the
        sequence the cache holds (its rows possibly left-padded: kernels.KVCache). prefix (B, P,
        n_embd), optional: embeddings placed before the tokens' (an image's soft prompt:
        omnitron/multimodal.py), in the first P positions, which get their position embeddings
        too; the logits and the loss are the tokens' only. With a cache the prefix goes in once,
        with the prompt (the prefill)."""
        cfg = self.config
        x = self.transformer.wte(idx)
        if cfg.pos == "sinusoidal":
            # Vaswani et al. 3.4 multiply the embeddings by sqrt(d_model) before adding the sinusoids (whose
            # entries are of size 1): without it a GPT-initialised embedding (std 0.02) is lost under them
            x = x * math.sqrt(cfg.n_embd)
        x, P = with_prefix(x, prefix, cache)
        T = x.shape[1]
        end = cache.end(T) if cache is not None else T
        if cfg.pos == "learned" and end > cfg.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than the learned position table "
                             f"(block_size {cfg.block_size})")
        if cache is None:
            pos, mask, seq_len = torch.arange(T, device=idx.device)[None], None, T
        else:
            pos, mask = cache.positions(T, idx.device), cache.mask(T, idx.device)
            seq_len = cache.end(T) - cache.min_pad
        rope = None
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(pos)
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_positions(pos, cfg.n_embd).to(x.dtype)
        elif cfg.pos == "rope":
            rope = rope_tables(cfg, cfg.head_dim, pos, seq_len)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x[:, P:]))
        return logits, None if targets is None else cross_entropy(logits, targets)

    # ------------------------------------------------------------------ what shared code relies on (DEVELOPERS.md)

    # Hugging Face's GPT-2 stores its linear layers as Conv1D, weight shape (in, out): transposed.
    FAN_IN_FAN_OUT = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @property
    def max_positions(self):
        """The learned position table's length; None for sinusoidal, rotary and no positions (any length)."""
        return self.config.block_size if self.config.pos == "learned" else None

    def fsdp_units(self):
        """The modules that FSDP shards one by one, bottom-up (the root is sharded last, by train.py)."""
        return list(self.transformer.h)

    # Copied from models/llama.py:Model.aux_losses
    def aux_losses(self):
        """Auxiliary losses of the last forward, by name: none in a dense model."""
        return {}

    # Copied from models/llama.py:Model.aux_metrics
    def aux_metrics(self):
        """Statistics of the last forward to log, not to train on (a router's dropped tokens): none here."""
        return {}

    # ------------------------------------------------------------------ counts

    def num_params(self, non_embedding=True):
        """Parameters (tied weights once); without the position table when non_embedding, and without
        the token embedding too unless it is tied to lm_head (then it is the output layer's matrix,
        which costs compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6 per weight of every matrix product,
        plus the attention scores and their weighted sum, 12 * n_layer * n_embd * seq_len
        (PaLM appendix B; nanoGPT's estimate_mfu)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len

    # ------------------------------------------------------------------ generation hooks

    def init_cache(self, batch_size, max_len=None, dtype=None, device=None, pad=None, static=False):
        """An empty kernels.KVCache for this model (pad and static: see there)."""
        cfg, p = self.config, self.lm_head.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, max_len or cfg.block_size, cfg.head_dim,
                       dtype or p.dtype, device or p.device, pad=pad, static=static)

    # ------------------------------------------------------------------ LoRA targets (lora.py)
    # --lora_targets' common names -> this file's linear layers, as module-name suffixes (PEFT's
    # target_modules rule: a module is adapted if its name ends with one). `all` is every one of them.
    # Hugging Face's GPT-2 fuses the q, k and v projections in one c_attn, and so do we: q, k and v
    # each select the whole c_attn, which is what PEFT adapts on GPT2LMHeadModel too.
    LORA_TARGETS = {"q": ["c_attn"], "k": ["c_attn"], "v": ["c_attn"], "o": ["attn.c_proj"],
                    "mlp": ["c_fc", "mlp.c_proj"]}

    # ------------------------------------------------------------------ Hugging Face import / export
    # Keys are `transformer.h.0.attn.c_attn.weight` (transformers 5) or, on the Hub's original
    # checkpoints, `h.0.attn.c_attn.weight` plus `h.0.attn.bias` causal-mask buffers (ignored); the
    # FAN_IN_FAN_OUT weights are transposed on the way in and out (hub.py). What each config.json key
    # becomes: CONFIG_KEYS, below the class.

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device="cpu"):
        """The model of a Hugging Face directory (config.json + weights: hub.read_tensors), its tensors
        in their own dtype unless dtype is given. ValueError naming the option or tensor it refuses."""
        hf = hub.read_config(directory)
        if hf.get("model_type") not in ("gpt2", OWN_MODEL_TYPE):
            raise ValueError(f"{directory}/config.json has model_type {hf.get('model_type')!r}, not 'gpt2'")
        hub.check_config(hf, CONFIG_KEYS, f"{directory}/config.json")
        config = Config(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], bias=hf.get("bias", True),
                        dropout=hf.get("resid_pdrop", 0.1), pos=hf.get("position_embedding_type", "learned"),
                        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                        n_inner=hf.get("n_inner") or 0, activation=hf.get("activation_function", "gelu_new"),
                        tie_embeddings=hf.get("tie_word_embeddings", True),
                        scale_attn_weights=hf.get("scale_attn_weights", True),
                        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
                        **_rope_config(hf, directory))

        def rename(key):
            key = key.removeprefix("transformer.")
            if key.endswith((".attn.bias", ".attn.masked_bias")) or (not config.bias and key.endswith(".bias")):
                return None  # mask buffers; without biases, the zeros written for transformers' sake
            return key if key == "lm_head.weight" else "transformer." + key

        with torch.device("meta"):
            model = cls(config)
        hub.load_weights(model, directory, dtype, device, rename)
        config.tie_embeddings = model.lm_head.weight is model.transformer.wte.weight  # hub.load_weights may untie
        return model

    def save_pretrained(self, directory, metadata=None):
        """config.json + model.safetensors that transformers' GPT2LMHeadModel loads (hub.write);
        lm_head.weight is stored when it is not tied. Positions other than a learned table have no
        GPT-2 equivalent in transformers (it would load a random table without a word): such a model is
        written as model_type OWN_MODEL_TYPE, which transformers refuses and models.from_pretrained
        reads."""
        cfg = self.config
        state = hub.checkpoint_state(self)
        if not cfg.bias:  # Hugging Face's GPT-2 always has biases: give it zeros
            for key, tensor in list(state.items()):
                if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    state[key[:-len("weight")] + "bias"] = torch.zeros_like(tensor)
                elif key.endswith(self.FAN_IN_FAN_OUT):
                    state[key[:-len("weight")] + "bias"] = tensor.new_zeros(tensor.shape[1])
        learned = cfg.pos == "learned"
        hf = {"model_type": "gpt2" if learned else OWN_MODEL_TYPE,
              "architectures": ["GPT2LMHeadModel" if learned else "OmnitronGPT"], "vocab_size": cfg.vocab_size,
              "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_inner": cfg.n_inner or None, "activation_function": cfg.activation,
              "layer_norm_epsilon": cfg.layer_norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
              "attn_pdrop": 0.0, "scale_attn_weights": cfg.scale_attn_weights,
              "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
              "reorder_and_upcast_attn": False, "add_cross_attention": False,
              "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.vocab_size - 1,
              "eos_token_id": cfg.vocab_size - 1, "dtype": str(self.lm_head.weight.dtype).removeprefix("torch."),
              "bias": cfg.bias, "position_embedding_type": cfg.pos}
        if cfg.pos == "rope":
            hf["rope_parameters"] = _rope_parameters(cfg)
        hub.write(directory, hf, state, metadata)


# ----------------------------------------------------------------------------- config.json

# The model_type of a GPT whose positions transformers' GPT-2 cannot compute (sinusoidal, RoPE, none)
OWN_MODEL_TYPE = "omnitron_gpt"

# Every key of transformers' GPT2Config (beyond hub.COMMON_KEYS), and what from_pretrained does with
# it (hub.HONOURED, INERT, TRAINING; a tuple: the values honoured, any other refused in one line).
CONFIG_KEYS = {
    "vocab_size": hub.HONOURED, "n_positions": hub.HONOURED, "n_embd": hub.HONOURED, "n_layer": hub.HONOURED,
    "n_head": hub.HONOURED, "layer_norm_epsilon": hub.HONOURED,
    "n_inner": hub.HONOURED,                    # Config.n_inner (None: 4 * n_embd)
    "activation_function": tuple(ACTIVATIONS),  # Config.activation
    "tie_word_embeddings": hub.HONOURED,        # Config.tie_embeddings (default true)
    "scale_attn_weights": hub.HONOURED,         # CausalSelfAttention.q_scale
    "scale_attn_by_inverse_layer_idx": hub.HONOURED,
    # fp32 scores and softmax, scaling k first: the same function, in transformers only with eager attention
    "reorder_and_upcast_attn": hub.INERT,
    "add_cross_attention": (None, False),       # cross-attention layers need an encoder: not a causal LM's
    "resid_pdrop": hub.HONOURED,                # Config.dropout: residual branches and embeddings, in training
    "embd_pdrop": hub.TRAINING,                 # fine-tuning applies resid_pdrop to the embeddings too
    "attn_pdrop": hub.TRAINING,                 # the attention kernels have no dropout: not applied
    # GPT2DoubleHeadsModel's and GPT2ForSequenceClassification's summary head
    "summary_type": hub.INERT, "summary_use_proj": hub.INERT, "summary_activation": hub.INERT,
    "summary_proj_to_labels": hub.INERT, "summary_first_dropout": hub.INERT, "summary_last_dropout": hub.INERT,
    # ours, written by save_pretrained (transformers ignores them: only their defaults load there)
    "bias": hub.HONOURED, "position_embedding_type": hub.HONOURED,  # Config.pos: learned, sinusoidal, rope, none
    # pos rope: rope_parameters (transformers 5's form, as models/llama.py writes it) or rope_scaling + rope_theta
    # (the Hub's form; older files of ours wrote a top-level rope_theta): sub-keys in hub.ROPE_KEYS
    "rope_parameters": hub.HONOURED, "rope_scaling": hub.HONOURED, "rope_theta": hub.HONOURED,
    "original_max_position_embeddings": hub.HONOURED,
}
ROPE_KEYS = hub.ROPE_KEYS


# Copied from models/llama.py:_rope_config
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


# Copied from models/llama.py:_rope_parameters
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
