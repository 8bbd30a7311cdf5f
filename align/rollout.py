"""The generation/scoring loop shared by every RL algorithm: sample completions, score them, and hold the result
in a typed `Rollout`.

    samples = generate(model, prompt_ids, prompt_mask, max_new_tokens=16, temperature=0.7, eos_id=2, pad_id=0)
    rollout = make_rollout(samples, tokenizer, prompts, columns, sources, ...)

Nothing here knows about PPO, GRPO or configs: an algorithm receives a `Rollout` and turns it into advantages and
a loss. Shapes use these letters:

    B  rollouts (completions)      P  prompt tokens (left-padded)      C  completion tokens (right-padded)
    N  the valid completion tokens of a batch (sum of completion_mask)  V  vocabulary

Sampling distribution. A token is drawn from ``softmax(logits / temperature)``, restricted to the top-k tokens
and to the top-p nucleus when those are set, and its log-probability is recorded under the *untruncated*
``softmax(logits / temperature)`` at the step that sampled it (no second forward). That is the quantity a training
forward recomputes with :func:`completion_logprobs` at the same temperature, so ratios are exactly 1 before the
first update (up to float rounding between the cached and the full forward). With top-k/top-p off (the RL
defaults) the recorded log-probabilities are those of the sampling distribution itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .data import position_ids_from_mask
from .losses import entropy_from_logits, token_logprobs
from .models import GroupLM, LogprobRequest, Logprobs, new_cache
from .rewards import score_completions

Tensor = torch.Tensor
RewardSource = Callable[..., Sequence[float]]


# ---------------------------------------------------------------------------------------------------------------
# the container


@dataclass
class Rollout:
    """A batch of sampled completions and everything an RL loss needs about them.

    Row ``i`` of every tensor and list belongs to the same completion. With ``group_size = G > 1`` rows
    ``[g·G, (g+1)·G)`` are G completions of the same prompt (GRPO groups).
    """

    prompt_ids: Tensor  # (B, P) long, left-padded with pad_id
    prompt_mask: Tensor  # (B, P) long, 1 on prompt tokens, 0 on left padding
    completion_ids: Tensor  # (B, C) long, right-padded with pad_id after the EOS
    completion_mask: Tensor  # (B, C) long, 1 up to and including the first EOS, 0 after it
    logprobs: Tensor  # (B, C) float32, log π_sample(token) at the sampling temperature; 0 where masked
    eos: Tensor  # (B,) bool, whether the completion ended with EOS (False: cut by max_new_tokens)
    ref_logprobs: Tensor | None = None  # (B, C) float32, the reference policy's log-probabilities, 0 where masked
    values: Tensor | None = None  # (B, C) float32, critic values V_t before token t, 0 where masked
    rewards: Tensor | None = None  # (B,) float32, combined reward (weighted sources + missing-EOS penalty)
    reward_components: dict[str, Tensor] = field(default_factory=dict)  # name -> (B,) float32, unweighted
    gold_rewards: dict[str, Tensor] = field(default_factory=dict)  # name -> (B,), logged only, never trained on
    texts: list[str] = field(default_factory=list)  # B decoded completions (cut at EOS, special tokens removed)
    prompts: list[Any] = field(default_factory=list)  # B prompts (str or chat messages), repeated per group
    columns: dict[str, list[Any]] = field(default_factory=dict)  # the prompt data's other columns, B values each
    group_size: int = 1

    # -- derived views ----------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """(B,) long: valid completion tokens of each row (EOS included)."""
        return self.completion_mask.sum(-1)

    def __len__(self) -> int:
        return self.batch_size

    def sequence_lengths(self) -> Tensor:
        """(B,) long: prompt + completion tokens of each row, the length a forward over it is padded to at
        least; with ``group_size`` G > 1 every row of a group gets the group's longest (its rows are computed
        together, the prompt once). The key `Run.shares` orders micro-batches by."""
        n = self.prompt_mask.sum(-1) + self.lengths
        g = self.group_size
        if g > 1 and len(n) % g == 0:
            n = n.view(-1, g).amax(-1, keepdim=True).expand(-1, g).reshape(-1)
        return n

    def subset(self, index: Sequence[int] | Tensor) -> "Rollout":
        """The rows `index` (a list or 1-D long tensor) of every field, with padding columns that no selected
        row uses removed (left of the prompts, right of the completions)."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.completion_ids.device)
        il = idx.tolist()
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                kw[f.name] = v[idx]
            elif isinstance(v, dict):
                kw[f.name] = {k: (x[idx] if isinstance(x, Tensor) else [x[i] for i in il]) for k, x in v.items()}
            elif isinstance(v, list):
                kw[f.name] = [v[i] for i in il] if v else []
            else:
                kw[f.name] = v
        return Rollout(**kw).trimmed()

    def trimmed(self) -> "Rollout":
        """The same rollout without all-padding columns (leading prompt pads, trailing completion pads)."""
        p_keep = int(self.prompt_mask.any(0).long().argmax()) if self.prompt_mask.numel() else 0
        c_keep = int(self.lengths.max()) if self.completion_mask.numel() else 0
        if p_keep == 0 and c_keep == self.completion_ids.shape[1]:
            return self
        out = dataclasses.replace(self)
        out.prompt_ids, out.prompt_mask = self.prompt_ids[:, p_keep:], self.prompt_mask[:, p_keep:]
        for name in ("completion_ids", "completion_mask", "logprobs", "ref_logprobs", "values"):
            v = getattr(self, name)
            if v is not None:
                setattr(out, name, v[:, :c_keep])
        return out


@dataclass
class Samples:
    """What `generate` returns; the first fields of a `Rollout` (same shapes and meaning)."""

    prompt_ids: Tensor  # (B, P)
    prompt_mask: Tensor  # (B, P)
    completion_ids: Tensor  # (B, C)
    completion_mask: Tensor  # (B, C)
    logprobs: Tensor  # (B, C)
    eos: Tensor  # (B,)


# ---------------------------------------------------------------------------------------------------------------
# sampling


def filter_logits(z: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits with everything outside the top-k tokens and the top-p nucleus set to −inf. (B, V) → (B, V).

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``; the most likely
    token is always kept. ``top_k = 0`` and ``top_p = 1`` leave ``z`` unchanged."""
    if top_k and 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                greedy: bool = False, generator: torch.Generator | None = None,
                uniform: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One token per row and its log-probability under ``softmax(logits / temperature)``.

    Shapes: logits (B, V) → (tokens (B,) long, logprobs (B,) float32). Greedy takes the argmax. ``uniform`` (B,)
    in [0, 1): the row's own random number, turned into a token by inverting the cumulative distribution (so a
    row's token depends on its logits and its number only, not on the other rows of the batch); without it a
    number per row is drawn from ``generator``."""
    z = logits.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    if greedy:
        tok = z.argmax(-1)
    else:
        probs = torch.softmax(filter_logits(z, top_k, top_p), dim=-1)
        if uniform is None:
            uniform = torch.rand(probs.shape[0], generator=generator, device=generator.device if generator
                                 is not None else probs.device).to(probs.device)
        tok = inverse_cdf(probs, uniform)
    return tok, logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


def inverse_cdf(probs: Tensor, uniform: Tensor) -> Tensor:
    """The token of each row whose cumulative probability interval holds ``uniform · total``: a draw from the
    row's distribution for ``uniform`` ~ U[0, 1). (B, V), (B,) → (B,) long. A token of probability 0 is never
    drawn (its interval is empty); the rounding case at the very top falls back to the most likely token."""
    cdf = probs.cumsum(-1)
    x = (uniform.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    tok = torch.searchsorted(cdf, x, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    empty = probs.gather(-1, tok.unsqueeze(-1)).squeeze(-1) <= 0
    return torch.where(empty, probs.argmax(-1), tok)


def make_generator(device: torch.device | str, *key: Any) -> torch.Generator:
    """A torch.Generator on `device` seeded from `key` (e.g. seed, step, process index).

    Seeding each step's sampling from the step number makes a resumed run draw the same completions as an
    uninterrupted one without storing generator state."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def completion_uniforms(n: int, max_new_tokens: int, *key: Any, first: int = 0) -> Tensor:
    """(n, max_new_tokens) float32 uniform numbers on the CPU: row i is the random stream of completion
    ``first + i``, seeded from ``(*key, first + i)`` alone. Keyed by (seed, step, global index of the completion),
    a completion is drawn the same whichever process samples it and whatever else is in its batch: one process
    with gradient accumulation and N processes sample the same rollouts."""
    return torch.stack([torch.rand(max_new_tokens, generator=make_generator("cpu", *key, first + i))
                        for i in range(n)]) if n else torch.zeros(0, max_new_tokens)


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, eos_id: int | None = None,
             pad_id: int = 0, generator: torch.Generator | None = None, num_return_sequences: int = 1,
             greedy: bool = False, uniforms: Tensor | None = None) -> Samples:
    """Sample completions with a KV cache, keeping each sampled token's log-probability.

    ``model`` is a transformers causal LM (or a peft wrapper of one). ``prompt_ids``/``prompt_mask`` (B, P) are
    left-padded; positions count real tokens only, so padding never changes a row's result. Each prompt is
    prefilled once; with ``num_return_sequences = G`` its cache is then repeated G times, giving B·G rows in
    prompt order (rows ``[i·G, (i+1)·G)`` belong to prompt i). Generation stops when every row has emitted
    ``eos_id`` or after ``max_new_tokens``; tokens after a row's EOS are ``pad_id`` with mask 0 and logprob 0.

    Randomness: ``uniforms`` (B·G, max_new_tokens), the random number of each output row at each step
    (:func:`completion_uniforms`), or numbers drawn from ``generator``; either way the token of row i at step t is
    a function of that row's logits and ``uniforms[i, t]`` alone (:func:`inverse_cdf`).

    Returns `Samples` with prompt tensors (B·G, P) and completion tensors (B·G, C), C ≤ max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    g = int(num_return_sequences)
    mask = prompt_mask.long()
    pos = position_ids_from_mask(mask)
    cache, cache_arg = new_cache(model)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{cache_arg: cache})
    logits = out.logits[:, -1]
    next_pos = pos[:, -1] + 1
    if g > 1:
        cache.batch_repeat_interleave(g)
        logits, mask, next_pos = (x.repeat_interleave(g, dim=0) for x in (logits, mask, next_pos))
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, dim=0), prompt_mask.repeat_interleave(g, dim=0)
    n = logits.shape[0]
    if not greedy:
        if uniforms is None:
            uniforms = torch.rand(n, max_new_tokens, generator=generator,
                                  device=generator.device if generator is not None else "cpu")
        if tuple(uniforms.shape) != (n, max_new_tokens):
            raise ValueError(f"uniforms has shape {tuple(uniforms.shape)}, expected {(n, max_new_tokens)}")
        uniforms = uniforms.to(logits.device)
    done = torch.zeros(n, dtype=torch.bool, device=logits.device)
    tokens, logps, valid = [], [], []
    temp = 1.0 if greedy and temperature <= 0 else temperature
    for t in range(max_new_tokens):
        tok, lp = sample_next(logits, temp, top_k, top_p, greedy, uniform=None if greedy else uniforms[:, t])
        alive = ~done
        tokens.append(torch.where(alive, tok, torch.full_like(tok, pad_id)))
        logps.append(torch.where(alive, lp, torch.zeros_like(lp)))
        valid.append(alive)
        if eos_id is not None:
            done = done | (alive & (tok == eos_id))
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tokens[-1].unsqueeze(-1), attention_mask=mask, position_ids=next_pos.unsqueeze(-1),
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return Samples(prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(), completion_ids=torch.stack(tokens, 1),
                   completion_mask=torch.stack(valid, 1).long(), logprobs=torch.stack(logps, 1).float(),
                   eos=done)


# ---------------------------------------------------------------------------------------------------------------
# forwards over prompt + completion


def sequence_inputs(prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                    completion_mask: Tensor) -> dict[str, Tensor]:
    """Model inputs for prompt + completion: input_ids, attention_mask, position_ids (B, P+C) and ``select``
    (B, P+C) bool, true at the positions whose next-token logits predict a valid completion token (position
    P−1+t predicts completion token t). Selected positions in row-major order match the nonzero entries of
    completion_mask in row-major order."""
    p = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    att = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)
    select = torch.zeros_like(att, dtype=torch.bool)
    select[:, p - 1:p - 1 + completion_ids.shape[1]] = completion_mask.bool()
    return {"input_ids": ids, "attention_mask": att, "position_ids": position_ids_from_mask(att), "select": select}


def scatter_tokens(values: Tensor, mask: Tensor) -> Tensor:
    """Place N per-token values (N,) into a (B, C) tensor at the nonzero entries of `mask`; 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask.bool()] = values
    return out


def completion_logprobs(lm: nn.Module, rollout: Rollout | Samples, temperature: float = 1.0,
                        with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities (B, C) of the completion tokens under `lm` at `temperature` (0 where masked), and
    optionally the entropy (B, C) of ``softmax(logits / temperature)`` at each completion token.

    `lm` is a :class:`align.models.SelectiveLM` (or anything with its forward): the output head runs on the
    N valid completion positions only, in chunks of rows when the (N, V) logits would be large."""
    inp = sequence_inputs(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    out = lm(inp["input_ids"], select=inp["select"], attention_mask=inp["attention_mask"],
             position_ids=inp["position_ids"],
             logprobs=logprob_request(rollout.completion_ids, rollout.completion_mask, temperature, with_entropy))
    return scatter_logprobs(out, rollout.completion_mask)


def group_completion_logprobs(model: nn.Module, rollout: Rollout, temperature: float = 1.0) -> Tensor:
    """:func:`completion_logprobs` of a causal LM on a rollout of groups (rows ``[g·G, (g+1)·G)`` share a
    prompt), each prompt encoded once for its group (:class:`align.models.GroupLM`). (B, C), 0 where masked."""
    g, dev = rollout.group_size, rollout.prompt_ids.device
    first = torch.arange(0, len(rollout), g, device=dev)
    out = GroupLM(model)(rollout.prompt_ids[first], attention_mask=rollout.prompt_mask[first],
                         completion_ids=rollout.completion_ids, completion_mask=rollout.completion_mask,
                         prompt_index=torch.arange(len(rollout), device=dev) // g,
                         logprobs=logprob_request(rollout.completion_ids, rollout.completion_mask, temperature))
    return scatter_logprobs(out, rollout.completion_mask)[0]


def logprob_request(completion_ids: Tensor, completion_mask: Tensor, temperature: float = 1.0,
                    with_entropy: bool = False) -> LogprobRequest:
    """What to ask a SelectiveLM / GroupLM for at the selected positions of `sequence_inputs`: the log-probs (and
    entropies) of the valid completion tokens."""
    return LogprobRequest(completion_ids[completion_mask.bool()], temperature, with_entropy)


def scatter_logprobs(out: Logprobs, completion_mask: Tensor) -> tuple[Tensor, Tensor | None]:
    """(B, C) log-probs (and entropies) from a model's `Logprobs` (N,) at the valid completion tokens."""
    m = completion_mask.bool()
    return scatter_tokens(out.logp.float(), m), None if out.entropy is None else scatter_tokens(out.entropy.float(), m)


def logprobs_from_selected(logits: Tensor, completion_ids: Tensor, completion_mask: Tensor,
                           temperature: float = 1.0, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(B, C) logprobs (and entropies) from logits (N, V) at the selected positions of `sequence_inputs` (for
    callers that need the logits themselves, e.g. TRPO's KL)."""
    m = completion_mask.bool()
    labels = completion_ids[m]
    lp = scatter_tokens(token_logprobs(logits, labels, temperature).float(), m)
    ent = None
    if with_entropy:
        z = logits if temperature == 1.0 else logits / temperature
        ent = scatter_tokens(entropy_from_logits(z).float(), m)
    return lp, ent


# ---------------------------------------------------------------------------------------------------------------
# scoring


def decode_completions(tokenizer, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
    """Text of each completion: its valid tokens without the EOS and other special tokens."""
    out = []
    for ids, n in zip(completion_ids.tolist(), completion_mask.sum(-1).tolist()):
        out.append(tokenizer.decode(ids[:n], skip_special_tokens=True))
    return out


def score(prompts: Sequence[Any], texts: Sequence[str], columns: dict[str, Sequence[Any]], eos: Tensor,
          sources: dict[str, RewardSource], weights: Sequence[float] | None = None,
          missing_eos_penalty: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Combined reward (B,) and each source's unweighted reward (B,) float32 of the completions: ``Σ_k w_k r_k −
    missing_eos_penalty·[no EOS]`` (:func:`align.rewards.score_completions`, as tensors, with the penalty)."""
    total, comps = score_completions(sources, prompts, texts, columns, weights)
    out = torch.tensor(total, dtype=torch.float32)
    if missing_eos_penalty:
        out = out - missing_eos_penalty * (~eos.cpu()).float()
    return out, {k: torch.tensor(v, dtype=torch.float32) for k, v in comps.items()}


def repeat_rows(values: Sequence[Any], g: int) -> list[Any]:
    """Each element repeated g times in place: [a, b] → [a, a, b, b] for g = 2."""
    return [v for v in values for _ in range(g)]


def make_rollout(samples: Samples, tokenizer, prompts: Sequence[Any], columns: dict[str, Sequence[Any]],
                 sources: dict[str, RewardSource], weights: Sequence[float] | None = None,
                 missing_eos_penalty: float = 0.0, gold_sources: dict[str, RewardSource] | None = None,
                 ref_fn: Callable[[Rollout], Tensor] | None = None,
                 value_fn: Callable[[Rollout], Tensor] | None = None,
                 timer: Callable[[str], Any] | None = None) -> Rollout:
    """Decode and score `samples` of the prompts (one row per prompt, or G consecutive rows per prompt) and add
    the reference log-probabilities and critic values when `ref_fn` / `value_fn` (rollout → (B, C)) are given.

    ``timer(name)`` is an optional context-manager factory; this function reports "scoring" (decoding and the
    reward sources) and "reference" (the reference and critic forwards) through it."""
    import contextlib

    timer = timer or (lambda name: contextlib.nullcontext())
    b = samples.completion_ids.shape[0]
    if b % len(prompts):
        raise ValueError(f"{b} completions for {len(prompts)} prompts")
    g = b // len(prompts)
    r = Rollout(prompt_ids=samples.prompt_ids, prompt_mask=samples.prompt_mask,
                completion_ids=samples.completion_ids, completion_mask=samples.completion_mask,
                logprobs=samples.logprobs, eos=samples.eos, prompts=repeat_rows(prompts, g),
                columns={k: repeat_rows(v, g) for k, v in columns.items()}, group_size=g)
    with timer("scoring"):
        r.texts = decode_completions(tokenizer, r.completion_ids, r.completion_mask)
        device = r.completion_ids.device
        rewards, comps = score(r.prompts, r.texts, r.columns, r.eos, sources, weights, missing_eos_penalty)
        r.rewards, r.reward_components = rewards.to(device), {k: v.to(device) for k, v in comps.items()}
        if gold_sources:
            _, gold = score(r.prompts, r.texts, r.columns, r.eos, gold_sources)
            r.gold_rewards = {k: v.to(device) for k, v in gold.items()}
    with timer("reference"):
        if ref_fn is not None:
            r.ref_logprobs = ref_fn(r)
        if value_fn is not None:
            r.values = value_fn(r)
    return r
