"""LoRA: low-rank adaptation of a frozen model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"), for every model in models/, saved in Hugging Face PEFT's adapter format.

A frozen weight W (out x in) is adapted by the product of two small matrices (section 4.1):

    h = W x + (alpha / r) * B A x        A: r x in,  B: out x r,  r << min(in, out)

A starts random (the paper draws it from a Gaussian; we use PEFT's Kaiming-uniform) and B at zero,
so the adapted model starts as exactly the base model; only A and B are trained, so gradients and
optimizer state exist for them alone. alpha / r keeps the size of the update about the same when r changes (section 4.1);
rank-stabilised LoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead. After training,
W + (alpha / r) B A is one matrix again (merge): no extra cost at inference.

Which layers: every model file maps the common names q, k, v, o, mlp to its own linear layers in
the constant Model.LORA_TARGETS; `all` is every linear layer but the output head. The paper adapts
W_q and W_v (section 7.1), train.py's default.

Files, in PEFT's layout, so that `peft.PeftModel.from_pretrained(transformers_model, dir)` loads them:
  adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, use_rslora, target_modules
                             (module-name suffixes, matched as PEFT matches them), fan_in_fan_out,
                             base_model_name_or_path (the base model's directory)
  adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r)
Our module names are transformers' (GPT2LMHeadModel, LlamaForCausalLM, ...), so <module> is the same
in both. Hugging Face's GPT-2 stores its linear layers as Conv1D (W transposed); PEFT still keeps A
and B in nn.Linear's orientation and transposes only when merging (fan_in_fan_out: true), so the
tensors are the same as for nn.Linear.

Tied weights (a merge never changes a tensor that another module shares): a Llama, Qwen or Phi
with tie_word_embeddings uses one matrix as its embedding and its output head. An adapter on
lm_head (PEFT's target_modules may name it; --lora_targets never does) changes the head only, so
merge gives the head its own merged matrix, keeps the embedding, and sets the config's
tie_embeddings to false: what PEFT advises (untie, then merge; PEFT's own merge_and_unload writes the
shared matrix and moves the embedding too). The same holds for any adapted weight shared with
another parameter or buffer. A file that ties by construction (models/gpt.py: no config key unties
it) cannot hold the untied result: merging there is refused in one line, and the adapter still
runs unmerged. PEFT's default save of an adapter on lm_head (save_embedding_layers="auto") also
stores the base head, base_model.model.lm_head.base_layer.weight: load_adapter loads it as PEFT's
loader does, into the model's tensor (the tied embedding too), and save_adapter writes it back when
it differs from the base model's.
"""
import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn

from omnitron.runtime import atomic_write, load_tensors, read_json

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model, before our module names
PEFT_FIXED = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "inference_mode": True,
              "init_lora_weights": True}
# PEFT options that change what an adapter computes and that this file does not implement
PEFT_UNSUPPORTED = ("use_dora", "lora_bias", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform",
                    "exclude_modules", "target_parameters", "trainable_token_indices", "layer_replication",
                    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "kasa_config",
                    "monteclora_config")


@dataclass
class LoRAConfig:
    """The hyperparameters of one adapter; the field names are adapter_config.json's (PEFT's)."""
    r: int
    lora_alpha: float
    target_modules: list            # module-name suffixes (see targeted)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    @property
    def scaling(self):
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus its low-rank update: base(x) + scaling * B(A(dropout(x))).
    A and B are fp32 whatever the base's dtype (the optimizer updates them); the update is added in
    fp32 and the sum returned in the base's dtype, as PEFT does. While `disabled` (disable_adapter),
    it is the base layer alone."""

    def __init__(self, base, config):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, config.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(config.r, base.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.disabled = False
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation of A
        nn.init.zeros_(self.lora_B.weight)  # B A = 0: the adapted model starts as the base model

    def forward(self, x):
        result = self.base(x)
        if self.disabled:
            return result
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return (result + update * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merged(self):
        """The base layer with scaling * B A added to its weight (computed in fp32)."""
        w = self.base.weight
        w.copy_((w.float() + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())).to(w.dtype))
        return self.base


# ----------------------------------------------------------------------------- applying and merging

def resolve_targets(model, names):
    """--lora_targets ("q,v", "all", ...) -> module-name suffixes, through the LORA_TARGETS table of
    the model's file; an unknown name is an error that lists the known ones."""
    table = type(model).LORA_TARGETS
    wanted = [n.strip() for n in names.split(",")]
    for n in wanted:
        if n not in table and n != "all":
            raise ValueError(f"--lora_targets: unknown target {n!r}; choose from {', '.join(table)} or all")
    chosen = table if "all" in wanted else wanted
    return list(dict.fromkeys(module for n in chosen for module in table[n]))  # gpt: q, k, v are one c_attn


def targeted(name, targets):
    """PEFT's rule for a list of target_modules: a module's full name is a target or ends with
    "." + a target."""
    return name in targets or any(name.endswith("." + t) for t in targets)


def linear_targets(model, config):
    """The names of the layers that config.target_modules names; one that is not an nn.Linear (an
    nn.Embedding, which PEFT adapts, or a block, which PEFT refuses) is a ValueError naming it."""
    names = [name for name, m in model.named_modules() if name and targeted(name, config.target_modules)]
    for name in names:
        module, kind = model.get_submodule(name), type(model.get_submodule(name)).__name__
        if not isinstance(module, nn.Linear):
            raise ValueError(f"the LoRA target {name} is a{'n' if kind[0] in 'AEIOU' else ''} {kind}: "
                             "LoRA here adapts linear layers (nn.Linear) only")
    return names


def apply(model, config, base_dtype=None):
    """Freeze every parameter of the model (cast to base_dtype if given: the frozen weights need no
    fp32 master copy), then wrap each nn.Linear that config.target_modules names in a LoRALinear.
    A target that names another kind of module (an nn.Embedding, a block) is a ValueError.
    In place; returns the model."""
    if hasattr(model, "lora_config"):
        raise ValueError("the model already has LoRA adapters")
    if config.r < 1:
        raise ValueError(f"the LoRA rank must be at least 1, not {config.r}")
    model.requires_grad_(False)
    if base_dtype is not None:
        model.to(base_dtype)
    names = linear_targets(model, config)
    if not names:
        raise ValueError(f"no linear layer of {type(model).__module__} matches the LoRA targets {config.target_modules}")
    for name in names:
        parent, _, child = name.rpartition(".")
        wrapper = LoRALinear(model.get_submodule(name), config).train(model.training)  # dropout as the model's
        setattr(model.get_submodule(parent), child, wrapper)
    model.lora_config = config
    return model


def merge(model):
    """Fold every adapter into its base weight, W + scaling * B A, and unwrap it (PEFT's
    merge_and_unload): the model is again a plain model of its file, which save_pretrained writes in
    Hugging Face format. In place; returns the model.

    An adapted weight that shares its tensor with another parameter or buffer (a head tied to the
    embedding) first gets its own copy, so nothing but the adapted layers changes; the config says
    so (tie_embeddings false) when the untied pair is one the file ties. Raises ValueError, before
    changing anything, when the model's file ties the pair whatever its config (models/gpt.py)."""
    untie = _shared_weights(model)
    if untie:
        config = _config_untying(model, untie)
        for name in untie:
            base = model.get_submodule(name).base
            base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
        vars(model.config).update(vars(config))  # in place: every module holding the config sees it
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    del model.lora_config
    model.__dict__.pop("lora_base_tensors", None)
    return model


@contextmanager
def disable_adapter(model):
    """Within the block, every LoRALinear of the model computes its frozen base layer alone: the
    model is its base model, bit for bit, with no second copy held (PEFT's `with
    model.disable_adapter():`). DPO's reference model under --lora_rank (dpo.py). A model without
    adapters: ValueError."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA adapters to disable")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def _plain_name(name, wrapped):
    """A tensor's name in the model without adapters: a wrapped layer's tensors live under .base."""
    module, _, param = name.rpartition(".")
    return module.removesuffix(".base") + "." + param if module.removesuffix(".base") in wrapped else name


def _shared_weights(model):
    """{adapted layer: [the other parameters and buffers that share its weight's storage, by their
    names in the model without adapters]}, for the adapted layers whose weight is shared."""
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    owners = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if t.numel():
            owners.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(_plain_name(name, wrapped))
    shared = {}
    for name in wrapped:
        w = model.get_submodule(name).base.weight
        others = [n for n in owners[(w.device, w.untyped_storage().data_ptr())] if n != name + ".weight"]
        if others:
            shared[name] = others
    return shared


def _config_untying(model, untie):
    """The model's config for its file to build the layers of `untie` (see _shared_weights) with
    weights of their own: the same config when the file does not tie them, tie_embeddings false
    when that key ties them; else a ValueError naming the pair."""
    pairs = [(name + ".weight", other) for name, others in untie.items() for other in others]
    candidates = [model.config]
    if getattr(model.config, "tie_embeddings", False):
        candidates.append(replace(model.config, tie_embeddings=False))
    for config in candidates:
        with torch.device("meta"):
            fresh = type(model)(config)
        ids = {n: id(p) for n, p in fresh.named_parameters(remove_duplicate=False)}
        tied = [(a, b) for a, b in pairs if a in ids and ids[a] == ids.get(b)]
        if not tied:
            return config
    a, b = tied[0]
    raise ValueError(f"lora.merge: {a} shares its tensor with {b} and {type(model).__module__.replace('.', '/')}.py "
                     "cannot untie them (no config key does); use the adapter unmerged")


def count_params(model):
    """(trainable parameters, all parameters); a tied matrix counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- files (PEFT's layout)

def is_adapter(directory):
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def _adapter_key(name):
    return ".lora_A." in name or ".lora_B." in name


def save_adapter(model, directory, state=None, metadata=None):
    """adapter_config.json + adapter_model.safetensors, each written under a temporary name and
    renamed. The tensors are the adapter's entries of `state` (default: the model's state dict;
    train.py passes the one it gathered from every process), and the base tensors that load_adapter
    honoured because they differ from the base model's; `metadata` goes into the safetensors header
    (train.py records the step)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    tensors = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in state.items() if _adapter_key(k)}
    tensors.update(getattr(model, "lora_base_tensors", {}))  # base tensors of the loaded file that differ
    # weights stored transposed in Hugging Face's file (Conv1D: the model's FAN_IN_FAN_OUT): PEFT must know
    config = {**PEFT_FIXED, **asdict(model.lora_config), "fan_in_fan_out": bool(model.FAN_IN_FAN_OUT)}
    atomic_write(directory / ADAPTER_WEIGHTS,
                      lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))
    atomic_write(directory / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def read_config(directory):
    """adapter_config.json (ours or PEFT's) as a LoRAConfig; PEFT options that change what the
    adapter computes, and which this file does not implement, are refused."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {directory}")
    cfg = read_json(path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in PEFT_UNSUPPORTED:
        if cfg.get(key):
            raise ValueError(f"{path}: the PEFT option {key} is not supported")
    if cfg.get("bias", "none") != "none" or not isinstance(cfg.get("target_modules"), list):
        raise ValueError(f"{path}: only bias 'none' and a list of target_modules are supported")
    return LoRAConfig(**{f.name: cfg[f.name] for f in fields(LoRAConfig) if f.name in cfg})


def base_path(directory):
    """The base model directory of an adapter folder (adapter_config.json's base_model_name_or_path)."""
    base = read_config(directory).base_model_name_or_path
    if not base or not Path(base).is_dir():
        raise ValueError(f"{Path(directory) / ADAPTER_CONFIG}: the base model {base!r} is not a model directory")
    return Path(base)


def load_adapter(model, directory, base_dtype=None):
    """Apply the adapter saved in `directory` to its base model (freezing it; see apply), checking
    every tensor's name and shape. Base tensors in the file (PEFT's save_embedding_layers, see
    _stored_base_tensors) are loaded into the model as PEFT loads them. In place; returns the model.
    Raises ValueError naming the tensor when one is unexpected, has the wrong shape, or is missing."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {directory}")
    config = read_config(directory)
    stored = load_tensors(path)
    differ = _stored_base_tensors(model, config, {k: v for k, v in stored.items() if not _adapter_key(k)}, path)
    apply(model, config, base_dtype)
    expected = {k: v for k, v in model.state_dict().items() if _adapter_key(k)}
    state = {}
    for key, tensor in stored.items():
        if not _adapter_key(key):
            continue
        name = key.removeprefix(PEFT_PREFIX)
        if name not in expected:
            raise ValueError(f"unexpected tensor {key!r} in {path}")
        if tensor.shape != expected[name].shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the model needs {tuple(expected[name].shape)}")
        state[name] = tensor
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"tensor {PEFT_PREFIX + missing[0]!r} is missing from {path}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=False)  # copied into the fp32 adapters
    if differ:
        wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
        current = {_plain_name(n, wrapped): t for n, t in model.state_dict(keep_vars=True).items()}
        with torch.no_grad():
            for name, (key, tensor) in differ.items():
                current[name].copy_(tensor)  # a tied tensor: every module sharing it, as in PEFT
        model.lora_base_tensors = {key: tensor for key, tensor in differ.values()}
    return model


def _stored_base_tensors(model, config, stored, path):
    """PEFT's save_pretrained with save_embedding_layers (by default when target_modules names
    embed_tokens or lm_head) also stores base tensors: base_model.model.<layer>.base_layer.<tensor> for
    an adapted layer, base_model.model.<layer>.<tensor> for another. PEFT's loader copies them into
    the model (load_state_dict). Called before apply: returns {the model's tensor name: (file key,
    tensor)} for those that differ from the model's (cast to its dtype), to be honoured. A key that
    names no tensor of the model (PEFT would pass over it), a wrong shape, or two keys for one
    tied tensor with different values are a ValueError naming the key."""
    linear = set(linear_targets(model, config))
    current = model.state_dict(keep_vars=True)
    differ, seen = {}, {}
    for key, tensor in stored.items():
        layer, base_layer, param = key.removeprefix(PEFT_PREFIX).partition(".base_layer.")
        name = f"{layer}.{param}" if base_layer else layer
        owner = layer if base_layer else name.rpartition(".")[0]
        # in PEFT's model an adapted layer's own tensors are under .base_layer., another layer's are not
        if not key.startswith(PEFT_PREFIX) or name not in current or (owner in linear) != bool(base_layer):
            raise ValueError(f"unexpected tensor {key!r} in {path}")
        mine = current[name].detach()
        if tensor.shape != mine.shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the model needs {tuple(mine.shape)}")
        storage = (mine.device, mine.untyped_storage().data_ptr())
        if storage in seen and not torch.equal(seen[storage][1], tensor):
            raise ValueError(f"tensors {seen[storage][0]!r} and {key!r} in {path} are one tied tensor of the model "
                             "and differ")
        seen[storage] = (key, tensor)
        if not torch.equal(tensor.to(device=mine.device, dtype=mine.dtype), mine):
            differ[name] = (key, tensor)
    return differ
