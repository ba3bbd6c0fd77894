"""Query-based multimodal models: images fed to a frozen decoder-only language model through a small
trained bridge, for every model in models/ (Flamingo and BLIP-2 in miniature).

  python train.py --init_from out/text_lm --mm_images digits --mm_queries 8 --out_dir out/mm
  python sample.py --out_dir out/mm --image 5 --prompt "how many 8s?" --temperature 0

The papers:
- Perceiver / Perceiver IO (Jaegle et al. 2021, 2022): a small set of N learned latent queries
  cross-attends to the inputs, whatever their modality and size; the cost grows with N, not with
  the input.
- Flamingo (Alayrac et al. 2022): a vision encoder, then a Perceiver Resampler (section 2.1,
  appendix A.1.1: 64 learned latents, 6 layers; each layer attends with q = latents and
  kv = [media features; latents], then a feed-forward, both residual), then gated cross-attention
  layers (section 2.2) inserted before the blocks of the frozen language model:
      y = x + tanh(alpha_xattn) * attn(q = LN(x), kv = media);   y = y + tanh(alpha_dense) * ffw(LN(y))
  with the gates alpha at 0, so that at initialisation the model is the language model exactly.
- BLIP-2 (Li et al. 2023): the image encoder and the language model frozen; 32 learned queries
  (the Q-Former, section 3.1) whose outputs are projected to the language model's width and
  prepended to the text as soft prompts (section 3.3).

What is here (the vision encoder is trained with the bridge: there is no pretrained one offline):
  image (B, H, W) -> PatchEncoder (patches of p x p pixels: linear embedding + learned positions +
  a residual MLP) -> (B, n_patches, width) -> PerceiverResampler (N learned queries, Flamingo's
  attention; N = 0: no resampler, every patch token goes on) -> (B, N, width) -> a linear projection
  -> media (B, N, n_embd), which reaches the language model in one of two ways:
    prefix  the media are the forward's `prefix` (the model contract: BLIP-2's soft prompt)
    xattn   gated cross-attention layers wrap each block from outside (GatedBlock, as lora.py
            wraps linear layers: no model file changes) and attend to the media (Flamingo)
The bridge is `model.bridge` (so train.py's optimizer finds its parameters); `attach` adds it and,
for xattn, the wrappers; `loss_fn` is train.py's loss hook; the bridge (and the wrappers' layers)
are saved apart from the language model (multimodal.json + multimodal.safetensors), as LoRA
adapters are, and the frozen model's directory is named there.

The images: scikit-learn's handwritten digits (data.digits: 8 x 8 pixels, grey levels 0-16),
split per class into train / val / test (split_digits), put side by side into scenes of a few
digits (scene_images), and described by texts (caption: `digits: 3 8 1`; questions: `how many 8s? 1`,
`largest? 8`, `sum? 12`). A text-only language model first learns them with the scene written out
(`scene: 3 8 1. how many 8s? 1`: text_line); the bridge then stands for `scene: 3 8 1`.
"""
import json
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from omnitron import data
from omnitron.generation import sample_next
from omnitron.runtime import UserError, atomic_write, load_tensors, read_json, unwrap

BRIDGE_CONFIG, BRIDGE_WEIGHTS = "multimodal.json", "multimodal.safetensors"
INJECTIONS = ("prefix", "xattn")
DIGIT_SIZE = 8  # the digits' images are 8 x 8 pixels
GREY_LEVELS = 16  # pixel values 0..16
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test: of each class's images
QUESTIONS = ("count", "largest", "sum")
TEXTS = ("captions", "all")  # what the bridge trains on: captions only, or captions and questions


# ----------------------------------------------------------------------------- scenes and their texts

def split_digits(labels, seed=0):
    """A stratified split of the digits: each class's image indices shuffled (numpy's default_rng(seed),
    classes in order 0..9) and cut into SPLIT_FRACTIONS (rounded). labels (n,) ints ->
    {"train", "val", "test"}: sorted int64 index arrays, disjoint, covering every image."""
    rng = np.random.default_rng(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_val = round(len(idx) * SPLIT_FRACTIONS[0]), round(len(idx) * SPLIT_FRACTIONS[1])
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in parts.items()}


def scene_images(images, indices):
    """Scenes of digits side by side: images (n, 8, 8) grey levels 0-16, indices (B, K) ->
    (B, 8, 8K) float32 in [0, 1]."""
    x = torch.as_tensor(images[np.asarray(indices)], dtype=torch.float32) / GREY_LEVELS  # (B, K, 8, 8)
    return x.permute(0, 2, 1, 3).reshape(x.shape[0], DIGIT_SIZE, -1)


def written_scene(digits):
    """The scene written out, as the text-only model reads it: [3, 8, 1] -> "scene: 3 8 1"."""
    return "scene: " + " ".join(map(str, digits))


def caption(digits):
    """[3, 8, 1] -> ("digits:", " 3 8 1"): a prompt and its answer."""
    return "digits:", " " + " ".join(map(str, digits))


def question(kind, digits, asked=0):
    """A question about the scene and its answer: count ("how many 8s?", " 1"; `asked` the digit),
    largest ("largest?", " 8") or sum ("sum?", " 12")."""
    if kind == "count":
        return f"how many {asked}s?", f" {list(digits).count(asked)}"
    if kind == "largest":
        return "largest?", f" {max(digits)}"
    return "sum?", f" {sum(digits)}"


def text_line(digits, prompt, answer):
    """One line of the text-only corpus: "\\nscene: 3 8 1. how many 8s? 1" (the newline ends the line
    before; each line of the corpus ends with the next's)."""
    return f"\n{written_scene(digits)}. {prompt}{answer}"


def after_image(prompt, answer=""):
    """The text that follows an image (the image stands for "\\nscene: 3 8 1"): ". how many 8s? 1"."""
    return f". {prompt}{answer}"


def random_texts(digits_rows, kinds, generator):
    """A (prompt, answer) per scene: digits_rows (B, K) ints, kinds a tuple of "caption" and the
    QUESTIONS to draw from uniformly; a count question asks about a digit of the scene half the time,
    about any digit otherwise. Drawn from the torch generator."""
    B = len(digits_rows)
    pick = torch.randint(len(kinds), (B,), generator=generator).tolist()
    coin = torch.randint(2, (B,), generator=generator).tolist()
    anyd = torch.randint(10, (B,), generator=generator).tolist()
    which = torch.randint(len(digits_rows[0]), (B,), generator=generator).tolist()
    out = []
    for row, k, c, a, w in zip(digits_rows, pick, coin, anyd, which):
        kind = kinds[k]
        out.append(caption(row) if kind == "caption" else question(kind, row, row[w] if c else a))
    return out


def text_corpus(n_lines, scene_digits=3, seed=0):
    """The text-only corpus (stage 0): n_lines lines (text_line) of random scenes of `scene_digits`
    digits, captions and every question kind in equal parts; a str ending in a newline."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(10, (n_lines, scene_digits), generator=gen).tolist()
    texts = random_texts(rows, ("caption",) + QUESTIONS, gen)
    return "".join(text_line(r, p, a) for r, (p, a) in zip(rows, texts)) + "\n"


def test_items(labels, split, n_scenes, scene_digits=3, seed=0):
    """Fixed evaluation scenes from one split's images only: (indices (n_scenes, scene_digits) into
    the digits, their labels as lists). Drawn with numpy's default_rng(seed)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(split, size=(n_scenes, scene_digits))
    return idx, labels[idx].tolist()


def eval_texts(digit_rows, kind, seed=0):
    """The (prompt, answer) of each scene for one kind: "caption" or one of QUESTIONS (count asks
    about a digit of the scene half the time; numpy's default_rng(seed) picks)."""
    rng = np.random.default_rng(seed)
    out = []
    for row in digit_rows:
        asked = row[rng.integers(len(row))] if rng.integers(2) else int(rng.integers(10))
        out.append(caption(row) if kind == "caption" else question(kind, row, asked))
    return out


TEST_SCENES = 500  # the held-out scenes that the experiment scores and sample.py --image N shows


def test_scenes(data_dir=data.DEFAULT_DATA_DIR, scene_digits=3, n=TEST_SCENES):
    """The fixed held-out scenes: (images (n, 8, 8 * scene_digits) in [0, 1], digits (n lists)), built
    from the test split's images only (test_items, seed 0)."""
    images, labels = data.digits(data_dir)
    idx, digits = test_items(labels, split_digits(labels)["test"], n, scene_digits)
    return scene_images(images, idx), digits


def read_image(path, height=DIGIT_SIZE, width=3 * DIGIT_SIZE):
    """An image file for sample.py --image: a .npy array or a text file of comma- or space-separated
    grey levels 0-16, height x width -> (height, width) float32 in [0, 1]. UserError for a file that is
    missing, unreadable or of another shape or range."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--image: no file {path}")
    try:
        raw = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter="," if "," in path.read_text() else None)
    except (ValueError, OSError) as e:
        raise UserError(f"--image: cannot read {path}: {e}") from None
    if raw.shape != (height, width) or raw.min() < 0 or raw.max() > GREY_LEVELS:
        raise UserError(f"--image: {path} must be {height} x {width} grey levels 0-{GREY_LEVELS}, not "
                        f"{' x '.join(map(str, raw.shape))} of {raw.min()}..{raw.max()}")
    return torch.as_tensor(raw, dtype=torch.float32) / GREY_LEVELS


class SceneDataset:
    """Scenes of the digits with their texts, tokenized: train.py's dataset under --mm_images
    (get_batch as data.Dataset's, but batches are (images, x, y)). Training scenes are drawn afresh
    from the train split's images at every batch; val from the val split's."""

    def __init__(self, tokenizer, data_dir=data.DEFAULT_DATA_DIR, scene_digits=3, texts="captions", seed=0):
        if texts not in TEXTS:
            raise UserError(f"--mm_texts must be one of {', '.join(TEXTS)}, not {texts!r}")
        self.tokenizer, self.scene_digits = tokenizer, scene_digits
        self.images, self.labels = data.digits(data_dir)
        self.splits = split_digits(self.labels, seed)
        self.kinds = ("caption",) if texts == "captions" else ("caption",) + QUESTIONS
        for ch in sorted(set(text_corpus(200, scene_digits))):
            try:
                tokenizer.encode(ch)
            except (KeyError, ValueError):
                raise UserError(f"the tokenizer cannot encode {ch!r}: train the language model on "
                                "multimodal.text_corpus's text first") from None
        longest = len(tokenizer.encode(after_image("how many 0s?", f" {scene_digits}"))) + 2
        self.manifest = {"n_train": len(self.splits["train"]), "n_val": len(self.splits["val"]),
                         "images": "digits", "scene_digits": scene_digits, "texts": texts, "longest_text": longest}

    def check_block_size(self, block_size):
        """The text after the image must fit the block (the prefix is checked by the model)."""
        if self.manifest["longest_text"] > block_size:
            raise UserError(f"--block_size {block_size} is shorter than the texts "
                            f"({self.manifest['longest_text']} tokens)")

    def get_batch(self, split, batch_size, block_size, generator, device="cpu", rank=0, world_size=1):
        """batch_size random scenes of the split's images with a text each (after_image, then a
        newline): (images (B, 8, 8K) in [0, 1], x (B, T) ids, y (B, T) next ids, -1 past a row's
        end). Every rank draws the global batch and keeps its slice, as data.Dataset.get_batch does."""
        pool = self.splits[split]
        ix = torch.randint(len(pool), (world_size * batch_size, self.scene_digits), generator=generator)
        idx = pool[ix[rank * batch_size:(rank + 1) * batch_size].numpy()]
        rows = self.labels[idx].tolist()
        texts = random_texts(rows, self.kinds, generator)[:len(rows)]
        # each text ends with its newline, as every line of the text-only corpus does: the end of the
        # answer is a target too (exact_match and generate stop there; a decoder fine-tuned without it
        # forgets where an answer ends)
        x, y = text_batch(self.tokenizer, [after_image(p, a) + "\n" for p, a in texts], device)
        return scene_images(self.images, idx).to(device), x, y

    @staticmethod
    def model_loss(model, batch):
        """The model's own loss of a batch, with its image (train.evaluate's)."""
        return loss_fn(model, batch)[0]


def text_batch(tokenizer, texts, device="cpu"):
    """Texts -> (x, y), each (B, T): x the ids but the last, right-padded with 0; y the next ids, -1
    where padded."""
    ids = [tokenizer.encode(t) for t in texts]
    T = max(len(i) for i in ids) - 1
    x = torch.zeros(len(ids), T, dtype=torch.long)
    y = torch.full((len(ids), T), -1, dtype=torch.long)
    for r, i in enumerate(ids):
        x[r, :len(i) - 1] = torch.tensor(i[:-1])
        y[r, :len(i) - 1] = torch.tensor(i[1:])
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- the bridge

@dataclass
class BridgeConfig:
    """The bridge's hyperparameters (multimodal.json, with the base model's directory)."""
    n_embd: int                      # the language model's width
    image_height: int = DIGIT_SIZE
    image_width: int = 3 * DIGIT_SIZE
    patch: int = 4                   # p: patches of p x p pixels
    width: int = 64                  # the encoder's and the resampler's width
    heads: int = 4
    queries: int = 8                 # N learned queries; 0: no resampler (every patch token goes on)
    depth: int = 2                   # resampler layers
    inject: str = "prefix"           # prefix | xattn
    xattn_hidden: int = 0            # the gated layers' feed-forward width; 0: no feed-forward
    freeze_lm: bool = True
    base_model: str = ""             # the language model's directory; empty: the bridge's own folder

    def __post_init__(self):
        if self.inject not in INJECTIONS:
            raise ValueError(f"the injection must be {' or '.join(INJECTIONS)}, not {self.inject!r}")
        if self.image_height % self.patch or self.image_width % self.patch:
            raise ValueError(f"a {self.image_height} x {self.image_width} image does not divide into "
                             f"{self.patch} x {self.patch} patches")
        if self.width % self.heads or self.n_embd % self.heads:
            raise ValueError(f"the widths ({self.width}, {self.n_embd}) must be multiples of heads ({self.heads})")
        if self.queries < 0 or self.depth < 1 and self.queries:
            raise ValueError(f"queries must be 0 or more and depth at least 1, not {self.queries}, {self.depth}")

    @property
    def n_patches(self):
        return (self.image_height // self.patch) * (self.image_width // self.patch)

    @property
    def media_tokens(self):
        """The length of the media: N, or every patch without a resampler."""
        return self.queries or self.n_patches


def patchify(images, p):
    """images (B, H, W) -> (B, (H/p)(W/p), p*p): non-overlapping p x p patches, row by row (ViT)."""
    B, H, W = images.shape
    x = images.reshape(B, H // p, p, W // p, p).permute(0, 1, 3, 2, 4)
    return x.reshape(B, (H // p) * (W // p), p * p)


class FeedForward(nn.Module):
    """LN -> Linear(d, hidden) -> GELU -> Linear(hidden, d), as Flamingo's FFW."""

    def __init__(self, d, hidden):
        super().__init__()
        self.norm, self.fc, self.proj = nn.LayerNorm(d), nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(self.norm(x))))


class PatchEncoder(nn.Module):
    """The vision encoder, trained with the bridge: images (B, H, W) -> (B, n_patches, width): each
    patch linearly embedded, plus a learned embedding of its place (ViT, Dosovitskiy et al. 2021),
    then one residual feed-forward layer."""

    def __init__(self, config):
        super().__init__()
        self.patch = config.patch
        self.embed = nn.Linear(config.patch ** 2, config.width)
        self.pos = nn.Parameter(torch.randn(config.n_patches, config.width) * 0.02)
        self.ffw = FeedForward(config.width, 4 * config.width)

    def forward(self, images):
        x = self.embed(patchify(images, self.patch)) + self.pos
        return x + self.ffw(x)


def split_heads(x, heads):
    """(B, T, heads * d) -> (B, heads, T, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def merge_heads(x):
    """(B, heads, T, d) -> (B, T, heads * d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class ResamplerAttention(nn.Module):
    """Flamingo's Perceiver Resampler attention (appendix A.1.1, Figure 5): the latents are the
    queries, the keys and values are [media; latents] (the latents attend to themselves too), every
    input layer-normalised, no mask. media (B, M, d), latents (B, N, d) -> (B, N, d)."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm_media, self.norm_latents = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.kv = nn.Linear(d, 2 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, media, latents):
        latents = self.norm_latents(latents)
        kv = torch.cat((self.norm_media(media), latents), dim=1)
        q = split_heads(self.q(latents), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.kv(kv).chunk(2, dim=-1))
        return self.o(merge_heads(F.scaled_dot_product_attention(q, k, v)))  # softmax(q k^T / sqrt(d_head)) v


class PerceiverResampler(nn.Module):
    """N learned latent queries read a variable number of media features into N outputs: for each of
    `depth` layers, latents += attn(media, latents); latents += ffw(latents); then a LayerNorm.
    media (B, M, width) -> (B, N, width)."""

    def __init__(self, config):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(config.queries, config.width) * 0.02)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(attn=ResamplerAttention(config.width, config.heads),
                                                       ffw=FeedForward(config.width, 4 * config.width)))
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)

    def forward(self, media):
        x = self.latents.expand(media.shape[0], -1, -1)
        for layer in self.layers:
            x = x + layer["attn"](media, x)
            x = x + layer["ffw"](x)
        return self.norm(x)


class Bridge(nn.Module):
    """images (B, H, W) in [0, 1] -> media (B, config.media_tokens, n_embd): PatchEncoder, then the
    PerceiverResampler (none when queries is 0), then a linear projection to the language model's
    width (BLIP-2's fully connected layer, section 3.3)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = PatchEncoder(config)
        self.resampler = PerceiverResampler(config) if config.queries else None
        self.proj = nn.Linear(config.width, config.n_embd)

    def forward(self, images):
        x = self.encoder(images.to(self.proj.weight.dtype))
        if self.resampler is not None:
            x = self.resampler(x)
        return self.proj(x)


class GatedCrossAttention(nn.Module):
    """Flamingo's gated xattn-dense layer (section 2.2, Figure 4), tanh gates initialised at 0:
    x (B, T, n_embd), media (B, M, n_embd) ->
    x + tanh(a_xattn) * attn(q = LN(x), kv = media), then + tanh(a_dense) * ffw(LN(.))."""

    def __init__(self, n_embd, heads, hidden):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(n_embd)
        self.q = nn.Linear(n_embd, n_embd, bias=False)
        self.kv = nn.Linear(n_embd, 2 * n_embd, bias=False)
        self.o = nn.Linear(n_embd, n_embd, bias=False)
        self.ffw = FeedForward(n_embd, hidden) if hidden else None
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ffw_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x, media):
        q = split_heads(self.q(self.norm(x)), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.kv(media.to(x.dtype)).chunk(2, dim=-1))
        x = x + torch.tanh(self.attn_gate) * self.o(merge_heads(F.scaled_dot_product_attention(q, k, v)))
        if self.ffw is not None:
            x = x + torch.tanh(self.ffw_gate) * self.ffw(x)
        return x


class GatedBlock(nn.Module):
    """A block of the language model with a GatedCrossAttention before it (Flamingo inserts them
    between the frozen blocks): forward(x, *args) = block(xattn(x, media), *args), media the tensor
    set on the wrapper (attend_to) or, when None, the block alone."""

    def __init__(self, block, xattn):
        super().__init__()
        self.block, self.xattn, self.media = block, xattn, None

    def __getattr__(self, name):
        """What the model file reads on its blocks (a mixture's router statistics: block.mlp, block.sparse)
        is the wrapped block's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "block":
                raise
            return getattr(self.block, name)

    def forward(self, x, *args, **kwargs):
        if self.media is not None:
            x = self.xattn(x, self.media)
        return self.block(x, *args, **kwargs)


def blocks(model):
    """(the nn.ModuleList holding the model's blocks, its name): the blocks are the outermost of
    model.fsdp_units() (a model file's contract member; a mixture's experts sit inside its blocks)."""
    units = model.fsdp_units()
    outer = [u for u in units if not any(v is not u and any(m is u for m in v.modules()) for v in units)]
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == len(outer) and all(a is b for a, b in zip(m, outer)):
            return m, name
    raise ValueError(f"{type(model).__module__}: no list of blocks found")


def attach(model, config):
    """Give the language model its bridge (model.bridge, fp32, on the model's device) and, for xattn,
    a GatedBlock around each block; freeze every language-model parameter when config.freeze_lm.
    In place; returns the model. A model that already has one: ValueError."""
    if hasattr(model, "bridge"):
        raise ValueError("the model already has a multimodal bridge")
    if config.freeze_lm:
        model.requires_grad_(False)
    device = next(model.parameters()).device
    model.bridge = Bridge(config).to(device)
    if config.inject == "xattn":
        layers, _ = blocks(model)
        for i, block in enumerate(layers):
            layers[i] = GatedBlock(block, GatedCrossAttention(model.config.n_embd, config.heads,
                                                              config.xattn_hidden).to(device))
    return model


@contextmanager
def attend_to(model, media):
    """Within the block, every GatedBlock of the model cross-attends to media (B, M, n_embd)."""
    wrappers = [m for m in model.modules() if isinstance(m, GatedBlock)]
    for w in wrappers:
        w.media = media
    try:
        yield model
    finally:
        for w in wrappers:
            w.media = None


@contextmanager
def language_model(model):
    """Within the block, the model is its language model alone (no bridge, blocks unwrapped): what
    save_pretrained writes. Restored after."""
    bridge = model._modules.pop("bridge")
    layers, _ = blocks(model) if any(isinstance(m, GatedBlock) for m in model.modules()) else (None, None)
    wrappers = list(layers) if layers is not None else []
    try:
        for i, w in enumerate(wrappers):
            layers[i] = w.block
        yield model
    finally:
        for i, w in enumerate(wrappers):
            layers[i] = w
        model.bridge = bridge


def forward(model, images, idx, targets=None, cache=None):
    """The language model's forward on idx (B, T) with the images (B, H, W) (or None: text alone)
    reaching it by the bridge's injection. (logits (B, T, vocab) of the text, loss)."""
    inner = unwrap(model)
    if images is None:
        return model(idx, targets, cache=cache)
    media = inner.bridge(images)
    if inner.bridge.config.inject == "prefix":
        return model(idx, targets, cache=cache, prefix=media)
    with attend_to(inner, media):
        return model(idx, targets, cache=cache)


def loss_fn(model, batch):
    """train.py's loss hook under --mm_images: batch = (images, x, y) (SceneDataset) -> (the language
    model's cross-entropy of the text after the image, nats; {} metrics)."""
    images, x, y = batch
    return forward(model, images, x, y)[1], {}


def count_params(model):
    """(the bridge's trainable parameters, wrappers' gated layers included; the language model's)."""
    bridge = sum(p.numel() for n, p in model.named_parameters() if n.startswith("bridge.") or ".xattn." in n)
    return bridge, sum(p.numel() for p in model.parameters()) - bridge


# ----------------------------------------------------------------------------- answers

@torch.no_grad()
def exact_match(model, tokenizer, images, items, batch_size=128):
    """Whether greedy decoding gives each item's answer: items [(text, answer)] with the text after
    the image (after_image) or, images None, the whole text-only prompt; images (n, H, W) or None.
    The answer, then a newline, is right when each of its tokens is the most likely next token
    given the ones before (teacher forcing: the same verdict as greedy decoding to the newline).
    Returns a list of bools, one per item."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        prompts = [tokenizer.encode(p) for p, _ in chunk]
        answers = [tokenizer.encode(a + "\n") for _, a in chunk]
        x, y = text_batch(tokenizer, [p + a + "\n" for p, a in chunk], device)
        imgs = None if images is None else images[s:s + batch_size].to(device)
        logits = forward(model, imgs, x)[0]
        guess = logits.argmax(-1)
        for r, (p, a) in enumerate(zip(prompts, answers)):
            n = len(p) + len(a) - 1  # positions of x in this row
            out.append(bool((guess[r, n - len(a):n] == y[r, n - len(a):n]).all()))
    return out


@torch.no_grad()
def generate(model, tokenizer, image, prompt, max_new_tokens=16, temperature=0.0, generator=None, stop="\n"):
    """The completion of `prompt` after `image` (H, W) in [0, 1] (or None: text alone), decoded with
    the KV cache (a prefix prefilled once, with the prompt) up to the `stop` text or max_new_tokens
    tokens; temperature 0 is greedy (generation.sample_next). Returns the new text."""
    model.eval()
    inner = unwrap(model)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)
    media = None if image is None else inner.bridge(image[None].to(device))
    prefix = media if media is not None and inner.bridge.config.inject == "prefix" else None
    cache = model.init_cache(1, (0 if prefix is None else prefix.shape[1]) + ids.shape[1] + max_new_tokens)
    new = []
    with attend_to(inner, media) if media is not None and prefix is None else nullcontext():
        logits = model(ids, cache=cache, prefix=prefix)[0][:, -1]
        for _ in range(max_new_tokens):
            token = sample_next(logits.float(), temperature, generator=generator)
            if tokenizer.decode([int(token)]) == stop:
                break
            new.append(int(token))
            logits = model(token[:, None], cache=cache)[0][:, -1]
    return tokenizer.decode(new)


# ----------------------------------------------------------------------------- files

def is_bridge(directory):
    return (Path(directory) / BRIDGE_CONFIG).is_file()


def bridge_state(model, state=None):
    """The bridge's tensors of a state dict (default the model's): model.bridge's and the gated
    layers' (`...xattn...`), by their names in the model."""
    state = model.state_dict() if state is None else state
    return {k: v.detach().contiguous() for k, v in state.items() if k.startswith("bridge.") or ".xattn." in k}


def save(model, directory, state=None, metadata=None):
    """multimodal.json (the BridgeConfig) + multimodal.safetensors (bridge_state), each written under
    a temporary name and renamed; `metadata` goes into the safetensors header (train.py: the step)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = bridge_state(model, state)
    atomic_write(directory / BRIDGE_WEIGHTS,
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))
    config = asdict(unwrap(model).bridge.config)
    atomic_write(directory / BRIDGE_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def read_config(directory):
    """multimodal.json as a BridgeConfig; a missing file or unknown key: ValueError."""
    path = Path(directory) / BRIDGE_CONFIG
    if not path.is_file():
        raise ValueError(f"no {BRIDGE_CONFIG} in {directory}")
    cfg = read_json(path)
    known = {f.name for f in fields(BridgeConfig)}
    if unknown := sorted(set(cfg) - known):
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}")
    return BridgeConfig(**cfg)


def base_path(directory):
    """The language model's directory of a bridge folder: multimodal.json's base_model, or the folder
    itself (a run that trained the language model too saves it there)."""
    base = read_config(directory).base_model or str(directory)
    if not (Path(base) / "config.json").is_file():
        raise ValueError(f"{Path(directory) / BRIDGE_CONFIG}: the language model {base!r} is not a model directory")
    return Path(base)


def load_bridge(model, directory):
    """Attach the bridge saved in `directory` to its language model (attach), checking every tensor's
    name and shape. In place; returns the model. ValueError naming an unexpected, missing or
    misshapen tensor."""
    path = Path(directory) / BRIDGE_WEIGHTS
    if not path.is_file():
        raise ValueError(f"no {BRIDGE_WEIGHTS} in {directory}")
    attach(model, read_config(directory))
    expected, stored = bridge_state(model), load_tensors(path)
    for key, tensor in stored.items():
        if key not in expected:
            raise ValueError(f"unexpected tensor {key!r} in {path}")
        if tensor.shape != expected[key].shape:
            raise ValueError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the bridge needs {tuple(expected[key].shape)}")
    if missing := sorted(set(expected) - set(stored)):
        raise ValueError(f"tensor {missing[0]!r} is missing from {path}")
    model.load_state_dict(stored, strict=False)
    return model
