"""Hugging Face model directories, read and written for every model file (what transformers keeps in
its modeling_utils.py). A model file says what is about its architecture: how its Config reads and
writes config.json, which tensor names differ from its module names, which weights the file stores
transposed (Model.FAN_IN_FAN_OUT). This file does the rest, once:

  read_config(dir)            config.json as a dict
  read_tensors(dir)           (name, tensor) from model.safetensors, shards or pytorch_model.bin, in
                              transformers' order of preference (weight_files)
  load_weights(model, dir)    a model built on the meta device, filled from the files, every name
                              and shape checked
  checkpoint_state(model)     the tensors to write (tied matrices once, FAN_IN_FAN_OUT transposed)
  write(dir, config, state)   config.json + model.safetensors, each written temp-then-rename; the
                              folder's other weight files (old shards, pytorch_model.bin, an
                              adapter) removed, so one set of weights is left
  check_config(values, rules) the keys of config.json (or of its rope_parameters) that a model file
                              refuses, each refused in one line naming it

Every key of a supported configuration class is honoured or refused, never ignored while it changes
the forward pass: each model file keeps a table, CONFIG_KEYS, of what it does with each key of its
transformers configuration class (a test walks the class's keys and finds each in the table, or in
COMMON_KEYS below); the sub-keys of rope_parameters / rope_scaling are in ROPE_KEYS.

Loading never executes code: safetensors, or torch.load(weights_only=True) for pytorch_model.bin.
"""
import json
from pathlib import Path

import torch

from omnitron.runtime import atomic_write, load_tensors, read_json

CONFIG, WEIGHTS = "config.json", "model.safetensors"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded checkpoints
# The weight files of a directory in transformers' order of preference (modeling_utils.py,
# _get_resolved_checkpoint_files, for a local folder): the first one present is the checkpoint.
PREFERENCE = (WEIGHTS, INDEXES[0], "pytorch_model.bin", INDEXES[1])
# A PEFT adapter's files: with adapter_config.json in a folder, checkpoints.load (and transformers
# with peft installed) read the adapter and its base model instead of the folder's own weights.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


# ----------------------------------------------------------------------------- config.json keys

# What a model file does with a config.json key (the values of its CONFIG_KEYS table):
HONOURED = "honoured"  # read into Config: the forward computes what transformers' does with it
INERT = "inert"        # enters no forward pass: ids, initialisation, output flags, other tasks' heads
TRAINING = "training"  # a dropout probability: changes no logits; see the model file for which one it applies
CHECKED = "checked"    # read together with other keys; from_pretrained refuses what it cannot compute
# a tuple: the values that are honoured; any other value is refused (check_config)

# The keys of transformers' PreTrainedConfig (every model type has them) that no forward pass reads.
COMMON_KEYS = {
    "transformers_version": INERT, "architectures": INERT, "_name_or_path": INERT,
    "model_type": HONOURED,               # picks the model file (models.MODEL_TYPES)
    "dtype": INERT,                       # the tensors keep their stored dtype unless dtype= asks otherwise
    "torch_dtype": INERT,                 # the Hub's older name of dtype
    "output_hidden_states": INERT, "output_attentions": INERT, "return_dict": INERT,
    "chunk_size_feed_forward": INERT,     # read by none of these model types (and chunking is exact anyway)
    "is_encoder_decoder": INERT,          # a causal LM class ignores it
    "id2label": INERT, "label2id": INERT, "problem_type": INERT,  # classification heads
    "use_cache": INERT, "bos_token_id": INERT, "eos_token_id": INERT, "pad_token_id": INERT,
    "initializer_range": INERT,
}

# The sub-keys of rope_parameters (transformers 5) or rope_scaling (the Hub's form): transformers'
# RopeParameters, as rope_frequencies in models/llama.py, qwen.py and phi.py computes them. Strict:
# an unknown sub-key (a per-layer-type nested dict, say) is refused too.
ROPE_KEYS = {
    "rope_type": HONOURED, "type": HONOURED,  # default, linear, dynamic, yarn, llama3 (Config refuses others)
    "rope_theta": HONOURED, "factor": HONOURED, "original_max_position_embeddings": HONOURED,
    "attention_factor": HONOURED, "beta_fast": HONOURED, "beta_slow": HONOURED,  # yarn
    "low_freq_factor": HONOURED, "high_freq_factor": HONOURED,  # llama3
    "short_factor": INERT, "long_factor": INERT,  # longrope only, whose rope_type is refused
    "mscale": (None, 0), "mscale_all_dim": (None, 0),  # yarn's DeepSeek-style attention factor: not implemented
    "truncate": (None, True),             # yarn without rounding the ramp's ends: not implemented
    "partial_rotary_factor": (None, 1),   # Llama and Qwen rotate every dimension (models/phi.py honours it)
    "mrope_section": (None,),             # multimodal rotary sections
}


def check_config(values, rules, where, strict=False):
    """Refuse what `rules` (a CONFIG_KEYS or ROPE_KEYS table) refuses in `values` (config.json as a
    dict, or its rope_parameters): a key whose rule is a tuple of the honoured values and whose value
    is none of them or, when strict, a key the table does not list. `where` opens the message.
    Raises ValueError, one line naming the key and its value."""
    for key, value in values.items():
        rule = rules.get(key)
        if rule is None and strict:
            raise ValueError(f"{where}: {key} ({value!r}) is not supported")
        if isinstance(rule, tuple) and value not in rule:
            raise ValueError(f"{where}: {key} {json.dumps(value)} is not supported "
                             f"(supported: {', '.join(json.dumps(v) for v in rule)})")


# ----------------------------------------------------------------------------- reading

def read_config(directory):
    """config.json of a model directory as a dict. FileNotFoundError when there is none."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    return read_json(path)


def weight_files(directory):
    """The weight files of a model directory that a loader reads, in transformers' order of
    preference (PREFERENCE): model.safetensors, else the shards that model.safetensors.index.json
    names, else pytorch_model.bin, else the shards of pytorch_model.bin.index.json. Names relative to
    the directory, sorted; [] when there is none."""
    directory = Path(directory)
    for name in PREFERENCE:
        if (directory / name).is_file():
            if name in INDEXES:
                return sorted(set(read_json(directory / name)["weight_map"].values()))
            return [name]
    return []


def read_tensors(directory):
    """Yield (name, tensor) from the files weight_files(directory) names (model.safetensors, shards,
    or pytorch_model.bin loaded weights-only), one file at a time (a shard is freed before the next
    is read). FileNotFoundError when the directory holds none of them."""
    directory = Path(directory)
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or *.index.json in {directory}")
    for name in files:
        tensors = load_tensors(directory / name)  # a damaged file: one error naming it
        yield from tensors.items()
        del tensors


def _tied(model):
    """(names of the tensors to store, {alias: name}): a parameter shared by several modules (tied
    embeddings) is stored once, under the first name the state dict gives it."""
    first, aliases = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return list(first.values()), aliases


def load_weights(model, directory, dtype=None, device="cpu", rename=None, tensors=None):
    """Fill `model`, built on the meta device, with the tensors of `directory` (assign=True: they
    become the parameters, so the weights are never held twice), then re-tie shared parameters.

    rename(name) -> the model's name for a checkpoint tensor, or None to skip it (buffers that the
    architecture recomputes, say); default: the same name. Weights whose names end with one of
    model.FAN_IN_FAN_OUT are transposed. dtype: None keeps each tensor's own. tensors: the (name,
    tensor) pairs to load, default read_tensors(directory) (a model file that regroups the stored
    tensors passes its own stream: models/switch.py stacks per-expert matrices).

    A parameter the model ties (lm_head.weight to the embedding) is read as transformers' loader
    reads it: the checkpoint stores it once, under either name; stored under both names with equal
    values, it stays tied; with different values, the two are untied, each its stored tensor (then
    `model.lm_head.weight is not` the embedding: the model file sets its Config from that).
    Raises ValueError naming the tensor when one is unexpected, has the wrong shape, or is missing."""
    names, aliases = _tied(model)
    expected = {k: v for k, v in model.state_dict().items() if k in set(names)}
    expected.update({alias: expected[name] for alias, name in aliases.items()})
    state, stored_aliases = {}, {}
    for key, tensor in read_tensors(directory) if tensors is None else tensors:
        key = rename(key) if rename else key
        if key is None:
            continue
        if key not in expected:
            raise ValueError(f"unexpected tensor {key!r} in {directory}")
        if key.endswith(model.FAN_IN_FAN_OUT):
            tensor = tensor.t()
        if tensor.shape != expected[key].shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the config needs "
                             f"{tuple(expected[key].shape)}")
        tensor = tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()
        (stored_aliases if key in aliases else state)[key] = tensor
    untied = {}
    for alias, tensor in stored_aliases.items():
        name = aliases[alias]
        if name not in state:  # stored under the alias only: tie to it (transformers swaps the two)
            state[name] = tensor
        elif not (tensor.dtype == state[name].dtype and torch.equal(tensor, state[name])):
            untied[alias] = tensor  # two different matrices: transformers keeps both, untied
    missing = sorted(set(expected) - set(state) - set(aliases))
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing from {directory}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    for alias, name in aliases.items():  # assign=True replaced the parameter under `name` only
        module, _, attr = alias.rpartition(".")
        source = model.get_parameter(name)
        tied = torch.nn.Parameter(untied[alias], source.requires_grad) if alias in untied else source
        setattr(model.get_submodule(module), attr, tied)
    return model


# ----------------------------------------------------------------------------- writing

def checkpoint_state(model):
    """The model's tensors as Hugging Face stores them: tied parameters once (under their first
    name), weights named in model.FAN_IN_FAN_OUT transposed, detached and contiguous."""
    names, _ = _tied(model)
    state = model.state_dict()
    return {k: (state[k].t() if k.endswith(model.FAN_IN_FAN_OUT) else state[k]).detach().contiguous() for k in names}


def stale_files(directory):
    """The files of `directory` that another checkpoint left and that a write of model.safetensors
    replaces: both *.index.json and the shards they name, pytorch_model.bin, an adapter's files
    (ADAPTER_FILES). Paths that exist; never model.safetensors or config.json."""
    directory = Path(directory)
    names = set(INDEXES) | {"pytorch_model.bin"} | set(ADAPTER_FILES)
    for index in INDEXES:
        try:
            names |= set(read_json(directory / index)["weight_map"].values())
        except Exception:  # no index, or one that names nothing readable: only the index itself goes
            pass
    names -= {WEIGHTS, CONFIG}
    return sorted(directory / n for n in names if "/" not in n and (directory / n).is_file())


def write(directory, config, state, metadata=None):
    """A Hugging Face model directory: model.safetensors (with {"format": "pt"} and `metadata`, str to
    str, in its header) then config.json, each written to a temporary name and renamed; then the
    files of an earlier checkpoint in the folder are deleted (stale_files: old shards and their
    index, pytorch_model.bin, an adapter). model.safetensors comes first in every loader's order
    (PREFERENCE), so from its rename on, ours and transformers read the new weights, and a write
    interrupted before the deletions leaves files that no loader reads."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stale = stale_files(directory)
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt", **(metadata or {})}))
    atomic_write(directory / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    for path in stale:
        path.unlink(missing_ok=True)
