"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"), as a training objective of train.py for every model:

  python train.py --init_from RUN_OR_HF_DIR --dpo pairs.jsonl --out_dir out/dpo
  python train.py --init_from RUN_OR_HF_DIR --dpo pairs.jsonl --lora_rank 8 --out_dir out/dpo_lora

pairs.jsonl holds one {"prompt", "chosen", "rejected"} object a line: a prompt x and two responses,
y_w preferred to y_l. The loss (the paper's equation 7) is

    -log sigma(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

with log pi(y|x) the log-probability of the response's tokens summed (the prompt's tokens are
not scored), beta --dpo_beta (0.1, the paper's), and pi_ref the reference model, frozen at the
starting weights. beta * (log pi - log pi_ref) is the implicit reward (section 5); logged: the
loss, the mean reward margin (chosen minus rejected), the implicit reward's accuracy (the fraction
of pairs whose chosen response has the larger reward) and the mean chosen and rejected log-probs
(TRL's DPOTrainer logs the same, as rewards/margins, rewards/accuracies, logps/chosen, logps/rejected).

The reference. With --lora_rank it is the same model with its adapters switched off
(lora.disable_adapter): no second copy is held, and it is the base model exactly. Otherwise it is
a frozen copy loaded from the starting directory (--dpo_reference, set to --init_from when the run
starts and kept in train_state.pt, so a resumed run keeps its reference). Under FSDP the copy would
not be sharded: --dpo --fsdp needs --lora_rank. Either way it runs in eval mode (no dropout).

Tokens: a prompt and a response are tokenized as lm-evaluation-harness tokenizes a context and its
continuation (evaluation.encode_pair); a pair longer than the block loses the start of its prompt
(evaluation.truncate). A batch of B pairs is (x, y) with 2B rows, the B chosen rows then the B
rejected ones, right-padded; y is -1 under the prompt and the padding, so the model's own loss of
the batch (train.evaluate's val loss) is the responses' cross-entropy.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from omnitron import lora
from omnitron import models
from omnitron.evaluation import encode_pair, right_pad, scored_sequence, target_logprobs, truncate
from omnitron.runtime import UserError, read_jsonl, unwrap

VAL_FRACTION = 0.1  # the last tenth of the pairs (at least one) is the val split; one pair: both


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


class PairDataset:
    """Preference pairs tokenized for training: train.py's dataset under --dpo (get_batch as
    data.Dataset's). tokens[i] = (prompt ids, chosen ids, rejected ids)."""

    def __init__(self, path, tokenizer):
        self.path, self.tokenizer, self.tokens = Path(path), tokenizer, []
        for n, p in enumerate(read_pairs(path), 1):
            try:
                ctx, chosen = encode_pair(tokenizer, p["prompt"], p["chosen"])
                _, rejected = encode_pair(tokenizer, p["prompt"], p["rejected"])
            except (ValueError, KeyError) as e:
                raise UserError(f"{self.path}: pair {n}: {e}") from None
            self.tokens.append((ctx, chosen, rejected))
        n_val = max(1, math.ceil(len(self.tokens) * VAL_FRACTION)) if len(self.tokens) > 1 else 0
        self.splits = {"train": list(range(len(self.tokens) - n_val)),
                       "val": list(range(len(self.tokens) - n_val, len(self.tokens))) or [0]}
        count = lambda split: sum(len(c) + len(w) + len(r) for c, w, r in (self.tokens[i] for i in self.splits[split]))
        self.manifest = {"n_train": count("train"), "n_val": count("val"), "pairs": len(self.tokens)}

    def check_block_size(self, block_size):
        """Every response must fit the block (the prompt is left-truncated): UserError otherwise."""
        for n, (_, chosen, rejected) in enumerate(self.tokens, 1):
            if max(len(chosen), len(rejected)) > block_size:
                raise UserError(f"{self.path}: pair {n} has a response of {max(len(chosen), len(rejected))} "
                                f"tokens, longer than block_size {block_size}")

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
        rows = [scored_sequence(*truncate(self.tokens[i][0], self.tokens[i][which], block_size))
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


class DPOLoss:
    """train.py's loss hook for DPO: DPOLoss(reference, beta)(model, batch) -> (loss, metrics) with
    batch a PairDataset batch. reference: a frozen model, or None for a LoRA model's own base
    (its adapters switched off)."""

    def __init__(self, reference, beta):
        self.reference, self.beta = reference, beta

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
        x, y = batch
        reference = self.reference_logprobs(model, x, y)
        policy = sequence_logprobs(model, x, y)
        B = x.shape[0] // 2
        losses, chosen, rejected = dpo_loss(policy[:B], policy[B:], reference[:B], reference[B:], self.beta)
        margin = (chosen - rejected).detach()
        return losses.mean(), {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean(),
                               "logp_chosen": policy[:B].detach().mean(), "logp_rejected": policy[B:].detach().mean()}


def load_reference(directory, device, dtype=torch.float32):
    """The frozen reference model (eval mode, no gradients) of a full fine-tuning run: the model
    directory the run started from."""
    if not Path(directory).is_dir():
        raise UserError(f"--dpo_reference: no model directory {directory}")
    model = models.from_pretrained(directory, dtype=dtype, device=device).eval()
    return model.requires_grad_(False)
