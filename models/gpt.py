"""GPT-2 (Radford et al. 2019), the decoder-only Transformer of Vaswani et al. (2017).

Reads top to bottom: config, building blocks, model, generation hooks, Hugging Face import/export.

  x = wte(idx) (+ positions)
  for each of n_layer blocks:   x = x + attn(ln_1(x));   x = x + mlp(ln_2(x))     (pre-LayerNorm)
  logits = ln_f(x) @ wte^T                         (tied embeddings; untied: lm_head's own matrix)

Positions: `learned` (GPT-2's table), `sinusoidal` (Vaswani et al.'s fixed sin/cos) or `rope`
(RoFormer's rotary embedding of q and k). Only `learned` exists in Hugging Face's GPT-2.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import hub
from kernels import KVCache, attention


# ----------------------------------------------------------------------------- config

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
    pos: str = "learned"            # learned | sinusoidal | rope
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    n_inner: int = 0                # MLP width; 0: 4 * n_embd
    activation: str = "gelu_new"    # the MLP's, by Hugging Face's name: a key of ACTIVATIONS
    tie_embeddings: bool = True     # lm_head shares wte's matrix (every OpenAI GPT-2)
    scale_attn_weights: bool = True  # scores q.k / sqrt(head_dim); False: q.k (Hugging Face's option)
    scale_attn_by_inverse_layer_idx: bool = False  # layer i's scores also / (i + 1) (Stanford CRFM's Mistral runs)

    def __post_init__(self):
        if self.pos not in ("learned", "sinusoidal", "rope"):
            raise ValueError(f"pos must be learned, sinusoidal or rope, not {self.pos!r}")
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


def rope_tables(pos, head_dim, theta):
    """cos and sin of the rotary angles p * theta^(-2i/d) for positions pos (B, T), shaped
    (B, 1, T, head_dim) to broadcast over heads; rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    angles = pos.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[:, None]
    return angles.cos(), angles.sin()


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


def cross_entropy(logits, targets):
    """Mean cross-entropy of logits (B, T, vocab) against targets (B, T), -1 targets ignored: a scalar
    computed in fp32. Under autocast F.cross_entropy upcasts by itself (autocast's fp32 list:
    cross_entropy_loss on CPU, its log_softmax and nll_loss on CUDA), so the logits are upcast here
    only without autocast: bf16 or fp16 weights (for fp32 logits .float() is a no-op)."""
    if not torch.is_autocast_enabled(logits.device.type):
        logits = logits.float()
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

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy against
        targets (B, T) when given (-1 targets are ignored). With a cache, idx continues the
        sequence the cache holds (its rows possibly left-padded: kernels.KVCache)."""
        cfg = self.config
        B, T = idx.shape
        end = cache.end(T) if cache is not None else T
        if cfg.pos == "learned" and end > cfg.block_size:
            raise ValueError(f"sequence of {end} tokens is longer than block_size {cfg.block_size}")
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device)[None], None
        else:
            pos, mask = cache.positions(T, idx.device), cache.mask(T, idx.device)
        x = self.transformer.wte(idx)
        rope = None
        if cfg.pos == "learned":
            x = x + self.transformer.wpe(pos)
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_positions(pos, cfg.n_embd).to(x.dtype)
        else:
            rope = rope_tables(pos, cfg.head_dim, cfg.rope_theta)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, None if targets is None else cross_entropy(logits, targets)

    # ------------------------------------------------------------------ what shared code relies on (DEVELOPERS.md)

    # Hugging Face's GPT-2 stores its linear layers as Conv1D, weight shape (in, out): transposed.
    FAN_IN_FAN_OUT = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @property
    def max_positions(self):
        """The learned position table's length; None for sinusoidal and rotary positions (any length)."""
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
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"{directory}/config.json has model_type {hf.get('model_type')!r}, not 'gpt2'")
        hub.check_config(hf, CONFIG_KEYS, f"{directory}/config.json")
        config = Config(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
                        n_head=hf["n_head"], n_embd=hf["n_embd"], bias=hf.get("bias", True),
                        dropout=hf.get("resid_pdrop", 0.1), pos=hf.get("position_embedding_type", "learned"),
                        rope_theta=hf.get("rope_theta", 10000.0), layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                        n_inner=hf.get("n_inner") or 0, activation=hf.get("activation_function", "gelu_new"),
                        tie_embeddings=hf.get("tie_word_embeddings", True),
                        scale_attn_weights=hf.get("scale_attn_weights", True),
                        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False))

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
        lm_head.weight is stored when it is not tied."""
        cfg = self.config
        state = hub.checkpoint_state(self)
        if not cfg.bias:  # Hugging Face's GPT-2 always has biases: give it zeros
            for key, tensor in list(state.items()):
                if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                    state[key[:-len("weight")] + "bias"] = torch.zeros_like(tensor)
                elif key.endswith(self.FAN_IN_FAN_OUT):
                    state[key[:-len("weight")] + "bias"] = tensor.new_zeros(tensor.shape[1])
        hf = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
              "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_inner": cfg.n_inner or None, "activation_function": cfg.activation,
              "layer_norm_epsilon": cfg.layer_norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
              "attn_pdrop": 0.0, "scale_attn_weights": cfg.scale_attn_weights,
              "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
              "reorder_and_upcast_attn": False, "add_cross_attention": False,
              "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.vocab_size - 1,
              "eos_token_id": cfg.vocab_size - 1, "dtype": str(self.lm_head.weight.dtype).removeprefix("torch."),
              "bias": cfg.bias, "position_embedding_type": cfg.pos, "rope_theta": cfg.rope_theta}
        hub.write(directory, hf, state, metadata)


# ----------------------------------------------------------------------------- config.json

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
    "bias": hub.HONOURED, "position_embedding_type": hub.HONOURED, "rope_theta": hub.HONOURED,
}
