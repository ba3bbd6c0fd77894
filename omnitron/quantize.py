"""Weight-only quantization for decoding, for every model in models/ (gpt-fast's scheme,
quantize.py there: WeightOnlyInt8QuantHandler).

  model = quantize.quantize(model, "int8")   # every nn.Linear -> Int8Linear, in place; returns model
  model = quantize.quantize(model, "bf16")   # every nn.Linear -> BF16Linear (bf16 weights, fp32 in and out)

At batch 1 a decoding step reads every weight once per token, so its speed is the bytes of the
weights over the memory bandwidth (bench.py decode prints that roofline). int8 weights are a
quarter of fp32's bytes, bf16 weights half.

int8: each output channel (row n of a Linear's weight (N, K)) gets one fp32 scale,
s_n = max_k |W[n, k]| / 127, and W[n, k] is stored as round(W[n, k] / s_n) in int8 (symmetric,
per-output-channel; no zero point). The product is dequantized inside the matmul:
y = (x @ W_int8^T) * s + b. On CPU that is aten._weight_int8pack_mm, torch's fused int8-weight
kernel, which reads the int8 weight directly; it is fast with bf16 activations and output (on this project's
AVX2 CPU it is several times slower in fp32 than the fp32 matmul it replaces), so the activations
enter it in bf16 and its bf16 output is scaled in fp32 (fp32 scales), then cast to the input's dtype.
Elsewhere (CUDA) the product is gpt-fast's F.linear(x, W_int8.to(x.dtype)) * s, which torch.compile
fuses into one kernel. x @ W_int8^T is up to 127 / max|W| times larger than the layer's output
(weights of 0.01: 12,700 times), so it never sits in float16 (largest value 65,504): in float16 the
weight is scaled (in fp32) before the product (F.linear(x, (W_int8 * s).to(x.dtype))), and on CPU the bf16
product (fp32's range) is scaled before the cast.

What is quantized: every nn.Linear but a mixture of experts' routers (KEEP), the output head included (for tied embeddings the head gets
its own int8 copy; the embedding table stays in its dtype: a lookup reads one row per token).
Not quantized: embeddings, norms, and models/switch.py's stacked expert matrices (parameters
(E, 2I, H), not nn.Linear layers). Quantizing at load is cheap (one pass over the weights);
save_pretrained of a quantized model is not supported (the checkpoint stays the fp32 one).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEMES = ("none", "int8", "bf16")
# Routers stay in full precision (gpt-fast's mixtral-moe leaves its gate too): models/switch.py's
# mixture-of-experts `gate` and `shared_expert_gate`. A router's choice is discrete, so a small
# error flips a token to another expert; they are a few columns wide and cost no bandwidth.
KEEP = ("gate", "shared_expert_gate")


def int8_per_channel(weight):
    """weight (N, K) float -> (int8 (N, K), fp32 scales (N,)): symmetric per-output-channel
    quantization, scale = max |row| / 127 (an all-zero row gets scale 1)."""
    w = weight.detach().float()
    largest = w.abs().amax(dim=1)
    scales = torch.where(largest > 0, largest / 127, torch.ones_like(largest))
    return (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights (N, K) and fp32 per-output-channel scales (N,):
    x (..., K) -> (..., N) in x's dtype. See the module docstring for the kernel it uses."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scales = int8_per_channel(linear.weight)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        # the CPU kernel multiplies by bf16 scales; ones there and the fp32 scales after keep them exact
        self.register_buffer("unit_scales", torch.ones_like(scales, dtype=torch.bfloat16), persistent=False)
        self.bias = linear.bias

    def forward(self, x):
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight,
                                                   self.unit_scales)
            y = (y.view(*x.shape[:-1], self.out_features).float() * self.scales).to(x.dtype)
        elif x.dtype == torch.float16:  # the unscaled product would overflow float16: scale the weight first
            y = F.linear(x, (self.weight.float() * self.scales[:, None]).to(x.dtype))
        else:  # gpt-fast's form: torch.compile fuses the dequantization into the product
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class BF16Linear(nn.Module):
    """A Linear layer with bf16 weights that takes and returns x's dtype: x (..., K) -> (..., N).
    Unlike autocast (which casts the fp32 weights at every call), the weights are stored in bf16."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(torch.bfloat16),
                                                                   requires_grad=False)

    def forward(self, x):
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


@torch.no_grad()
def quantize(model, scheme="int8"):
    """Replace every nn.Linear of model but the routers (KEEP), in place, by its Int8Linear (scheme "int8") or BF16Linear
    ("bf16"); "none" leaves the model as it is. Returns the model. ValueError for another scheme.
    Decoding code reads the compute dtype from generation.compute_dtype (the first floating-point
    parameter), not from lm_head.weight, which becomes int8."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme == "none":
        return model
    kind = Int8Linear if scheme == "int8" else BF16Linear
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and child_name not in KEEP:
                setattr(module, child_name, kind(child))
    return model


def weight_bytes(model):
    """Bytes of every parameter and buffer of model (tied tensors once): what one decoding step
    at batch 1 reads, but for the embedding tables (see bench.decode_bytes_per_token)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.nbytes
    return total
