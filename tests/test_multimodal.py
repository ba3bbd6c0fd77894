"""omnitron/multimodal.py: the resampler's attention against float64 math, the gates at 0, a frozen language
model left bit for bit, the digits' checksum and split, the bridge's files, sample.py --image."""
import hashlib

import numpy as np
import pytest
import torch

import sample
import train
from omnitron import checkpoints, data, models, multimodal
from omnitron.runtime import UserError
from tests.helpers import contract_model

V = 100
SPLIT_SHA256 = "a1283bf6ed6872fc286e580b81e23aa219055bf68de9806719e4236c60451bc5"  # numpy PCG64: stable


def test_resampler_attention_matches_float64_reference():
    """q = LN(latents), kv = [LN(media); LN(latents)], softmax(q k^T / sqrt(d_head)) v per head, then o."""
    torch.manual_seed(0)
    attn = multimodal.ResamplerAttention(32, 4)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    media, latents = torch.randn(2, 7, 32), torch.randn(2, 3, 32)
    out = attn(media, latents)

    def ln(x, norm):
        x = x.double()
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps) \
            * norm.weight.double() + norm.bias.double()
    lat = ln(latents, attn.norm_latents)
    kv = torch.cat((ln(media, attn.norm_media), lat), dim=1)
    wq, wkv, wo = (m.weight.double() for m in (attn.q, attn.kv, attn.o))
    q, k, v = lat @ wq.T, kv @ wkv[:32].T, kv @ wkv[32:].T
    heads = []
    for h in range(4):
        s = slice(8 * h, 8 * h + 8)
        scores = q[..., s] @ k[..., s].transpose(1, 2) / 8 ** 0.5
        heads.append(torch.softmax(scores, dim=-1) @ v[..., s])
    ref = torch.cat(heads, dim=-1) @ wo.T
    assert out.shape == (2, 3, 32)
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("name", ["gpt", "llama", "switch"])
def test_gates_at_zero_leave_the_logits_exactly_unchanged(name):
    model = contract_model(models.get(name))
    if hasattr(model.config, "eval_capacity_factor"):
        model.config.eval_capacity_factor = 0.0
    x = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    images = torch.rand(2, 8, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(x)[0]
        multimodal.attach(model, multimodal.BridgeConfig(n_embd=model.config.n_embd, xattn_hidden=16,
                                                         inject="xattn"))
        assert sum(isinstance(m, multimodal.GatedBlock) for m in model.modules()) == model.config.n_layer
        gated = multimodal.forward(model, images, x)[0]
        assert torch.equal(gated, plain)  # tanh(0) = 0: the language model exactly
        for m in model.modules():
            if isinstance(m, multimodal.GatedCrossAttention):
                m.attn_gate.fill_(0.5)
        assert (multimodal.forward(model, images, x)[0] - plain).abs().max() > 1e-4  # open gates: the image is seen
        with multimodal.language_model(model):  # unwrapped: the plain model and its state dict's names
            assert not hasattr(model, "bridge") and torch.equal(model(x)[0], plain)
            assert not any(".block." in k or "xattn" in k for k in model.state_dict())
        assert hasattr(model, "bridge") and sum(isinstance(m, multimodal.GatedBlock) for m in model.modules())


@pytest.mark.parametrize("inject", ["prefix", "xattn"])
def test_training_the_bridge_leaves_a_frozen_model_bit_identical(inject):
    """train.py's optimizer (AdamW, weight decay) over a few steps of the loss hook."""
    model = contract_model(models.get("gpt")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    multimodal.attach(model, multimodal.BridgeConfig(n_embd=model.config.n_embd, queries=4, inject=inject,
                                                     xattn_hidden=8))
    bridge_before = {k: v.clone() for k, v in multimodal.bridge_state(model).items()}
    flags = {"weight_decay": 0.1, "learning_rate": 1e-2, "beta1": 0.9, "beta2": 0.99}
    opt = train.make_optimizer(model, flags, "cpu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        images, x = torch.rand(4, 8, 24, generator=gen), torch.randint(0, V, (4, 9), generator=gen)
        loss, _ = multimodal.loss_fn(model, (images, x, x.roll(-1, 1)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    with multimodal.language_model(model):
        after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    changed = multimodal.bridge_state(model)
    assert all(not torch.equal(changed[k], bridge_before[k]) for k in changed if k.endswith("proj.weight"))
    if inject == "xattn":  # the gates open from 0
        assert any(v.item() != 0 for k, v in changed.items() if k.endswith("attn_gate"))


def test_prefix_forward_and_cached_generation_agree():
    model = contract_model(models.get("llama")).double()
    multimodal.attach(model, multimodal.BridgeConfig(n_embd=model.config.n_embd, queries=3))
    model.bridge.double()
    images = torch.rand(1, 8, 24, dtype=torch.float64)
    x = torch.randint(0, V, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = multimodal.forward(model, images, x)[0]
        cache = model.init_cache(1, 3 + 6)
        pre = multimodal.forward(model, images, x[:, :4], cache=cache)[0]
        rest = [model(x[:, t:t + 1], cache=cache)[0] for t in (4, 5)]
    assert (torch.cat([pre, *rest], 1) - full).abs().max() <= 1e-9 * full.abs().max()


def test_digits_checksum_and_split_are_deterministic(digits_data_dir, tmp_path):
    path = data.digits_file(digits_data_dir)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.DIGITS_SHA256
    images, labels = data.digits(digits_data_dir)
    assert images.shape == (1797, 8, 8) and images.max() == 16 and np.bincount(labels).min() == 174
    # a file that differs from the pinned bytes is refused in one line
    bad = tmp_path / "digits" / "digits.csv.gz"
    bad.parent.mkdir()
    raw = path.read_bytes()
    bad.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(UserError, match="sha256"):
        data.digits_file(tmp_path)
    split = multimodal.split_digits(labels)
    assert all(np.array_equal(split[k], v) for k, v in multimodal.split_digits(labels).items())
    parts = [set(split[k].tolist()) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == 1797 and set.union(*parts) == set(range(1797))
    for c in range(10):  # stratified: each class 70 / 10 / 20
        n = (labels == c).sum()
        assert abs((labels[split["train"]] == c).sum() - 0.7 * n) <= 1 and abs((labels[split["val"]] == c).sum() - 0.1 * n) <= 1
    digest = hashlib.sha256(b"".join(split[k].tobytes() for k in ("train", "val", "test"))).hexdigest()
    assert digest == SPLIT_SHA256
    scenes, digits = multimodal.test_scenes(digits_data_dir, 3, 50)
    idx, _ = multimodal.test_items(labels, split["test"], 50, 3)
    assert set(idx.ravel().tolist()) <= parts[2]  # held-out images only
    assert scenes.shape == (50, 8, 24) and torch.equal(scenes[:, :, 8:16] * 16, torch.as_tensor(images[idx[:, 1]], dtype=torch.float32))
    assert digits[0] == labels[idx[0]].tolist()



def test_texts():
    assert multimodal.caption([3, 8, 1]) == ("digits:", " 3 8 1")
    assert multimodal.question("count", [3, 8, 8], 8) == ("how many 8s?", " 2")
    assert multimodal.question("largest", [3, 8, 1]) == ("largest?", " 8")
    assert multimodal.question("sum", [3, 8, 1]) == ("sum?", " 12")
    assert multimodal.text_line([3, 8, 1], "sum?", " 12") == "\nscene: 3 8 1. sum? 12"
    assert multimodal.after_image("sum?", " 12") == ". sum? 12"


def test_scene_batches_end_each_text_with_its_newline(digits_data_dir):
    """A training text is the line after the image, newline included: ". digits: 3 8 1\\n", the last
    target of each row the newline."""
    chars = sorted(set(multimodal.text_corpus(200)))
    class Chars:
        def encode(self, s):
            return [chars.index(c) for c in s]
    ds = multimodal.SceneDataset(Chars(), digits_data_dir)
    images, x, y = ds.get_batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert images.shape == (4, 8, 24) and 0 <= images.min() and images.max() <= 1
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        ids = [row_x[0]] + [t for t in row_y if t != -1]
        text = "".join(chars[t] for t in ids)
        assert text.startswith(". digits: ") and text.endswith("\n") and len(text) == len(". digits: 3 8 1\n")


def test_bridge_run_end_to_end_and_sample_answers(digits_data_dir, tmp_path, capsys):
    """A text-only decoder, a frozen-LM bridge and a fully trained one through train.run; their folders
    load (checkpoints.load) and sample.py answers a question about a held-out scene."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(multimodal.text_corpus(300))
    common = dict(data_dir=str(digits_data_dir), batch_size=4, block_size=32, eval_interval=2, eval_iters=1,
                  log_interval=1, sample_tokens=0, max_iters=2)
    train.run(model="gpt", n_layer=1, n_embd=32, n_head=2, data=str(corpus), out_dir=str(tmp_path / "lm"), **common)
    lm_file = (tmp_path / "lm" / "model.safetensors").read_bytes()
    frozen = train.run(init_from=str(tmp_path / "lm"), mm_images="digits", mm_queries=2, mm_width=16,
                       out_dir=str(tmp_path / "br"), **common)
    assert frozen["step"] == 2 and (tmp_path / "lm" / "model.safetensors").read_bytes() == lm_file
    names = {p.name for p in (tmp_path / "br").iterdir()}  # the bridge alone: the frozen model stays in lm/
    assert {"multimodal.json", "multimodal.safetensors", "train_state.pt"} <= names and "model.safetensors" not in names
    model, _ = checkpoints.load(tmp_path / "br")
    assert model.bridge.config.queries == 2 and model.bridge.config.base_model == str((tmp_path / "lm").resolve())
    train.run(init_from=str(tmp_path / "lm"), mm_images="digits", mm_freeze=False, mm_inject="xattn",
              out_dir=str(tmp_path / "full"), **common)
    assert (tmp_path / "full" / "model.safetensors").is_file() and (tmp_path / "full" / "multimodal.json").is_file()
    assert sum(isinstance(m, multimodal.GatedBlock) for m in checkpoints.load(tmp_path / "full")[0].modules()) == 1
    capsys.readouterr()
    sample.main(["--out_dir", str(tmp_path / "br"), "--image", "4", "--prompt", "how many 3s?", "--temperature", "0",
                 "--max_new_tokens", "3", "--data_dir", str(digits_data_dir)])
    out = capsys.readouterr().out.splitlines()
    _, digits = multimodal.test_scenes(digits_data_dir, 3)
    assert out[0] == f"test scene 4: the digits {' '.join(map(str, digits[4]))}"
    assert out[1].startswith("how many 3s?") and len(out) == 2  # the answer, to the end of its line
    with pytest.raises(UserError, match="no multimodal.json"):
        sample.main(["--out_dir", str(tmp_path / "lm"), "--image", "0", "--data_dir", str(digits_data_dir)])


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--mm_freeze"):
        train.run(mm_images="digits", max_iters=1)
    with pytest.raises(UserError, match="--mm_inject"):
        train.run(init_from=str(tmp_path), mm_images="digits", mm_inject="side")
    with pytest.raises(UserError, match="--mm_images"):
        train.run(init_from=str(tmp_path), mm_images="cifar")
    bad = tmp_path / "img.csv"
    bad.write_text("1,2,3\n")
    with pytest.raises(UserError, match="8 x 24"):
        multimodal.read_image(bad)
