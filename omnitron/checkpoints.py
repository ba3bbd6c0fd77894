"""Loading a model directory with its tokenizer: a training run folder, a Hugging Face checkpoint, a
LoRA adapter folder, or a multimodal bridge's folder. Every command and experiment that reads a trained model goes through `load`."""
from pathlib import Path

import torch

from omnitron import lora, models, multimodal, tokenization
from omnitron.runtime import UserError, first_line

TRAIN_STATE = "train_state.pt"  # a training run's optimizer, step, RNG states and flags (train.py)


def load(directory, device="cpu", dtype=None):
    """(model, tokenizer) from a model directory (a training run or a Hugging Face checkpoint), the model
    in eval mode on `device` in `dtype` (None: the checkpoint's). A LoRA adapter folder
    (adapter_config.json) loads its base model and the adapter, merged into it (decoding then costs what
    the base model costs); the tokenizer is the base model's. A multimodal bridge's folder
    (multimodal.json) loads its language model with the bridge attached (model.bridge). UserError if the directory does not
    exist; ValueError for a corrupt or unsupported checkpoint (models.from_pretrained)."""
    if not Path(directory).is_dir():
        raise UserError(f"model directory not found: {directory}")
    adapter, bridge = lora.is_adapter(directory), multimodal.is_bridge(directory)
    base = lora.base_path(directory) if adapter else multimodal.base_path(directory) if bridge else directory
    model = models.from_pretrained(base, dtype=dtype, device=device).eval()
    if adapter:
        lora.merge(lora.load_adapter(model, directory))
    if bridge:
        multimodal.load_bridge(model, directory).eval()
    return model, tokenization.tokenizer_for_model(base, model.config.vocab_size)


def load_draft(directory, model, tokenizer, device="cpu"):
    """The draft model of speculative decoding (sample.py --draft): a model directory whose tokenizer is
    `tokenizer` and whose vocabulary has `model`'s size; else UserError."""
    if not Path(directory).is_dir():
        raise UserError(f"draft model directory not found: {directory}")
    draft, draft_tokenizer = load(directory, device=device)
    if draft.config.vocab_size != model.config.vocab_size or draft_tokenizer.key() != tokenizer.key():
        raise UserError(f"the draft model in {directory} has another tokenizer or vocabulary "
                        f"({draft_tokenizer.key()}, {draft.config.vocab_size} rows) than the model "
                        f"({tokenizer.key()}, {model.config.vocab_size} rows)")
    return draft


def read_train_state(directory):
    """A run folder's train_state.pt (train.py's checkpoint of the optimizer, step, RNG states, data
    position and flags), loaded weights-only. FileNotFoundError when there is none; a file that
    cannot be read (cut short, empty, not a training state): UserError naming it and the ways on
    (the model beside it may still be whole)."""
    path = Path(directory) / TRAIN_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # zip's, pickle's and torch's errors, EOFError for an empty file
        state = e
    if not (isinstance(state, dict) and {"step", "args"} <= set(state)):
        reason = (f"{type(state).__name__}: {first_line(state)}" if isinstance(state, Exception)
                  else "not a training state")
        raise UserError(f"cannot read {path} ({reason}): the file is damaged and the run cannot be resumed from it; "
                        f"start a new run from its model with --init_from {directory} --out_dir NEW_DIR, or train "
                        f"again with --overwrite")
    return state
