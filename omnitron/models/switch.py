"""Switch Transformer (Fedus et al. 2021) and top-k mixtures of experts (Shazeer et al. 2017; Mixtral,
Jiang et al. 2024; Qwen-MoE; OLMoE, Muennighoff et al. 2024), decoder-only.

Reads top to bottom: config, building blocks, the mixture-of-experts layer, model, generation hooks,
Hugging Face import/export.

  x = embed_tokens(idx)
  for each of n_layer blocks:   x = x + attn(rmsnorm(x));   x = x + moe(rmsnorm(x))   (pre-norm)
  logits = rmsnorm(x) @ lm_head^T

moe(x) for one token x (a sparse layer; the others hold a dense SwiGLU MLP):
  p = softmax(x W_router)                   the router, in fp32 whatever the model dtype (Switch 2.4)
  e_1..e_k = the k most probable experts    k = 1: Switch; 2: Mixtral; 8: OLMoE, Qwen3-MoE
  g_j = p_{e_j}                             Switch, and Qwen-MoE / OLMoE without norm_topk_prob
  g_j = p_{e_j} / sum_j p_{e_j}             Mixtral, and with norm_topk_prob
  moe(x) = sum_j g_j expert_{e_j}(x)  [+ sigmoid(x w) shared_expert(x): Qwen2-MoE]
  expert(x) = down(silu(gate(x)) * up(x))   SwiGLU experts

Capacity (Switch section 2.2): in a forward over N tokens each expert takes at most
ceil(N k / E * capacity_factor) of them. The overflow is dropped first-come: the first choices of all
tokens in token order, then the second choices, ... (GShard's priority; for k = 1 it is token order,
as in Switch). A dropped assignment contributes 0, so a token that loses all of its experts passes
through the block's residual unchanged. The N tokens are the whole batch's, so with a capacity a
token's output depends on the other rows of the batch. Hence (model.forward, `dropless`):
  training (model.train())                      capacity_factor (Switch: 1.25)
  a validation loss (eval, targets given)       eval_capacity_factor (Switch and ST-MoE: 2.0)
  logits without targets in eval mode           dropless: few-shot scores, generation and anything
    (evaluation.py, generation.py), and any     that reads per-sequence outputs give the same
    forward with a KV cache (decoding)          numbers alone, in any batch, cached or not, and
                                                transformers' numbers for an export
0 as a factor means dropless. Checkpoints from transformers (Mixtral, Qwen-MoE, OLMoE) load with
both factors 0: those models are trained without a capacity.

Auxiliary losses (model.aux_losses(), which train.py's loss adds), each per sparse layer and averaged
over the sparse layers:
  balance_loss  alpha * E * sum_i f_i P_i  (Switch eq. 4-6). f_i: the fraction of the layer's N k
                routing assignments (the router's top-k, before the capacity) that go to expert i,
                so sum_i f_i = 1 and a uniform router gives alpha for any k (megablocks' convention:
                f divided by k). transformers' load_balancing_loss_func counts the top-k assignments
                without dividing by k (a uniform router gives alpha k) and pools f and P over all
                layers; for Switch's k = 1 and one layer the three agree. P_i: the mean router
                probability of expert i.
  z_loss        router_z_loss_coef * mean over tokens of logsumexp(router logits)^2 (ST-MoE, Zoph et
                al. 2022, eq. 5).
model.aux_metrics() logs the fraction of dropped assignments and the largest expert load (E max_i f_i:
1 balanced, E collapsed onto one expert).

Variants (config.json's model_type; the attention is models/qwen.py's, GQA with rotary embeddings):
  qwen3_moe  an RMSNorm over each head of q and of k; biases on q, k, v, o if attention_bias
  qwen2_moe  biases on q, k, v (qkv_bias); a shared expert; dense layers (decoder_sparse_step, mlp_only_layers)
  mixtral    plain attention; the top-k gates always renormalised
  olmoe      an RMSNorm over the whole q and the whole k projection; q, k, v clipped to +-clip_qkv
Module and tensor names are transformers' (Qwen-MoE's in memory: the experts of a layer stacked, as
transformers 5 holds them), so checkpoints load key for key; files store one matrix per expert.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitron import hub
from omnitron.kernels import KVCache, attention


# ----------------------------------------------------------------------------- config

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


VARIANTS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")  # the Hugging Face model_type of each
QK_NORM = {"qwen3_moe": "head", "olmoe": "full"}               # RMSNorm per head of q and k, or over all of q and k
EXPERTS_IMPLEMENTATIONS = ("auto", "loop", "grouped_mm")


@dataclass
class Config:
    # Defaults: Switch (top-1, capacity 1.25 / 2.0) in the size of the other files' defaults: 4 layers,
    # width 128, 8 experts of width 512, trainable on a laptop CPU. Mixtral 8x7B is mixtral with
    # vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, n_experts=8, top_k=2,
    # moe_intermediate_size=14336; OLMoE-1B-7B is olmoe with n_layer=16, n_embd=2048, n_experts=64,
    # top_k=8, moe_intermediate_size=1024; Qwen3-30B-A3B is qwen3_moe with n_layer=48, n_head=32,
    # n_kv_head=4, n_embd=2048, head_dim=128, n_experts=128, top_k=8, moe_intermediate_size=768.
    vocab_size: int = 151936
    block_size: int = 4096          # max_position_embeddings: the default cache length, dynamic's original context
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4              # key/value heads: n_head is multi-head attention, 1 multi-query
    n_embd: int = 128
    head_dim: int = 0               # 0: n_embd // n_head
    intermediate_size: int = 512    # the SwiGLU width of the dense layers (every layer when n_experts is 0)
    n_experts: int = 8              # E; 0: a dense model, every layer a SwiGLU MLP
    top_k: int = 1                  # experts per token: 1 Switch, 2 Mixtral, 8 OLMoE and Qwen3-MoE
    moe_intermediate_size: int = 512  # each expert's SwiGLU width
    norm_topk_prob: bool = False    # renormalise the k gates to sum 1 (always for mixtral; Switch: no)
    shared_expert_intermediate_size: int = 0  # qwen2_moe's shared expert (0: none), gated by sigmoid(x w)
    decoder_sparse_step: int = 1    # layer i (from 0) is sparse when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: str = ""       # ... and i is not in this comma-separated list (qwen2_moe, qwen3_moe)
    capacity_factor: float = 1.25   # training: an expert takes at most ceil(N k / E * factor) of N tokens; 0: dropless
    eval_capacity_factor: float = 2.0  # the same for a validation loss (model.eval(), targets given); logits
                                       # without targets (scores, generation) and decoding are dropless
    router_aux_loss_coef: float = 0.01  # alpha of the load-balancing loss (Switch: 1e-2)
    router_z_loss_coef: float = 0.001   # the router z-loss's coefficient (ST-MoE: 1e-3)
    router_jitter_noise: float = 0.0    # training multiplies the router's input (only) by U(1 - eps, 1 + eps)
    expert_dropout: float = 0.0     # dropout inside the experts in training (Switch's fine-tuning: 0.4)
    init_scale: float = 0.1         # Switch's initialisation: matrices ~ truncated N(0, init_scale / fan_in)
    experts_implementation: str = "auto"  # loop (per expert) | grouped_mm | auto: grouped_mm on CUDA in bf16;
                                          # the same numbers either way, so not saved in config.json
    variant: str = "qwen3_moe"      # qwen3_moe | qwen2_moe | mixtral | olmoe (see the top of the file)
    qkv_bias: bool = False          # biases on q, k and v (qwen2_moe's)
    attention_bias: bool = False    # biases on q, k, v and o (qwen3_moe's and olmoe's option)
    clip_qkv: float = 0.0           # olmoe: q, k, v clamped to [-clip_qkv, clip_qkv]; 0: no clipping
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True     # lm_head shares embed_tokens' matrix
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
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be {', '.join(VARIANTS)}; not {self.variant!r}")
        if self.experts_implementation not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation must be {', '.join(EXPERTS_IMPLEMENTATIONS)}; "
                             f"not {self.experts_implementation!r}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.top_k <= self.n_experts):
            raise ValueError(f"top_k ({self.top_k}) must be between 1 and n_experts ({self.n_experts})")
        if min(self.capacity_factor, self.eval_capacity_factor, self.expert_dropout, self.router_jitter_noise) < 0:
            raise ValueError("capacity factors, expert_dropout and router_jitter_noise must be >= 0")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, not {self.decoder_sparse_step}")
        if not re.fullmatch(r"(\d+(,\d+)*)?", self.mlp_only_layers.replace(" ", "")):
            raise ValueError(f"mlp_only_layers must be comma-separated layer numbers, not {self.mlp_only_layers!r}")
        if self.variant == "mixtral" and self.n_experts and not self.norm_topk_prob:
            raise ValueError("mixtral renormalises the top-k gates always: norm_topk_prob must be true")
        if self.shared_expert_intermediate_size and self.variant != "qwen2_moe":
            raise ValueError("a shared expert is a qwen2_moe option")

    def is_sparse(self, layer):
        """Whether block `layer` (from 0) holds a mixture of experts (else a dense SwiGLU MLP), as
        transformers' Qwen2-MoE and Qwen3-MoE decide it."""
        dense = {int(i) for i in self.mlp_only_layers.replace(" ", "").split(",") if i}
        return self.n_experts > 0 and layer not in dense and (layer + 1) % self.decoder_sparse_step == 0


# ----------------------------------------------------------------------------- building blocks

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


# Copied from models/llama.py:RMSNorm
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
    """Grouped-query attention with rotary embeddings, as models/qwen.py's Attention: n_head query
    heads, n_kv_head key/value heads. q and k normalised per head (qwen3_moe) or over the whole
    projection (olmoe, before the split into heads); olmoe clips q, k and v to +-clip_qkv."""

    def __init__(self, config, layer):
        super().__init__()
        self.head_dim, self.layer, self.clip = config.head_dim, layer, config.clip_qkv
        C, D = config.n_embd, config.head_dim
        qkv_bias = config.qkv_bias or config.attention_bias
        self.q_proj = nn.Linear(C, config.n_head * D, bias=qkv_bias)
        self.k_proj = nn.Linear(C, config.n_kv_head * D, bias=qkv_bias)
        self.v_proj = nn.Linear(C, config.n_kv_head * D, bias=qkv_bias)
        self.o_proj = nn.Linear(config.n_head * D, C, bias=config.attention_bias)
        self.qk_norm = QK_NORM.get(config.variant)
        if self.qk_norm:
            full = self.qk_norm == "full"
            self.q_norm = RMSNorm(config.n_head * D if full else D, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.n_kv_head * D if full else D, config.rms_norm_eps)

    def forward(self, x, rope, cache=None, mask=None):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = attention(q, k, v, causal=True, mask=mask, layer=self.layer, cache=cache)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), of the given width: the dense layers' and
    qwen2_moe's shared expert."""

    def __init__(self, n_embd, width):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, width, bias=False)
        self.up_proj = nn.Linear(n_embd, width, bias=False)
        self.down_proj = nn.Linear(width, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- the mixture-of-experts layer

def capacity_mask(experts, n_experts, capacity_factor):
    """Which routing assignments an expert accepts: experts (N, k) expert ids of N tokens' k choices
    -> (N, k) bool. Each expert takes at most ceil(N k / E * capacity_factor) assignments, first the
    first choices in token order, then the second choices, ... (Switch section 2.2; GShard's
    priority); capacity_factor 0: all (dropless)."""
    N, k = experts.shape
    if capacity_factor <= 0:
        return torch.ones_like(experts, dtype=torch.bool)
    capacity = math.ceil(N * k / n_experts * capacity_factor)
    onehot = F.one_hot(experts.t().reshape(-1), n_experts)  # (k N, E), choice-major
    arrival = (onehot.cumsum(0) * onehot).sum(-1)           # 1 for an expert's first assignment, 2 ...
    return (arrival <= capacity).view(k, N).t()


class Experts(nn.Module):
    """E SwiGLU experts, stacked as transformers 5 holds them in memory: gate_up_proj (E, 2I, H), the
    gate's rows first, and down_proj (E, H, I); one file stores one matrix per expert (see the end).
    forward computes only the assignments routed to each expert: a loop over the experts (the CPU's
    fastest) or torch's grouped_mm (one kernel for all, CUDA)."""

    def __init__(self, config):
        super().__init__()
        E, H, I = config.n_experts, config.n_embd, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.implementation, self.dropout = config.experts_implementation, config.expert_dropout

    def forward(self, x, tokens, experts, gates):
        """x (N, H); tokens, experts, gates (A,): the A accepted assignments (token row, expert id,
        gate) -> (N, H), each row the gated sum of its experts' outputs (0 for a row with none)."""
        order = experts.argsort(stable=True)  # the assignments grouped by expert
        tokens, gates = tokens[order], gates[order]
        counts = torch.bincount(experts, minlength=self.gate_up_proj.shape[0])
        xs = x[tokens]
        if self.uses_grouped_mm(x):
            h = self.grouped(xs, counts)
        else:
            h = torch.cat([self.expert(e, xe) for e, xe in enumerate(xs.split(counts.tolist())) if len(xe)]
                          or [xs[:0]])
        return torch.zeros_like(x).index_add_(0, tokens, (h * gates[:, None]).to(x.dtype))

    def uses_grouped_mm(self, x):
        if self.implementation == "auto":
            return x.is_cuda and x.dtype == torch.bfloat16
        return self.implementation == "grouped_mm"

    def expert(self, e, x):
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        h = F.dropout(F.silu(gate) * up, self.dropout, self.training)
        return F.linear(h, self.down_proj[e])

    def grouped(self, xs, counts):
        """The same products in two torch.nn.functional.grouped_mm calls: offs holds each expert's
        end row (int32); every row is some expert's, so none is past the last offset."""
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = F.grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        h = F.dropout(F.silu(gate) * up, self.dropout, self.training)
        return F.grouped_mm(h, self.down_proj.transpose(-2, -1), offs=offs)


class SparseMoE(nn.Module):
    """The mixture-of-experts layer (see the top of the file): a linear router (`gate`, as transformers
    names it) over E experts in fp32, top-k gates, the capacity, the experts, qwen2_moe's shared
    expert; its router statistics of the last forward in self.stats."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gate = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = Experts(config)
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.n_embd, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.n_embd, 1, bias=False)
        self.stats = {}

    def route(self, x):
        """x (N, H) -> router logits (N, E) and probabilities (N, E), in fp32 with autocast off
        (Switch's selective precision); in training the input is jittered when router_jitter_noise > 0
        (the router's input only: the experts see x as it is)."""
        eps = self.config.router_jitter_noise
        with torch.autocast(x.device.type, enabled=False):
            h = x.to(torch.promote_types(x.dtype, torch.float32))  # at least fp32: float64 stays float64
            if self.training and eps > 0:
                h = h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)
            logits = F.linear(h, self.gate.weight.to(h.dtype))
        return logits, logits.softmax(dim=-1)

    def forward(self, x, dropless=False):
        """x (B, T, H) -> (B, T, H). dropless: no capacity (decoding with a cache)."""
        cfg, shape = self.config, x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs = self.route(x)
        top_p, top_e = probs.topk(cfg.top_k, dim=-1)  # (N, k)
        gates = top_p / top_p.sum(-1, keepdim=True) if cfg.norm_topk_prob else top_p
        factor = 0.0 if dropless else cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        keep = capacity_mask(top_e, cfg.n_experts, factor)
        tokens = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(top_e)
        y = self.experts(x, tokens[keep], top_e[keep], gates[keep])
        if cfg.shared_expert_intermediate_size:
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        self.stats = router_stats(logits, probs, top_e, keep)
        return y.view(shape)


def router_stats(logits, probs, experts, keep):
    """One layer's router statistics of a forward over N tokens: logits and probs (N, E), experts and
    keep (N, k). balance: E * sum_i f_i P_i; z: mean logsumexp(logits)^2; dropped: the fraction of the
    N k assignments over capacity; load: E * max_i f_i (f, P: see the top of the file)."""
    E = probs.shape[-1]
    f = F.one_hot(experts, E).sum(1).float().mean(0) / experts.shape[1]  # sums to 1; not differentiable
    P = probs.mean(0)
    return {"balance": E * (f * P).sum(), "z": torch.logsumexp(logits, dim=-1).pow(2).mean(),
            "dropped": 1.0 - keep.float().mean(), "load": E * f.max()}


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.sparse = config.is_sparse(layer)
        self.mlp = SparseMoE(config) if self.sparse else MLP(config.n_embd, config.intermediate_size)

    def forward(self, x, rope, cache=None, mask=None, dropless=False):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, dropless=dropless) if self.sparse else self.mlp(h))


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
    # Copied from models/llama.py:Model.__init__
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

    def _init_weights(self, module):
        """Switch's initialisation (Fedus et al. 2021, section 2.3): every matrix drawn from a normal
        truncated at two standard deviations, std sqrt(init_scale / fan_in), init_scale 0.1 (a tenth of
        the usual scale, for stability); the embedding N(0, 0.02) as in the other files; zero biases."""
        std = lambda fan_in: math.sqrt(self.config.init_scale / fan_in)  # noqa: E731
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.Linear) and module.weight is not self.model.embed_tokens.weight:
            nn.init.trunc_normal_(module.weight, std=std(module.in_features), a=-2 * std(module.in_features),
                                  b=2 * std(module.in_features))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):
            for w in (module.gate_up_proj, module.down_proj):
                s = std(w.shape[-1])
                nn.init.trunc_normal_(w, std=s, a=-2 * s, b=2 * s)

    def forward(self, idx, targets=None, cache=None, prefix=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy against
        targets (B, T) when given (-1 targets are ignored). With a cache, idx continues the
        sequence the cache holds (its rows possibly left-padded: kernels.KVCache). prefix (B, P,
        n_embd), optional: embeddings placed before the tokens' (an image's soft prompt:
        omnitron/multimodal.py), in the first P positions; the logits and the loss are the tokens'
        only. With a cache the prefix goes in once, with the prompt (the prefill). The capacity
        (see the top of the file): capacity_factor in training, eval_capacity_factor for a loss in
        eval mode; dropless with a cache or in eval mode without targets, so that a row's logits
        do not depend on the other rows of the batch. (models/llama.py's forward but for that.)"""
        x, P = with_prefix(self.model.embed_tokens(idx), prefix, cache)
        T = x.shape[1]
        if cache is None:
            pos, mask, seq_len = torch.arange(T, device=idx.device)[None], None, T
        else:
            pos, mask = cache.positions(T, idx.device), cache.mask(T, idx.device)
            seq_len = cache.end(T) - cache.min_pad
        rope = rope_tables(self.config, self.config.head_dim, pos, seq_len)
        dropless = cache is not None or (not self.training and targets is None)
        for block in self.model.layers:
            x = block(x, rope, cache, mask, dropless)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.model.norm(x[:, P:]))
        return logits, None if targets is None else cross_entropy(logits, targets)

    # ------------------------------------------------------------------ what shared code relies on (DEVELOPERS.md)

    FAN_IN_FAN_OUT = ()  # names of the weights that Hugging Face's files store transposed: none

    # Copied from models/llama.py:Model.max_positions
    @property
    def max_positions(self):
        """None: rotary positions are computed for any length (block_size is the default cache length)."""
        return None

    def fsdp_units(self):
        """The modules that FSDP shards one by one, bottom-up: each layer's experts, then its block (the
        root is sharded last, by train.py)."""
        units = []
        for block in self.model.layers:
            units += [block.mlp.experts, block] if block.sparse else [block]
        return units

    def _router_stats(self):
        return [block.mlp.stats for block in self.model.layers if block.sparse and block.mlp.stats]

    def aux_losses(self):
        """The router losses of the last forward, averaged over the sparse layers: balance_loss
        (router_aux_loss_coef * E * sum_i f_i P_i) and z_loss (router_z_loss_coef * mean
        logsumexp^2); {} for a dense model (see the top of the file)."""
        stats, cfg = self._router_stats(), self.config
        if not stats:
            return {}
        mean = lambda key: torch.stack([s[key] for s in stats]).mean()  # noqa: E731
        return {"balance_loss": cfg.router_aux_loss_coef * mean("balance"), "z_loss": cfg.router_z_loss_coef * mean("z")}

    def aux_metrics(self):
        """Router statistics of the last forward, to log (not to train on): dropped_fraction (the
        assignments over capacity, averaged over the sparse layers) and max_expert_load (the largest
        E * max_i f_i of a layer: 1 balanced, E all on one expert); {} for a dense model."""
        stats = self._router_stats()
        if not stats:
            return {}
        return {"dropped_fraction": torch.stack([s["dropped"] for s in stats]).mean(),
                "max_expert_load": torch.stack([s["load"] for s in stats]).max()}

    # Copied from models/llama.py:Model.convert_kv_heads
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

    # Copied from models/llama.py:Model.num_params
    def num_params(self, non_embedding=True):
        """Parameters (tied weights once); without the token embedding when non_embedding, unless it
        is tied to lm_head (then it is the output layer's matrix, which costs compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def num_active_params(self, non_embedding=True):
        """Parameters that one token's forward multiplies by: num_params less the E - k experts of each
        sparse layer that it is not routed to (the router counted)."""
        cfg = self.config
        per_expert = 3 * cfg.n_embd * cfg.moe_intermediate_size
        n_sparse = sum(block.sparse for block in self.model.layers)
        return self.num_params(non_embedding) - n_sparse * (cfg.n_experts - cfg.top_k) * per_expert

    def flops_per_token(self, seq_len):
        """Training FLOPs (forward + backward) per token: 6 per active weight (num_active_params: k
        experts per sparse layer, and the router), plus the attention scores and their weighted sum,
        12 * n_layer * n_head * head_dim * seq_len (PaLM appendix B). Dropped assignments are not
        subtracted: the figure is what a token may cost."""
        cfg = self.config
        return 6 * self.num_active_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len

    # ------------------------------------------------------------------ generation hooks

    # Copied from models/llama.py:Model.init_cache
    def init_cache(self, batch_size, max_len=None, dtype=None, device=None, pad=None, static=False):
        """An empty kernels.KVCache for this model (pad and static: see there)."""
        cfg, p = self.config, self.lm_head.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, max_len or cfg.block_size, cfg.head_dim,
                       dtype or p.dtype, device or p.device, pad=pad, static=static)

    # ------------------------------------------------------------------ LoRA targets (lora.py)
    # --lora_targets' common names -> this file's linear layers, as module-name suffixes (PEFT's
    # target_modules rule). `mlp` adapts the dense layers and the shared expert; the stacked experts
    # are not nn.Linear layers, so LoRA leaves them (and the router) frozen.
    LORA_TARGETS = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"],
                    "mlp": ["gate_proj", "up_proj", "down_proj"]}

    # ------------------------------------------------------------------ Hugging Face import / export
    # Tensor names: model.embed_tokens.weight, model.layers.N.self_attn.{q,k,v,o}_proj.*,
    # model.layers.N.self_attn.{q,k}_norm.weight (qwen3_moe, olmoe), model.layers.N.mlp.gate.weight (the
    # router), model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight (per expert, as files store them;
    # transformers 5's stacked mlp.experts.gate_up_proj / down_proj read too),
    # model.layers.N.mlp.shared_expert.{gate,up,down}_proj.weight and mlp.shared_expert_gate.weight
    # (qwen2_moe), model.layers.N.mlp.{gate,up,down}_proj.weight (dense layers),
    # model.layers.N.{input,post_attention}_layernorm.weight, model.norm.weight, lm_head.weight (absent
    # when tied). Mixtral's files name the sparse layer block_sparse_moe and its experts' matrices
    # w1 (gate), w3 (up), w2 (down).

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device="cpu"):
        """The model of a Hugging Face directory (config.json + weights: hub.read_tensors), its tensors
        in their own dtype unless dtype is given. ValueError naming the option or tensor it refuses."""
        hf = hub.read_config(directory)
        variant = hf.get("model_type")
        if variant not in VARIANTS:
            raise ValueError(f"{directory}/config.json has model_type {variant!r}, not one of {', '.join(VARIANTS)}")
        hub.check_config(hf, CONFIG_KEYS, f"{directory}/config.json")
        if variant in ("qwen2_moe", "qwen3_moe") and hf.get("use_sliding_window"):
            raise ValueError(f"{directory}/config.json: use_sliding_window true (sliding-window attention) "
                             f"is not supported")
        if variant == "mixtral" and hf.get("sliding_window") is not None:
            raise ValueError(f"{directory}/config.json: sliding_window {hf['sliding_window']} (sliding-window "
                             f"attention) is not supported")
        if any(t != "full_attention" for t in hf.get("layer_types") or []):
            raise ValueError(f"{directory}/config.json: layer_types {hf['layer_types']} is not supported "
                             f"(only full_attention)")
        config = Config(**_config_fields(hf, variant), **_rope_config(hf, directory))
        with torch.device("meta"):
            model = cls(config)
        rename = _from_mixtral if variant == "mixtral" else None
        tensors = _stacked(hub.read_tensors(directory), config.n_experts, rename, directory)
        hub.load_weights(model, directory, dtype, device, tensors=tensors)
        config.tie_embeddings = model.lm_head.weight is model.model.embed_tokens.weight  # hub.load_weights may untie
        return model

    def save_pretrained(self, directory, metadata=None):
        """config.json + model.safetensors that transformers' class of config.variant loads with its
        default arguments, one matrix per expert as transformers' save_pretrained writes them
        (hub.write). Our own options (OWN_KEYS: the capacity factors, the z-loss, the initialisation)
        go into config.json too, under names that no transformers configuration reads; transformers
        computes dropless, as our forward does in eval mode without targets."""
        cfg = self.config
        state = _per_expert(hub.checkpoint_state(self))
        if cfg.variant == "mixtral":
            state = {_to_mixtral(k): v for k, v in state.items()}
        hub.write(directory, _hf_config(cfg, str(self.lm_head.weight.dtype).removeprefix("torch.")), state, metadata)


# ----------------------------------------------------------------------------- checkpoint layouts

PER_EXPERT = re.compile(r"(.*\.mlp\.experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
MIXTRAL = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
TO_MIXTRAL = {ours: theirs for theirs, ours in MIXTRAL.items()}


def _from_mixtral(name):
    """A Mixtral file's tensor name -> ours (block_sparse_moe -> mlp; w1, w3, w2 -> gate, up, down)."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    m = re.fullmatch(r"(.*\.experts\.\d+\.)(w[123])\.weight", name)
    return f"{m.group(1)}{MIXTRAL[m.group(2)]}.weight" if m else name


def _to_mixtral(name):
    """Our tensor name -> a Mixtral file's (the inverse of _from_mixtral)."""
    m = PER_EXPERT.fullmatch(name)
    name = f"{m.group(1)}{m.group(2)}.{TO_MIXTRAL[m.group(3)]}.weight" if m else name
    return name.replace(".mlp.", ".block_sparse_moe.")


def _stacked(tensors, n_experts, rename, directory):
    """(name, tensor) pairs of a file with the per-expert matrices of each layer stacked into our
    gate_up_proj (E, 2I, H) and down_proj (E, H, I), yielded once all 3 E of a layer are read (one layer
    held at a time); other tensors, the stacked layout of transformers 5's memory among them, pass
    through. ValueError naming an expert index out of range or a missing expert matrix."""
    pending = {}
    for name, tensor in tensors:
        name = rename(name) if rename else name
        m = PER_EXPERT.fullmatch(name)
        if not m:
            yield name, tensor
            continue
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        if e >= n_experts:
            raise ValueError(f"unexpected tensor {name!r} in {directory} (config.json has {n_experts} experts)")
        parts = pending.setdefault(prefix, {})
        parts[e, proj] = tensor
        if len(parts) == 3 * n_experts:
            del pending[prefix]
            yield prefix + "gate_up_proj", torch.stack([torch.cat([parts[e, "gate_proj"], parts[e, "up_proj"]])
                                                        for e in range(n_experts)])
            yield prefix + "down_proj", torch.stack([parts[e, "down_proj"] for e in range(n_experts)])
    for prefix, parts in pending.items():
        e, proj = next((e, p) for e in range(n_experts) for p in ("gate_proj", "up_proj", "down_proj")
                       if (e, p) not in parts)
        raise ValueError(f"tensor {prefix}{e}.{proj}.weight is missing from {directory}")


def _per_expert(state):
    """Our state dict with each stacked gate_up_proj / down_proj split into per-expert matrices."""
    out = {}
    for name, tensor in state.items():
        prefix, _, last = name.rpartition(".")
        if prefix.endswith(".experts") and last == "gate_up_proj":
            for e, w in enumerate(tensor):
                gate, up = w.chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate.contiguous(), up.contiguous()
        elif prefix.endswith(".experts") and last == "down_proj":
            for e, w in enumerate(tensor):
                out[f"{prefix}.{e}.down_proj.weight"] = w.contiguous()
        else:
            out[name] = tensor
    return out


# ----------------------------------------------------------------------------- config.json

# Our own options, written into config.json and read back (transformers keeps them as plain attributes
# and reads none of them: test_exports_load_in_transformers_with_its_defaults checks that each comes
# back as written). A checkpoint without them (every transformers one) is dropless and takes the
# other defaults. experts_implementation is not among them: transformers 5 reads a config.json key of
# that name as its own setting (eager | grouped_mm | ...) and refuses our "auto"; how the experts are
# computed is a choice of the machine, not of the checkpoint (Config.experts_implementation).
OWN_KEYS = {"capacity_factor": 0.0, "eval_capacity_factor": 0.0, "router_z_loss_coef": 0.001,
            "expert_dropout": 0.0, "init_scale": 0.1}


def _config_fields(hf, variant):
    """Config fields (all but rope's) from config.json, as transformers' class of `variant` reads it."""
    experts = hf.get("num_experts", hf.get("num_local_experts", 0))  # mixtral: num_local_experts
    sparse_step = hf.get("decoder_sparse_step", 1) if variant in ("qwen2_moe", "qwen3_moe") else 1
    only_dense = hf.get("mlp_only_layers") or [] if variant in ("qwen2_moe", "qwen3_moe") else []
    return dict(
        vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 4096),
        n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
        head_dim=hf.get("head_dim") or 0, n_experts=experts, top_k=hf["num_experts_per_tok"],
        # the experts' width: moe_intermediate_size (Qwen-MoE), intermediate_size (Mixtral, OLMoE)
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=hf.get("moe_intermediate_size") or hf["intermediate_size"],
        norm_topk_prob=variant == "mixtral" or hf.get("norm_topk_prob", False),
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if variant == "qwen2_moe" else 0,
        decoder_sparse_step=sparse_step, mlp_only_layers=",".join(str(i) for i in only_dense),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), router_jitter_noise=hf.get("router_jitter_noise", 0.0),
        variant=variant, qkv_bias=variant == "qwen2_moe" and hf.get("qkv_bias", True),
        attention_bias=variant in ("qwen3_moe", "olmoe") and hf.get("attention_bias", False),
        clip_qkv=hf.get("clip_qkv") or 0.0, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        **{key: hf.get(key, default) for key, default in OWN_KEYS.items()})


def _hf_config(cfg, dtype):
    """config.json of a model in transformers' form for cfg.variant."""
    v = cfg.variant
    hf = {"model_type": v, "architectures": [{"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                              "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM"}[v]],
          "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size, "hidden_size": cfg.n_embd,
          "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
          "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
          "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": _rope_parameters(cfg),
          "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.router_aux_loss_coef,
          "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None,
          "dtype": dtype}
    if v in ("mixtral", "olmoe") and (cfg.moe_intermediate_size != cfg.intermediate_size or not cfg.n_experts):
        raise ValueError(f"{v} has no dense layers: intermediate_size ({cfg.intermediate_size}) must equal "
                         f"moe_intermediate_size ({cfg.moe_intermediate_size}) and n_experts be > 0")
    if v in ("mixtral", "olmoe") and (cfg.decoder_sparse_step != 1 or cfg.mlp_only_layers):
        raise ValueError(f"{v} has no dense layers: decoder_sparse_step must be 1 and mlp_only_layers empty")
    if v == "mixtral":
        hf.update(num_local_experts=cfg.n_experts, intermediate_size=cfg.moe_intermediate_size,
                  router_jitter_noise=cfg.router_jitter_noise, sliding_window=None)
    else:
        hf.update(num_experts=cfg.n_experts, norm_topk_prob=cfg.norm_topk_prob)
    if v == "olmoe":
        hf.update(intermediate_size=cfg.moe_intermediate_size, attention_bias=cfg.attention_bias,
                  clip_qkv=cfg.clip_qkv or None)
    if v in ("qwen2_moe", "qwen3_moe"):
        hf.update(intermediate_size=cfg.intermediate_size, moe_intermediate_size=cfg.moe_intermediate_size,
                  decoder_sparse_step=cfg.decoder_sparse_step, use_sliding_window=False,
                  sliding_window=0 if v == "qwen2_moe" else None,  # what transformers' class sets without a window
                  mlp_only_layers=[int(i) for i in cfg.mlp_only_layers.replace(" ", "").split(",") if i])
    if v == "qwen2_moe":
        hf.update(shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, qkv_bias=cfg.qkv_bias)
    if v == "qwen3_moe":
        hf["attention_bias"] = cfg.attention_bias
    if v != "qwen2_moe" and cfg.qkv_bias:
        raise ValueError(f"qkv_bias (biases on q, k, v only) is qwen2_moe's; {v} has attention_bias")
    hf.update({key: getattr(cfg, key) for key in OWN_KEYS})
    return hf


# Every key of transformers' MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig and OlmoeConfig (beyond
# hub.COMMON_KEYS), and what from_pretrained does with it (hub.HONOURED, INERT, TRAINING, CHECKED; a
# tuple: the values honoured, any other refused in one line).
CONFIG_KEYS = {
    "vocab_size": hub.HONOURED, "hidden_size": hub.HONOURED, "intermediate_size": hub.HONOURED,
    "num_hidden_layers": hub.HONOURED, "num_attention_heads": hub.HONOURED, "num_key_value_heads": hub.HONOURED,
    "head_dim": hub.HONOURED, "rms_norm_eps": hub.HONOURED, "tie_word_embeddings": hub.HONOURED,
    "max_position_embeddings": hub.HONOURED,
    "hidden_act": ("silu",),              # the SwiGLU gate: other activations are not implemented
    "rope_parameters": hub.HONOURED, "rope_scaling": hub.HONOURED, "rope_theta": hub.HONOURED,
    "original_max_position_embeddings": hub.HONOURED,
    # the experts
    "num_experts": hub.HONOURED, "num_local_experts": hub.HONOURED,  # mixtral's; transformers 5.24 writes it for qwen3_moe
    "num_experts_per_tok": hub.HONOURED, "moe_intermediate_size": hub.HONOURED, "norm_topk_prob": hub.HONOURED,
    "shared_expert_intermediate_size": hub.HONOURED, "decoder_sparse_step": hub.HONOURED,
    "mlp_only_layers": hub.HONOURED,
    # attention
    "qkv_bias": hub.HONOURED, "attention_bias": hub.HONOURED, "clip_qkv": hub.HONOURED,
    # sliding-window attention is not implemented: use_sliding_window true, a layer_types entry other
    # than full_attention, or mixtral's sliding_window set is refused; qwen's sliding_window and
    # max_window_layers act only with use_sliding_window
    "use_sliding_window": hub.CHECKED, "layer_types": hub.CHECKED, "max_window_layers": hub.CHECKED,
    "sliding_window": hub.CHECKED,
    # training only: the router losses' coefficients and jitter, dropout (the attention kernels have none)
    "router_aux_loss_coef": hub.TRAINING, "router_jitter_noise": hub.TRAINING, "output_router_logits": hub.INERT,
    "attention_dropout": hub.TRAINING,
    **{key: hub.HONOURED for key in OWN_KEYS},
    # transformers' own setting (eager, grouped_mm, ...; which earlier versions of this file wrote with
    # our values): the same numbers with any value, so it is not read
    "experts_implementation": hub.INERT,
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
