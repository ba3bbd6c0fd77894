"""One file per architecture. Each file defines `Config` (a dataclass), `Model(config)` with
`forward(idx, targets=None, cache=None) -> (logits, loss)`, `init_cache(...)` for decoding,
`num_params()` / `flops_per_token(seq_len)`, what shared code relies on (fsdp_units, max_positions,
aux_losses, aux_metrics, FAN_IN_FAN_OUT, LORA_TARGETS, config.head_dim / n_kv_head) and Hugging Face
`from_pretrained(dir)` / `save_pretrained(dir)` (the files themselves: hub.py). DEVELOPERS.md's
"model contract" is the list; this package only finds the file."""
import importlib
from pathlib import Path

from omnitron import hub

# Hugging Face `model_type` -> the file in models/ that implements it
MODEL_TYPES = {"gpt2": "gpt", "omnitron_gpt": "gpt", "llama": "llama", "qwen2": "qwen", "qwen3": "qwen", "phi": "phi",
               "mixtral": "switch", "qwen2_moe": "switch", "qwen3_moe": "switch", "olmoe": "switch"}


def available():
    """The model files: every models/NAME.py."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def get(name):
    """The module models/NAME.py."""
    if name not in available():
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    return importlib.import_module(f"{__name__}.{name}")


def from_pretrained(directory, **kwargs):
    """Load a Hugging Face-format directory with the file that its config.json's model_type names."""
    model_type = hub.read_config(directory).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{Path(directory) / hub.CONFIG} has model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    try:
        return get(MODEL_TYPES[model_type]).Model.from_pretrained(directory, **kwargs)
    except (ValueError, FileNotFoundError):
        raise
    except Exception as e:  # a corrupt file: safetensors, pickle or torch errors
        raise ValueError(f"cannot load {directory}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
