"""omnitron/muon.py and train.py's --optimizer muon and --lr_schedule trapezoidal: Newton-Schulz against a
float64 SVD, the AdamW side against torch.optim.AdamW, every model file, resume and two processes."""
import dataclasses
import math

import pytest
import torch

import train
from omnitron import models, muon
from tests.helpers import read_log, tiny_model, torchrun, train_args


@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 32)])
def test_newton_schulz_keeps_the_singular_vectors_and_sends_singular_values_near_one(shape):
    """NS5(G) = U f(S) V^T for G = U S V^T (float64 SVD): U^T NS5(G) V is diagonal, and the quintic's
    f(s) lies in about [0.7, 1.2] for every singular value of a gradient-like matrix (column scales spread
    over a decade; five steps cannot lift a singular value far below 1e-3 of the Frobenius norm)."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(-1, 0, shape[1], dtype=torch.float64))
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    O = muon.newton_schulz5(G.float()).double()
    M = U.T @ O @ Vh.T
    off = M - torch.diag(torch.diagonal(M))
    assert off.abs().max() < 2e-3
    assert torch.diagonal(M).min() > 0.6 and torch.diagonal(M).max() < 1.25
    exact = U @ Vh  # the orthogonal polar factor: NS5 approximates it
    assert (O - exact).norm() / exact.norm() < 0.3


def test_one_muon_step_is_the_scaled_orthogonalised_gradient_and_adamw_is_torchs():
    """From zero momentum, Nesterov's update is (1 + mu) G, and NS5 is scale-free: a hidden matrix moves by
    -lr sqrt(max(1, out/in)) NS5(G). Embeddings, head, norms and biases move as torch.optim.AdamW moves them
    (decay on matrices only) over three steps."""
    model, reference = tiny_model("llama"), tiny_model("llama")
    reference.load_state_dict(model.state_dict())  # AdamW's reference: torch.optim.AdamW fed the same gradients
    opt = muon.muon_with_adamw(model, lr=1e-3, muon_lr=0.05, weight_decay=0.1, betas=(0.9, 0.99))
    hidden = {id(p) for p in muon.hidden_matrices(model)}
    names = dict(model.named_parameters())
    assert {n for n, p in names.items() if id(p) not in hidden} == {
        n for n in names if "embed" in n or "lm_head" in n or "norm" in n}
    adam_ref = torch.optim.AdamW([{"params": [p for n, p in reference.named_parameters() if id(names[n]) not in hidden
                                              and p.dim() >= 2], "weight_decay": 0.1},
                                  {"params": [p for n, p in reference.named_parameters() if id(names[n]) not in hidden
                                              and p.dim() < 2], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    x = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in range(3):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.zero_grad()
        model(x, x)[1].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n, q in reference.named_parameters():  # the same gradients for the reference's AdamW
            q.grad = grads[n].clone()
        opt.step()
        adam_ref.step()
        if step == 0:
            for n, p in model.named_parameters():
                if id(p) in hidden:
                    scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
                    expected = before[n] - 0.05 * scale * muon.newton_schulz5(grads[n])
                    assert torch.allclose(p, expected, atol=1e-6), n
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        if id(p) not in hidden:
            assert torch.allclose(p, q, atol=1e-6), n


def test_trapezoidal_schedule_warms_up_holds_and_cools_down_linearly():
    f = {"learning_rate": 1.0, "min_lr": 0.0, "warmup_iters": 10, "lr_decay_iters": -1, "max_iters": 100,
         "lr_schedule": "trapezoidal", "cooldown_frac": 0.4}
    lrs = [train.lr_at(s, f) for s in range(101)]
    assert lrs[0] < lrs[9] < 1.0 and all(lr == 1.0 for lr in lrs[10:61])
    assert lrs[80] == pytest.approx(0.5) and lrs[100] == 0.0
    assert all(a > b for a, b in zip(lrs[60:100], lrs[61:101]))


@pytest.mark.parametrize("name", models.available())
def test_muon_trains_every_model_file(corpus, tmp_path, name):
    """A few Muon steps lower the loss of each model file (hidden matrices: attention, MLPs, experts)."""
    kv = {"n_kv_head": 2} if "n_kv_head" in {f.name for f in dataclasses.fields(models.get(name).Config)} else {}
    train.main(train_args(corpus, tmp_path, name, model=name, max_iters=12, eval_interval=12, dropout=None,
                          optimizer="muon", lr_schedule="trapezoidal", warmup_iters=2, learning_rate=3e-3,
                          lr_decay_iters=12, **kv))
    log = read_log(tmp_path / name)
    evals = [r["val_loss"] for r in log if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3


def test_muon_resumes_bit_for_bit(corpus, tmp_path):
    common = dict(optimizer="muon", lr_schedule="trapezoidal", warmup_iters=2)
    train.main(train_args(corpus, tmp_path, "full", max_iters=8, **common))
    train.main(train_args(corpus, tmp_path, "split", max_iters=4, **common))
    train.main(train_args(corpus, tmp_path, "split", max_iters=8, **common) + ["--resume"])
    full, split = read_log(tmp_path / "full"), read_log(tmp_path / "split")
    losses = lambda log: [(r["step"], r["train_loss"]) for r in log if r["step"] > 4]
    assert losses(full) == losses(split)
    a, b = models.from_pretrained(tmp_path / "full"), models.from_pretrained(tmp_path / "split")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_muon_two_processes_equal_one_with_the_same_global_batch(corpus, tmp_path):
    common = dict(max_iters=3, eval_interval=3, dropout=0.0, optimizer="muon")
    r = torchrun(*train_args(corpus, tmp_path, "ddp", batch_size=4, **common))
    assert r.returncode == 0, r.stderr[-2000:]
    train.main(train_args(corpus, tmp_path, "single", batch_size=8, **common))
    multi, single = models.from_pretrained(tmp_path / "ddp"), models.from_pretrained(tmp_path / "single")
    assert all((p - q).abs().max() < 1e-5 for p, q in zip(multi.parameters(), single.parameters()))


def test_muon_flags_are_checked(corpus, tmp_path):
    for flags, message in (({"optimizer": "sgd"}, "--optimizer 'sgd': choose from adamw, muon"),
                           ({"lr_schedule": "step"}, "--lr_schedule 'step': choose from cosine, trapezoidal"),
                           ({"cooldown_frac": 1.5}, "--cooldown_frac must be in"),
                           ({"optimizer": "muon", "fsdp": True}, "not --fsdp")):
        with pytest.raises(train.UserError, match=message):
            train.main(train_args(corpus, tmp_path, **flags))
