"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; the
modded-nanogpt speedrun's optimizer) for the hidden matrices, AdamW for everything else, in one
torch optimizer (`train.py --optimizer muon`).

For a hidden weight matrix W (out, in) with gradient G, Muon keeps SGD momentum and replaces the
update by its nearest semi-orthogonal matrix:

  B = mu B + G;   U = G + mu B (Nesterov)
  O = NewtonSchulz5(U)  ~  U' V'^T  where U = U' S V'^T (the SVD: every singular value sent to ~1)
  W = W (1 - lr wd) - lr sqrt(max(1, out / in)) O

NewtonSchulz5 is the quintic iteration X <- a X + (b A + c A^2) X with A = X X^T, (a, b, c) =
(3.4445, -4.7750, 2.0315), five steps from X = U / ||U||_F: it needs only matrix products (in
bfloat16 on a GPU), and maps every singular value into about [0.7, 1.2], not exactly 1 — close
enough for the update and much cheaper than an SVD. Embeddings, the output head, norms' gains and
biases are not hidden matrices (Muon's authors and the speedrun give them to Adam), and here take
AdamW with the run's --learning_rate, --beta1/2 and --weight_decay.

One optimizer object (param groups flagged `muon`), so the training loop's GradScaler, gradient
clipping, state_dict and DDP resume treat it as they treat AdamW. Each group's learning rate is
the schedule's times its `lr_ratio` (Muon's peak over AdamW's).
"""
import math

import torch
import torch.nn as nn

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024: the quintic's (a, b, c)


def newton_schulz5(G, steps=5, eps=1e-7):
    """The approximately orthogonal matrix nearest G (..., m, n): five quintic Newton-Schulz steps from
    G / ||G||_F (Jordan et al. 2024). Returns the same shape and dtype; its singular values lie in
    about [0.7, 1.2] and its singular vectors are G's."""
    a, b, c = NS_COEFFICIENTS
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + eps)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: A = X X^T is the smaller Gram matrix
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


def hidden_matrices(model):
    """The parameters Muon takes: trainable tensors of two or more dimensions, except embeddings and the
    output head (tied or not). Returns a list of parameters in model order."""
    skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:
        skip.add(id(head.weight))
    return [p for p in model.parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in skip]


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on the groups with muon=True, AdamW on the others (see the module docstring).

    param groups: dicts with "params", "muon" (bool), "lr", "weight_decay" and, for Muon, "momentum",
    "nesterov", "ns_steps"; for AdamW "betas", "eps". Raises ValueError if a Muon parameter is not a
    matrix."""

    def __init__(self, groups):
        defaults = dict(lr=1e-3, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5, betas=(0.9, 0.99),
                        eps=1e-8, muon=False, lr_ratio=1.0)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("Muon takes matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                (self._muon if group["muon"] else self._adamw)(p, self.state[p], group)
        return loss

    @staticmethod
    def _muon(p, state, group):
        g = p.grad
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(g)
        update = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        flat = update.reshape(update.size(0), -1)  # conv-like tensors as (out, rest)
        o = newton_schulz5(flat.float(), group["ns_steps"]).to(p.dtype).view_as(p)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o, alpha=-group["lr"] * math.sqrt(max(1.0, flat.size(0) / flat.size(1))))

    @staticmethod
    def _adamw(p, state, group):
        g = p.grad
        if "step" not in state:
            state["step"] = 0  # a Python int: the bias corrections need no device sync
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def muon_with_adamw(model, lr, muon_lr, weight_decay, betas, momentum=0.95, muon_weight_decay=0.0):
    """The optimizer of train.py --optimizer muon: Muon (peak muon_lr, momentum, Nesterov, 5 steps, decoupled
    weight decay muon_weight_decay) on hidden_matrices(model), AdamW (peak lr, betas; weight_decay on
    matrices and embeddings only) on the rest. lr_ratio per group lets one schedule drive both."""
    hidden = {id(p) for p in hidden_matrices(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in hidden], "muon": True, "lr": muon_lr,
               "lr_ratio": muon_lr / lr, "momentum": momentum, "weight_decay": muon_weight_decay},
              {"params": [p for p in params if id(p) not in hidden and p.dim() >= 2], "muon": False, "lr": lr,
               "betas": betas, "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) not in hidden and p.dim() < 2], "muon": False, "lr": lr,
               "betas": betas, "weight_decay": 0.0}]
    return MuonWithAdamW([g for g in groups if g["params"]])
