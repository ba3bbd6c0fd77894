"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"), as a training objective of train.py for every model:

  python train.py --init_from RUN_OR_HF_DIR --dpo pairs.jsonl --out_dir out/dpo
  python train.py --init_from RUN_OR_HF_DIR --dpo pairs.jsonl --lora_rank 8 --out_dir out/dpo_lora

pairs.jsonl holds one {"prompt", "chosen", "rejected"} object a line: a prompt x and two responses,
y_w preferred to y_l. The loss (the paper's equation 7) is

    -log sigma(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

with log pi(y|x) the log-probability of the response's tokens and of the EOS token after them
summed (pi(y|x) of a complete response; the prompt's tokens are not scored), beta --dpo_beta (0.1, the paper's), and pi_ref the reference model, frozen at the
starting weights. beta * (log pi - log pi_ref) is the implicit reward (section 5); logged: the
loss, the mean reward margin (chosen minus rejected), the implicit reward's accuracy (the fraction
of pairs whose chosen response has the larger reward) and the mean chosen and rejected log-probs
(TRL's DPOTrainer logs the same, as rewards/margins, rewards/accuracies, logps/chosen, logps/rejected).

The reference. With --lora_rank it is the same model with its adapters switched off
(lora.disable_adapter): no second copy is held, and it is the base model exactly. Otherwise it is
a frozen copy loaded from the starting directory (--dpo_reference, set to --init_from when the run
starts and kept in train_state.pt, so a resumed run keeps its reference). Under FSDP the copy would
not be sharded: --dpo --fsdp needs --lora_rank. Either way it runs in eval mode (no dropout), and
DPOLoss turns dropout off in the policy too (p = 0 in every dropout; TRL's disable_dropout=True,
as the authors' code does), so that policy = reference gives exactly log 2.

Tokens, as TRL's DPOTrainer.tokenize_row and the authors' code make them: the prompt and each
response are tokenized separately and concatenated (a BPE merge never crosses the boundary, so the
model reads the prompt's text and exactly the response is scored): the prompt's ids (after the
tokenizer's BOS template, if any: evaluation.context_ids), then the response's ids and the
tokenizer's EOS (tokenizer.eos_token; a tokenizer without one, char or bpe:N, scores the response
alone). A pair longer than the block (truncation): "drop_prompt_start" (the default) keeps the
response and EOS whole and drops the start of the prompt, a response longer than the block is
refused (UserError); "keep_start" keeps the first block_size + 1 tokens, cutting the end of the
response (TRL's truncation_mode="keep_start"), a prompt that leaves no response token is refused.
A batch of B pairs is (x, y) with 2B rows, the B chosen rows then the B
rejected ones, right-padded; y is -1 under the prompt and the padding, so the model's own loss of
the batch (train.evaluate's val loss) is the responses' cross-entropy.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from omnitron import lora
from omnitron import models
from omnitron.evaluation import context_ids, right_pad, scored_sequence, target_logprobs
from omnitron.runtime import UserError, read_jsonl, unwrap

VAL_FRACTION = 0.1  # the last tenth of the pairs (at least one) is the val split; one pair: both
TRUNCATIONS = ("drop_prompt_start", "keep_start")  # a pair longer than the block: see the module docstring


# ----------------------------------------------------------------------------- pairs

def read_pairs(path):
    """The {"prompt", "chosen", "rejected"} records of a .jsonl file (blank lines skipped). A missing
    file, a line that is not a JSON object, a field missing or not a string, an empty prompt or
    response, or no pairs at all: UserError naming the file and line."""
    path = Path(path)
    pairs = []
    for n, obj in read_jsonl(path, "pairs file"):
        if not all(isinstance(obj.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise UserError(f"{path}:{n}: expected {{\"prompt\", \"chosen\", \"rejected\"}}, three strings")
        for key in ("prompt", "chosen", "rejected"):
            if not obj[key]:
                raise UserError(f"{path}:{n}: the {key} {'response ' if key != 'prompt' else ''}is empty")
        pairs.append(obj)
    if not pairs:
        raise UserError(f"{path}: no preference pairs")
    return pairs


def encode_pair(tokenizer, prompt, response):
    """(prompt ids, response ids + [EOS]) tokenized separately, as TRL's DPOTrainer.tokenize_row
    (trl/trainer/dpo_trainer.py): the prompt with the tokenizer's BOS template (context_ids), the
    response without special tokens, then tokenizer.eos_token (none when the tokenizer has no EOS)."""
    eos = [] if tokenizer.eos_token is None else [tokenizer.eos_token]
    return context_ids(tokenizer, prompt), tokenizer.encode(response, add_special_tokens=False) + eos


def truncate_pair(prompt, response, block_size, truncation="drop_prompt_start"):
    """(prompt ids, response ids) cut so that the row, prompt + response, has at most block_size + 1
    tokens (the model reads all but the last): "drop_prompt_start" drops the prompt's first tokens,
    "keep_start" keeps the first block_size + 1 tokens (the response's end goes first, then the
    prompt's). ValueError: nothing of the response left, or (drop_prompt_start) a response longer
    than block_size."""
    if truncation == "keep_start":
        keep = block_size + 1
        prompt, response = prompt[:keep], response[:max(0, keep - len(prompt))]
        if not response:
            raise ValueError(f"a prompt of {len(prompt)} tokens leaves no response token in block_size {block_size}")
        return prompt, response
    if len(response) > block_size:
        raise ValueError(f"a response of {len(response)} tokens does not fit block_size {block_size}")
    return prompt[-(block_size + 1 - len(response)):], response


class PairDataset:
    """Preference pairs tokenized for training: train.py's dataset under --dpo (get_batch as
    data.Dataset's). tokens[i] = (prompt ids, chosen ids + EOS, rejected ids + EOS) (encode_pair);
    truncation: one of TRUNCATIONS (truncate_pair). Errors: UserError naming the file and pair."""

    def __init__(self, path, tokenizer, truncation="drop_prompt_start"):
        if truncation not in TRUNCATIONS:
            raise UserError(f"--dpo_truncation must be one of {', '.join(TRUNCATIONS)}, not {truncation!r}")
        self.path, self.tokenizer, self.tokens, self.truncation = Path(path), tokenizer, [], truncation
        for n, p in enumerate(read_pairs(path), 1):
            prompt, chosen = encode_pair(tokenizer, p["prompt"], p["chosen"])
            rejected = encode_pair(tokenizer, p["prompt"], p["rejected"])[1]
            if not prompt:
                raise UserError(f"{self.path}: pair {n}: the prompt has no tokens")
            self.tokens.append((prompt, chosen, rejected))
        n_val = max(1, math.ceil(len(self.tokens) * VAL_FRACTION)) if len(self.tokens) > 1 else 0
        self.splits = {"train": list(range(len(self.tokens) - n_val)),
                       "val": list(range(len(self.tokens) - n_val, len(self.tokens))) or [0]}
        count = lambda split: sum(len(c) + len(w) + len(r) for c, w, r in (self.tokens[i] for i in self.splits[split]))
        self.manifest = {"n_train": count("train"), "n_val": count("val"), "pairs": len(self.tokens)}

    def check_block_size(self, block_size):
        """Every pair must truncate to the block (truncate_pair): UserError naming the pair otherwise."""
        for n, (prompt, chosen, rejected) in enumerate(self.tokens, 1):
            for response in (chosen, rejected):
                try:
                    truncate_pair(prompt, response, block_size, self.truncation)
                except ValueError as e:
                    raise UserError(f"{self.path}: pair {n}: {e} (--dpo_truncation {self.truncation})") from None

    def get_batch(self, split, batch_size, block_size, generator, device="cpu", rank=0, world_size=1):
        """batch_size random pairs of the split as (x, y), each (2 * batch_size, T): the chosen rows,
        then the rejected ones (see the module's docstring). Every rank draws the global batch's
        indices and keeps its slice, as data.Dataset.get_batch does."""
        pool = self.splits[split]
        ix = torch.randint(len(pool), (world_size * batch_size,), generator=generator)
        return self.batch([pool[i] for i in ix[rank * batch_size:(rank + 1) * batch_size].tolist()], block_size, device)

    def batch(self, indices, block_size, device="cpu"):
        """The pairs `indices` as (x, y), each (2 * len(indices), T): the chosen rows, then the rejected
        ones, right-padded (x with 0, y with -1); y is -1 under the prompt too."""
        rows = [scored_sequence(*truncate_pair(self.tokens[i][0], self.tokens[i][which], block_size, self.truncation))
                for which in (1, 2) for i in indices]
        return right_pad([x for x, _ in rows], 0, device), right_pad([y for _, y in rows], -1, device)


# ----------------------------------------------------------------------------- the loss

def sequence_logprobs(model, x, y):
    """log pi(response | prompt) of each row: the log-probabilities of y's tokens that are not -1,
    summed; (rows,) in fp32 (nats). x, y: (rows, T) ids."""
    return target_logprobs(model(x)[0], y).sum(dim=-1)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta):
    """The DPO loss of each pair (the paper's equation 7) and the implicit rewards
    beta * (log pi - log pi_ref) of the chosen and rejected responses; each argument (B,) summed
    log-probabilities. Returns (losses, chosen_rewards, rejected_rewards), each (B,)."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def disable_dropout(model):
    """Dropout off in place, as TRL's disable_dropout_in_model: p = 0 in every nn.Dropout (the
    models' residual and embedding dropout, LoRA's lora_dropout), and 0.0 in a module's float
    `dropout` rate applied with F.dropout (a Switch expert's). Returns the model."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0
    return model


class DPOLoss:
    """train.py's loss hook for DPO: DPOLoss(reference, beta)(model, batch) -> (loss, metrics) with
    batch a PairDataset batch. reference: a frozen model, or None for a LoRA model's own base
    (its adapters switched off). The policy's dropout is turned off at its first call
    (disable_dropout; TRL's disable_dropout=True)."""

    def __init__(self, reference, beta):
        self.reference, self.beta, self._without_dropout = reference, beta, set()

    @torch.no_grad()
    def reference_logprobs(self, model, x, y):
        inner = unwrap(model)
        if self.reference is not None:
            return sequence_logprobs(self.reference, x, y)
        was_training = inner.training
        inner.eval()
        try:
            with lora.disable_adapter(inner):
                return sequence_logprobs(inner, x, y)
        finally:
            inner.train(was_training)

    def __call__(self, model, batch):
        if id(model) not in self._without_dropout:
            disable_dropout(unwrap(model))
            self._without_dropout.add(id(model))
        x, y = batch
        reference = self.reference_logprobs(model, x, y)
        policy = sequence_logprobs(model, x, y)
        B = x.shape[0] // 2
        losses, chosen, rejected = dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], self.beta)
        margin = (chosen - rejected).detach()
        return losses.mean(), {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean(),
                               "logp_chosen": policy[:B].detach().mean(), "logp_rejected": policy[B:].detach().mean()}


class ReplayLoss:
    """DPO with replay: ReplayLoss(objective, dataset, weight, batch_size, block_size, generator)(model,
    batch) -> (loss, metrics) is objective(model, batch)'s loss (a DPOLoss) plus weight times the
    model's language-model loss (mean cross-entropy, nats per token) on batch_size random windows of
    block_size tokens of `dataset` (a data.Dataset, its train split, drawn with `generator`). It
    keeps a skill that the preference pairs do not train: in self-rewarding, the judge, replayed
    from its seed examples (the remedy of Wu et al. 2024, Meta-Rewarding Language Models, section 1,
    which trains the judge in every iteration). train.py's --dpo_replay, --dpo_replay_weight and
    --dpo_replay_batch. Logged beside the objective's metrics: dpo_loss and replay_loss. A resumed
    run draws its replay windows afresh (the generator's state is not saved)."""

    def __init__(self, objective, dataset, weight, batch_size, block_size, generator):
        self.objective, self.dataset, self.weight = objective, dataset, weight
        self.batch_size, self.block_size, self.generator = batch_size, block_size, generator

    def __call__(self, model, batch):
        loss, metrics = self.objective(model, batch)
        x, y = self.dataset.get_batch("train", self.batch_size, self.block_size, self.generator, batch[0].device)
        replay = model(x, y)[1]
        return loss + self.weight * replay, {**metrics, "dpo_loss": loss.detach(), "replay_loss": replay.detach()}


def load_reference(directory, device, dtype=torch.float32):
    """The frozen reference model (eval mode, no gradients) of a full fine-tuning run: the model
    directory the run started from."""
    if not Path(directory).is_dir():
        raise UserError(f"--dpo_reference: no model directory {directory}")
    model = models.from_pretrained(directory, dtype=dtype, device=device).eval()
    return model.requires_grad_(False)
