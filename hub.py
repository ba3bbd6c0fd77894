"""Hugging Face model directories, read and written for every model file (what transformers keeps in
its modeling_utils.py). A model file says what is about its architecture: how its Config reads and
writes config.json, which tensor names differ from its module names, which weights the file stores
transposed (Model.FAN_IN_FAN_OUT). This file does the rest, once:

  read_config(dir)            config.json as a dict
  read_tensors(dir)           (name, tensor) from model.safetensors, pytorch_model.bin or shards
  load_weights(model, dir)    a model built on the meta device, filled from the files, every name
                              and shape checked
  checkpoint_state(model)     the tensors to write (tied matrices once, FAN_IN_FAN_OUT transposed)
  write(dir, config, state)   config.json + model.safetensors, each written temp-then-rename

Loading never executes code: safetensors, or torch.load(weights_only=True) for pytorch_model.bin.
"""
import json
from pathlib import Path

import torch

from runtime import atomic_write

CONFIG, WEIGHTS = "config.json", "model.safetensors"
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # sharded checkpoints


# ----------------------------------------------------------------------------- reading

def read_config(directory):
    """config.json of a model directory as a dict. FileNotFoundError when there is none."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    return json.loads(path.read_text())


def read_tensors(directory):
    """Yield (name, tensor) from model.safetensors, pytorch_model.bin (loaded weights-only), or the
    shards that a *.index.json names, one file at a time (a shard is freed before the next is read).
    FileNotFoundError when the directory holds none of them."""
    from safetensors.torch import load_file
    directory = Path(directory)
    for index_name in INDEXES:
        if (directory / index_name).is_file():
            files = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))
            break
    else:
        files = [n for n in (WEIGHTS, "pytorch_model.bin") if (directory / n).is_file()][:1]
    if not files:
        raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or *.index.json in {directory}")
    for name in files:
        path = directory / name
        if name.endswith(".safetensors"):
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
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


def load_weights(model, directory, dtype=None, device="cpu", rename=None):
    """Fill `model`, built on the meta device, with the tensors of `directory` (assign=True: they
    become the parameters, so the weights are never held twice), then re-tie shared parameters.

    rename(name) -> the model's name for a checkpoint tensor, or None to skip it (buffers that the
    architecture recomputes, say); default: the same name. A checkpoint tensor under the name of a
    tied alias (lm_head.weight of a tied model) is skipped, and weights whose names end with one of
    model.FAN_IN_FAN_OUT are transposed. dtype: None keeps each tensor's own. Raises ValueError
    naming the tensor when one is unexpected, has the wrong shape, or is missing."""
    names, aliases = _tied(model)
    expected = {k: v for k, v in model.state_dict().items() if k in set(names)}
    state = {}
    for key, tensor in read_tensors(directory):
        key = rename(key) if rename else key
        if key is None or key in aliases:
            continue
        if key not in expected:
            raise ValueError(f"unexpected tensor {key!r} in {directory}")
        if key.endswith(model.FAN_IN_FAN_OUT):
            tensor = tensor.t()
        if tensor.shape != expected[key].shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the config needs "
                             f"{tuple(expected[key].shape)}")
        state[key] = tensor.to(device=device, dtype=dtype or tensor.dtype).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing from {directory}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    for alias, name in aliases.items():  # assign=True replaced the parameter under `name` only
        module, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module), attr, model.get_parameter(name))
    return model


# ----------------------------------------------------------------------------- writing

def checkpoint_state(model):
    """The model's tensors as Hugging Face stores them: tied parameters once (under their first
    name), weights named in model.FAN_IN_FAN_OUT transposed, detached and contiguous."""
    names, _ = _tied(model)
    state = model.state_dict()
    return {k: (state[k].t() if k.endswith(model.FAN_IN_FAN_OUT) else state[k]).detach().contiguous() for k in names}


def write(directory, config, state, metadata=None):
    """A Hugging Face model directory: model.safetensors (with {"format": "pt"} and `metadata`, str to
    str, in its header) then config.json, each written to a temporary name and renamed."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt", **(metadata or {})}))
    atomic_write(directory / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
