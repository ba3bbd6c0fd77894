"""Generation for every model in models/: the KV-cache decoding loop, sampling, batches of prompts.
A library module (sample.py is its command line; train.py and bench.py use it too).

  tokens = generate(model, idx, max_new_tokens, temperature=0.8, top_k=200)  # yields (B,) tensors
  ids = sample_next(logits, temperature=1.0, top_p=0.9, min_p=0.05)          # transformers' warpers
  text = stream(model, tokenizer, prompt_ids, 300)                            # one prompt, printed as it comes
  texts = complete(model, tokenizer, [ids_a, ids_b], 100, stop="\n")        # a left-padded batch
  tokens = generate(model, idx, 100, draft=small_model, speculate_k=4)       # speculative decoding

Shapes: idx (B, T) token ids; logits (B, V). Decoding fills a pre-allocated kernels.KVCache once
with the prompt (prefill), then feeds one token per step (decode_one_token); compile=True runs that
step through torch.compile over a static cache (gpt-fast's recipe). With a draft model, a small
model proposes speculate_k tokens that the model verifies in one forward (speculative_decode).
stream and complete draw only ids their tokenizer has, and the tokenizers decode an id they do not
have to ''.
"""
import functools
import numbers
import sys

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- sampling

def check_sampling(temperature=1.0, top_k=None, top_p=None, min_p=None):
    """Refuse (ValueError, naming the setting) sampling settings outside their range, which would
    otherwise be silently changed: temperature >= 0 (0: greedy), top_k >= 0 (0 or None: off),
    0 <= top_p <= 1 and 0 <= min_p <= 1 (None: off), the ranges of transformers' warpers."""
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature must be >= 0 (0: greedy), not {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be an integer >= 0 (0: off), not {top_k}")
    for name, value in (("top_p", top_p), ("min_p", min_p)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, not {value}")


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, allowed=None):
    """The logits (B, V) that sampling draws from (softmax), in fp32: ids outside `allowed` ((V,)
    bool, None: all) set to -inf, then divided by temperature (> 0), then the top-k, top-p and
    min-p filters, each setting the tokens it removes to -inf, in transformers' order and with its
    semantics (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper,
    min_tokens_to_keep=1; each filter sees what the one before left):
      top_k: keep the tokens whose logit is >= the k-th largest (ties at the k-th are all kept);
      top_p (Holtzman et al. 2020): sort ascending and drop the tokens whose cumulative probability
        is <= 1 - top_p; the most likely token is always kept. A token that brings the nucleus to
        exactly top_p ends it: probabilities (0.5, 0.25, 0.25) at top_p 0.5 keep the first alone.
        Among tokens tied at the boundary, which survive follows torch.sort's order, as in
        transformers;
      min_p (Nguyen et al. 2024): drop the tokens whose probability is < min_p times the largest.
    top_k None or 0, top_p None or 1 and min_p None or 0 are off."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[..., -1:] = False  # the most likely token stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p:
        probs = logits.softmax(dim=-1)
        drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # the most likely token stays
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, generator=None, allowed=None):
    """One token id per row of logits (B, V) -> (B,): greedy (the largest logit among the allowed
    ids) at temperature 0, otherwise a draw from the softmax of filter_logits (see there for
    temperature, top_k, top_p, min_p and allowed)."""
    if temperature == 0:
        return (logits if allowed is None else filter_logits(logits, allowed=allowed)).argmax(dim=-1)
    logits = filter_logits(logits, temperature, top_k, top_p, min_p, allowed)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def decodable(tokenizer, vocab_size, device="cpu"):
    """(vocab_size,) bool: True at the ids that `tokenizer` has (tokenizer.known_ids), the ids that
    sampling may propose. A model's vocabulary can be larger than its tokenizer's ids (Qwen2.5:
    151,936 rows, 151,665 ids; padded rows are never trained): the ids beyond are never drawn.
    None when the tokenizer has every id: nothing to mask at each decoding step."""
    known = tokenizer.known_ids
    if isinstance(known, range) and known.start == 0 and known.step == 1:
        return None if known.stop >= vocab_size else torch.arange(vocab_size, device=device) < known.stop
    ids = sorted(i for i in known if 0 <= i < vocab_size)
    if len(ids) == vocab_size:
        return None
    ids = torch.tensor(ids, dtype=torch.long, device=device)
    return torch.zeros(vocab_size, dtype=torch.bool, device=device).index_fill_(0, ids, True)


# ----------------------------------------------------------------------------- decoding

def left_pad(prompts, pad_id=0, device="cpu"):
    """Prompts of different lengths (lists of token ids) -> idx (B, T), each row padded on the
    left with pad_id to the longest, and pad (B,), how many padding tokens each row starts with."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    return idx, torch.tensor([T - len(p) for p in prompts], dtype=torch.long, device=device)


def compute_dtype(model):
    """The dtype of model's activations (and KV cache) without autocast: that of its first
    floating-point parameter (the embedding table). Not lm_head.weight's: quantize.py's int8 layers
    hold int8 weights."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def compiled_decoder(model):
    """model's forward under torch.compile, made once per model, for one-token steps against a
    static KV cache: every step has the same shapes and inputs, so it compiles on the first step and
    never again. On CPU the compiled graph is driven from C++ (inductor's cpp_wrapper), which cuts
    the per-step overhead of small models. On CUDA it is replayed as a CUDA graph
    (mode="reduce-overhead", gpt-fast's setting): prefill marks a static cache's tensors as static
    addresses (torch._dynamo.mark_static_address), so the graph updates them in place instead of
    copying them in and out (not measured in this project: no GPU in its CI). Other shapes (the
    (k+1)-token verification of speculative_decode) compile their own graph once."""
    if "_compiled_decoder" not in model.__dict__:  # outside nn.Module's registry: not a submodule
        cpu = model.lm_head.weight.device.type == "cpu"
        model.__dict__["_compiled_decoder"] = torch.compile(model.forward, dynamic=False,
                                                            options={"cpp_wrapper": True} if cpu else None,
                                                            mode=None if cpu else "reduce-overhead")
    return model.__dict__["_compiled_decoder"]


def _window(seq, pad, n):
    """The last n tokens of seq (B, T), and the padding left in each row (pad (B,) or None)."""
    drop = max(seq.shape[1] - n, 0)
    if drop and pad is not None:
        pad = (pad - drop).clamp(min=0)
    return seq[:, drop:], pad


# gpt-fast's layout (generate.py): prefill runs the prompt into a fresh KV cache, decode_one_token
# feeds one token, decode_n_tokens draws and feeds in a loop (refilling a full cache), generate sets
# them up.

@torch.no_grad()
def prefill(model, seq, pad=None, max_len=None, static=False):
    """Run seq (B, T) into a fresh KV cache of max_len slots; return (logits (B, V) after the last
    token, the cache). pad (B,) and static: see kernels.KVCache. Under autocast the cache holds keys
    and values in the autocast dtype. max_len=None (recomputing): no cache is kept, the cache
    returned is None, except for a padded batch, where a throwaway one of T slots carries the mask."""
    if max_len is None and pad is None:
        return model(seq)[0][:, -1], None
    kind = seq.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else compute_dtype(model)
    cache = model.init_cache(seq.shape[0], seq.shape[1] if max_len is None else max_len, dtype=dtype, pad=pad,
                             static=static)
    if static and kind == "cuda":  # CUDA graphs (compiled_decoder) update these in place, at fixed addresses
        for t in cache.k + cache.v + [cache.pos]:
            torch._dynamo.mark_static_address(t)
    return model(seq, cache=cache)[0][:, -1], cache


def decode_one_token(model, token, cache):
    """One step: feed token (B,) to `model` (the model, or its compiled_decoder) against cache,
    which must have a free slot; return the logits (B, V) after it. Call it under
    torch.no_grad(), as decode_n_tokens does."""
    return model(token[:, None], cache=cache)[0][:, -1]


@torch.no_grad()
def decode_n_tokens(model, seq, logits, cache, n, pad=None, use_cache=True, compile=False, **sampling):
    """Yield n new tokens, a (B,) tensor at a time, continuing seq (B, T) from the logits (B, V) and
    cache that prefill(seq, pad) returned; sampling: sample_next's keywords.
    With the cache, each step is decode_one_token (through compiled_decoder with compile=True). A
    full cache (cache.max_len slots) is refilled: the new token joins the sequence, and prefill runs
    on its last block_size // 2 tokens, for all rows at once (on the longest row's schedule).
    use_cache=False recomputes instead: every step runs prefill on the last block_size tokens."""
    block = model.config.block_size
    step = compiled_decoder(model) if compile and use_cache else model
    max_len = cache.max_len if use_cache else None
    filled, recent = seq.shape[1], []  # recent: tokens not yet joined to seq (joined at a refill: one copy)
    for i in range(n):
        token = sample_next(logits, **sampling)
        yield token
        if i == n - 1:  # the last token needs no forward
            return
        if use_cache and filled < max_len:
            logits = decode_one_token(step, token, cache)
            filled += 1
            recent.append(token[:, None])
        else:  # recomputing, or the cache is full: prefill the window the rule keeps
            seq, recent = torch.cat([seq, *recent, token[:, None]], dim=1), []
            seq, pad = _window(seq, pad, block // 2 if use_cache else block)
            logits, cache = prefill(model, seq, pad, max_len, static=compile)
            filled = seq.shape[1]


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             use_cache=True, pad=None, compile=False, min_p=None, allowed=None, draft=None, speculate_k=4,
             stats=None):
    """Yield max_new_tokens new tokens, a (B,) tensor at a time, continuing idx (B, T). Sampling:
    sample_next's temperature, top_k, top_p, min_p (settings out of range: ValueError, see
    check_sampling), generator, and allowed ((V,) bool: the ids that may be drawn, e.g.
    decodable(tokenizer, V); None: all).

    Rows may be prompts of different lengths, left-padded: pad (B,) says how many padding tokens
    each row starts with (left_pad makes idx and pad); each row then decodes as it would alone, as
    long as the padded batch fits block_size (a full cache is refilled for all rows at once, on the
    longest row's schedule; without the cache every row keeps its own last block_size tokens).
    The prompt's last block_size tokens are run once to fill a pre-allocated KV cache (prefill),
    then each step feeds one token (decode_n_tokens). When the cache reaches block_size, it is
    refilled from the last half block of the sequence.
    compile=True runs the one-token steps through compiled_decoder over a static cache.
    use_cache=False (for comparison) recomputes the last block_size tokens at every step.
    draft (a model with the same vocabulary): speculative decoding, speculate_k tokens drafted per
    round (speculative_decode, which says what it needs and what `stats` collects)."""
    check_sampling(temperature, top_k, top_p, min_p)
    block = model.config.block_size
    if pad is not None:  # no padding at all: the unmasked path
        pad = torch.as_tensor(pad, dtype=torch.long, device=idx.device)
        pad = pad if int(pad.max()) > 0 else None
    if draft is not None:
        if not use_cache:
            raise ValueError("speculative decoding (a draft model) needs the KV cache")
        yield from speculative_decode(model, draft, idx, max_new_tokens, speculate_k, pad, compile, stats, generator,
                                      temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, allowed=allowed)
        return
    seq, pad = _window(idx, pad, block)
    max_len = None  # the cache's slots; None: recomputing
    if use_cache:
        max_len = seq.shape[1] + max_new_tokens
        if compile:  # a power of two: calls of other lengths reuse the compiled step (its shapes are the cache's)
            max_len = 1 << (max_len - 1).bit_length()
        max_len = min(block, max_len)  # real checkpoints have block_size up to 128k
    logits, cache = prefill(model, seq, pad, max_len, static=compile)
    yield from decode_n_tokens(model, seq, logits, cache, max_new_tokens, pad, use_cache, compile,
                               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator,
                               allowed=allowed)


# ----------------------------------------------------------------------------- speculative decoding

def token_probabilities(logits, temperature=1.0, top_k=None, top_p=None, min_p=None, allowed=None):
    """The distribution (..., V) in fp32 that sample_next draws from for logits (..., V): the
    softmax of filter_logits, or at temperature 0 the one-hot of the greedy token (so that greedy
    decoding is the special case of the rejection rule below that never draws at random)."""
    if temperature == 0:
        return F.one_hot(sample_next(logits, 0, allowed=allowed), logits.shape[-1]).float()
    return filter_logits(logits, temperature, top_k, top_p, min_p, allowed).softmax(dim=-1)


def speculative_accept(p, q, drafted, generator=None):
    """The rejection rule of speculative sampling (Leviathan et al. 2023, Algorithm 1; Chen et al.
    2023; gpt-fast's speculative_decode). p (B, k+1, V): the model's probabilities at the k drafted
    positions and one past them; q (B, k, V): the draft's probabilities; drafted (B, k): the draft's
    tokens, drawn from q. Drafted token i is kept with probability min(1, p_i(d_i) / q_i(d_i)), and
    each row keeps its tokens up to its first rejection. Returns (accepted (B,): how many leading
    drafted tokens each row keeps, 0..k; next (B,): the token after them, drawn from
    max(0, p - q) renormalised at the rejected position, or from p at position k when all k are
    kept). Each row's kept tokens and next token are then a draw from p, token by token, whatever
    q is (the paper's Theorem 1; tested statistically)."""
    B, k = drafted.shape
    p_d = p[:, :k].gather(-1, drafted[..., None]).squeeze(-1)
    q_d = q.gather(-1, drafted[..., None]).squeeze(-1)
    u = torch.rand(B, k, device=p.device, generator=generator)
    keep = u * q_d < p_d  # u < p/q, without dividing; q_d > 0 since d was drawn from q
    accepted = keep.long().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(B, device=p.device)
    p_next = p[rows, accepted]
    residual = (p_next - F.pad(q, (0, 0, 0, 1))[rows, accepted]).clamp(min=0)  # q is 0 past the draft
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)  # p == q there: draw from p
    return accepted, torch.multinomial(residual, 1, generator=generator).squeeze(-1)


def _rewind(cache, length):
    """Forget the cache's slots from `length` on: a dynamic cache attends to its first pos slots,
    a static one masks the slots past each query, and both overwrite them on the next write."""
    if any(layout != "full" for layout in cache.layout):
        raise ValueError("speculative decoding rewinds the KV cache: a sliding window's rolling buffer and "
                         "Performer's running state cannot rewind (full attention only)")
    if cache.static:
        cache.pos.fill_(length)
    else:
        cache.pos = length


@torch.no_grad()
def speculative_decode(model, draft, seq, max_new_tokens, speculate_k=4, pad=None, compile=False, stats=None,
                       generator=None, **settings):
    """Speculative decoding (Leviathan et al. 2023; gpt-fast's generate.py): yield max_new_tokens
    new tokens, a (B,) tensor at a time, continuing seq (B, T) (pad (B,): left padding, as in
    generate). Each round the draft model (same vocabulary) proposes speculate_k tokens one step at
    a time, the model scores all of them in one forward of speculate_k + 1 tokens, and
    speculative_accept keeps a prefix of them plus one token of the model's own; both KV caches
    are rewound past the rejected tokens. At temperature 0 the tokens are the model's greedy tokens
    (as generate without a draft gives them, up to float rounding between a one-token and a
    (k+1)-token forward); when sampling, they are a draw from the model's filtered distribution.
    In a batch every row advances by the fewest tokens any row kept plus one: a row that kept more
    takes its next drafted token (itself a draw from p), so each row stays a draw from the model.
    settings: sample_next's temperature, top_k, top_p, min_p, allowed. stats (a dict, optional)
    accumulates "rounds", "drafted" and "accepted" (drafted tokens kept, counting each row).
    No cache refill: T + max_new_tokens + speculate_k + 1 must fit both models' block_size
    (ValueError otherwise, as for a draft whose vocabulary differs). compile=True runs the draft's
    one-token steps and the model's (k+1)-token verification through compiled_decoder over static
    caches."""
    V = model.config.vocab_size
    if draft.config.vocab_size != V:
        raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the model's ({V})")
    if speculate_k < 1:
        raise ValueError(f"speculate_k must be >= 1, not {speculate_k}")
    B, T = seq.shape
    block = min(model.config.block_size, draft.config.block_size)
    max_len = T + max_new_tokens + speculate_k + 1
    if max_len > block:
        raise ValueError(f"speculative decoding keeps the prompt and every new token in the KV cache: prompt ({T}) + "
                         f"max_new_tokens ({max_new_tokens}) + speculate_k + 1 must be <= block_size ({block})")
    if max_new_tokens == 0:
        return
    if compile:
        max_len = min(block, 1 << (max_len - 1).bit_length())
    probabilities = functools.partial(token_probabilities, **settings)
    sampling = settings["temperature"] > 0
    verify, propose = (compiled_decoder(model), compiled_decoder(draft)) if compile else (model, draft)
    logits, cache = prefill(model, seq, pad, max_len, static=compile)
    _, draft_cache = prefill(draft, seq, pad, max_len, static=compile)
    token, filled, done = sample_next(logits, generator=generator, **settings), T, 1
    yield token
    stats = {} if stats is None else stats
    while done < max_new_tokens:
        drafted, q, x = [], [], token
        for _ in range(speculate_k):
            qi = probabilities(decode_one_token(propose, x, draft_cache))
            x = torch.multinomial(qi, 1, generator=generator).squeeze(-1) if sampling else qi.argmax(dim=-1)
            drafted.append(x)
            q.append(qi)
        drafted = torch.stack(drafted, dim=1)  # (B, k)
        p = probabilities(verify(torch.cat([token[:, None], drafted], dim=1), cache=cache)[0])  # (B, k+1, V)
        accepted, nxt = speculative_accept(p, torch.stack(q, dim=1), drafted, generator)
        m = int(accepted.min())
        if m < speculate_k:  # rows that kept more than m go on with their drafted token m
            nxt = torch.where(accepted > m, drafted[:, m], nxt)
        for key, value in (("rounds", 1), ("drafted", B * speculate_k), ("accepted", int(accepted.sum()))):
            stats[key] = stats.get(key, 0) + value
        for t in [*drafted[:, :m].unbind(dim=1), nxt][:max_new_tokens - done]:
            yield t
        done += m + 1
        filled += m + 1  # token and drafted[:, :m] are in both caches from here on
        _rewind(cache, filled)
        if m == speculate_k:  # the draft never fed its last token
            decode_one_token(propose, drafted[:, -1], draft_cache)
        _rewind(draft_cache, filled)
        token = nxt


def stream(model, tokenizer, prompt_ids, max_new_tokens, out=None, stop=None, head="", **sampling):
    """Generate from one prompt, writing the text to `out` (None: sys.stdout at the time of the
    call) as it comes, and return it. `head` (the prompt's text, say) is written before it, together
    with the first two tokens: after the first one-token step, so that an error there (compile=True's
    compilation) comes before anything is shown. With `stop`, generation ends where that string first
    appears (it is not included). sampling: generate's keywords; only ids that the tokenizer has are
    drawn (decodable), unless `allowed` says otherwise."""
    out = sys.stdout if out is None else out
    device = model.lm_head.weight.device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    sampling.setdefault("allowed", decodable(tokenizer, model.config.vocab_size, device))
    ids, shown, text = [], "", ""
    for tok in generate(model, idx, max_new_tokens, **sampling):
        ids.append(tok.item())
        text = tokenizer.decode(ids)
        done = stop is not None and stop in text
        if done:
            text = text[:text.index(stop)]
        if done or (not text.endswith("\ufffd") and (len(ids) > 1 or not head)):  # hold back half a character
            out.write(head + text[len(shown):])
            out.flush()
            shown, head = text, ""
        if done:
            return text
    out.write(head + text[len(shown):])
    return text


def complete(model, tokenizer, prompts, max_new_tokens, stop=None, **sampling):
    """Completions (texts) of several prompts (lists of token ids), decoded together as one
    left-padded batch. With `stop`, each ends where that string first appears (not included), and
    decoding ends when every row has it. sampling: as in stream."""
    device = model.lm_head.weight.device
    idx, pad = left_pad(prompts, device=device)
    sampling.setdefault("allowed", decodable(tokenizer, model.config.vocab_size, device))
    ids, open_rows = [[] for _ in prompts], set(range(len(prompts)))
    for tok in generate(model, idx, max_new_tokens, pad=pad, **sampling):
        for row, t in zip(ids, tok.tolist()):
            row.append(t)
        if stop is not None:
            open_rows = {i for i in open_rows if stop not in tokenizer.decode(ids[i])}
            if not open_rows:
                break
    texts = [tokenizer.decode(row) for row in ids]
    return [t[:t.index(stop)] if stop is not None and stop in t else t for t in texts]
