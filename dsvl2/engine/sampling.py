"""Choosing the next token: sampling options, small pure logits processors, one batched sampler.

Dimensions: B rows (one per request in the batch), V vocabulary entries (the width of the
LM head: 129280 for the released models, more than the tokenizer holds), N candidates
left in a row after filtering.

The processors run in the order of transformers' ``generate``:
repetition penalty -> temperature -> top-k -> top-p -> draw. Each is a pure function of
``[B, V]`` float32 logits and one value per row, returning new logits in which removed
tokens are ``-inf``; they are the unit-tested building blocks of ``sample_next``.

Notable choices

* Repetition penalty is applied whenever it is != 1.0, greedy rows included, which is what
  HF ``generate`` does. The official serve code (``serve/inference.py``) only passes it
  when sampling, so with temperature 0 and a penalty its greedy output differs from ours;
  a caller who wants that behaviour sets ``repetition_penalty=1.0`` for greedy requests.
* Tokens already seen (prompt + output) are a ``[B, V]`` bool mask, built once per request
  with ``seen_mask`` and updated in place with ``mark_seen``: the penalty is then one
  elementwise pass (2 MB of mask for B=16, V=129280), with no gather/scatter of id lists.
* top-k keeps every token tied with the k-th largest logit (like HF's ``TopKLogitsWarper``).
* top-p keeps the smallest set of most likely tokens whose probability sums to at least
  ``top_p`` (tokens tied with the last one kept are kept too; the most likely token always
  is). Cumulative sums are taken in float64 with a 1e-6 tolerance, so that a boundary
  written exactly (probabilities 0.5, 0.3, ... with top_p 0.8) does not flip on float32
  rounding. It works on the ``topk`` of a row, widened only when those candidates hold
  less than ``top_p`` of the mass: a full sort of V=129280 costs ~15 ms a row on a CPU.
* Every row has its own ``torch.Generator`` and the draw is made row by row with one
  uniform number per step (inverse CDF over the row's candidates, in index order), so a
  row's tokens depend on its logits, options and seed only, never on the other rows: a
  request is reproducible in a batched server.
* Greedy rows take ``argmax``: the first index on ties, NaN logits never chosen. A
  temperature below ``GREEDY_BELOW`` (1e-5, vLLM's threshold) is greedy: dividing by it
  in float32 would overflow to +inf or, below ~1e-45, round the temperature to 0.
* Degenerate rows never crash the draw: NaN logits are removed like -inf, and when some
  kept logits are +inf (a tiny repetition penalty, a broken checkpoint) those tokens
  share all the mass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..errors import GenerationError

__all__ = [
    "SamplingParams",
    "make_generator",
    "seen_mask",
    "mark_seen",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "draw",
    "sample_next",
]

# Most alternatives a request may ask for with each token's log-probability (OpenAI's limit).
MAX_TOP_LOGPROBS = 20
# Cumulative probabilities within this of top_p count as having reached it (see docstring).
_TOP_P_TOLERANCE = 1e-6
# Temperatures below this are greedy (see the module docstring).
GREEDY_BELOW = 1e-5
# Candidate counts tried by apply_top_p before falling back to the whole vocabulary.
_TOP_P_CANDIDATES = (64, 1024, 8192)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops.

    temperature: 0 means greedy (argmax), as does anything below 1e-5; otherwise logits
        are divided by it.
    top_p: nucleus sampling mass in (0, 1]; 1 keeps every token.
    top_k: keep the k most likely tokens; 0 keeps every token.
    repetition_penalty: > 0; 1 is off. Seen tokens' logits are divided by it when
        positive and multiplied by it when negative (applied in greedy mode too).
    max_new_tokens: how many tokens at most to generate (>= 1).
    seed: seeds the request's own generator; None draws a nondeterministic seed.
    stop: strings that end the generation (not included in the output).
    stop_token_ids: ids that end the generation (in addition to the tokenizer's eos).
    logprobs: None (off), or how many of the most likely alternatives (0..20) to report
        with each generated token's log-probability; the model's own distribution (a
        log-softmax of its logits before penalties, temperature and any guide's mask).
    guide: a ``guided.Guide`` (JSON schema, regex, choices, grammar) the output must
        follow: tokens that cannot continue a valid output are masked before sampling.

    Values are checked on construction (``validate``); lists given for ``stop`` and
    ``stop_token_ids`` are stored as tuples, and a single string as a one-string tuple.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    guide: object | None = None

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if isinstance(stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self) -> None:
        """Raise ``GenerationError`` naming the first bad value and the allowed range."""

        def bad(name: str, allowed: str):
            raise GenerationError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

        if not (_is_real(self.temperature) and self.temperature >= 0):
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            bad("top_p", "a number with 0 < top_p <= 1")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            bad("top_k", "an integer >= 0 (0 = off)")
        if not (_is_real(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            bad("max_new_tokens", "an integer >= 1")
        if not (self.seed is None or _is_int(self.seed)):
            bad("seed", "an integer or None")
        if not (isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop)):
            bad("stop", "a tuple of non-empty strings")
        if not (isinstance(self.stop_token_ids, tuple)
                and all(_is_int(i) and i >= 0 for i in self.stop_token_ids)):
            bad("stop_token_ids", "a tuple of integers >= 0")
        if not (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS)):
            bad("logprobs", f"None (off) or an integer from 0 to {MAX_TOP_LOGPROBS} (alternatives per token)")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator of its own for one request: seeded with ``seed``, or nondeterministically if None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        # manual_seed takes any Python int but wraps negatives/huge values; keep it in range.
        gen.manual_seed(seed % (1 << 64))
    return gen


# --------------------------------------------------------------------------- seen tokens


def seen_mask(ids_per_row: Sequence[Sequence[int] | torch.Tensor], vocab_size: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B, V]`` bool mask with True at every id each row has seen (prompt + output so far)."""
    mask = torch.zeros(len(ids_per_row), vocab_size, dtype=torch.bool, device=device)  # [B, V]
    for row, ids in enumerate(ids_per_row):
        ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
        if ids.numel():
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise GenerationError(f"seen ids of row {row} must lie in [0, {vocab_size}), "
                                      f"got {int(ids.min())}..{int(ids.max())}")
            mask[row, ids] = True
    return mask


def mark_seen(mask: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Mark one new id per row (``[B]``) in the ``[B, V]`` mask, in place; returns the mask."""
    mask.scatter_(1, next_ids.reshape(-1, 1).to(device=mask.device, dtype=torch.long), True)
    return mask


# --------------------------------------------------------------------------- processors


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Penalise seen tokens: negative logits are multiplied by the row's penalty, others divided.

    logits ``[B, V]``, seen ``[B, V]`` bool, penalty ``[B]`` (1.0 leaves a row unchanged).
    """
    # Only the seen entries are touched: a few thousand of B*V, 4x faster than a dense where.
    rows, cols = seen.nonzero(as_tuple=True)  # [S] each
    pen = penalty.to(device=logits.device, dtype=logits.dtype)[rows]  # [S]
    vals = logits[rows, cols]  # [S]
    out = logits.clone()
    out[rows, cols] = torch.where(vals < 0, vals * pen, vals / pen)
    return out


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature ``[B]``; rows with temperature 0 (greedy) are left as they are."""
    t = temperature.to(device=logits.device, dtype=logits.dtype)
    t = torch.where(t > 0, t, torch.ones_like(t)).unsqueeze(1)  # [B, 1]
    return logits / t


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep, in each row, the tokens whose logit is >= the row's k-th largest (``top_k [B]``, 0 = off)."""
    V = logits.shape[-1]
    k = top_k.to(device=logits.device, dtype=torch.long)
    active = (k > 0) & (k < V)  # [B]
    if not bool(active.any()):
        return logits
    kmax = int(k[active].max())
    top = logits.topk(kmax, dim=-1).values  # [B, kmax], descending
    kth = top.gather(1, (k.clamp(1, kmax) - 1).unsqueeze(1))  # [B, 1]
    remove = (logits < kth) & active.unsqueeze(1)  # [B, V]
    return logits.masked_fill(remove, float("-inf"))


def _top_p_threshold(vals: torch.Tensor, log_total: torch.Tensor, top_p: torch.Tensor):
    """For rows of candidate logits sorted descending (``[b, K]``), the logit of the last token
    that top-p keeps, and whether the candidates held enough mass to decide (``[b]`` each)."""
    probs = torch.exp(vals.double() - log_total.double().unsqueeze(1))  # [b, K], of the whole row
    cum = probs.cumsum(-1)
    target = top_p.double().unsqueeze(1) - _TOP_P_TOLERANCE  # [b, 1]
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # mass of the tokens ahead
    n_keep = (before < target).sum(-1).clamp(min=1)  # [b]; the first token is always kept
    decided = (cum[:, -1:] >= target).squeeze(1) | torch.isinf(vals[:, -1])
    return vals.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1), decided


def _logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim without denormals: ``torch.logsumexp`` on a peaked row
    (most exp() results below 1e-38) runs ~20x slower on a CPU. Terms below e^-80 are
    counted as e^-80, which moves the total by at most V * 1e-35."""
    m = x.max(dim=-1, keepdim=True).values  # [b, 1]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m.squeeze(-1) + (x - m).clamp_(min=-80.0).exp_().sum(dim=-1).log()


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to
    >= the row's ``top_p`` (``[B]``, 1.0 = off), ties with its last token included."""
    V = logits.shape[-1]
    p = top_p.to(device=logits.device)
    pending = (p < 1.0).nonzero().squeeze(1)  # rows still to decide
    if pending.numel() == 0:
        return logits
    # Row by row: a reduction over a [b, V] block may split rows across threads differently
    # from a lone row, and a row's result must not depend on the rest of the batch.
    log_total = torch.stack([_logsumexp(logits[i]) for i in pending.tolist()])  # [b]
    threshold = torch.full((logits.shape[0],), float("-inf"), dtype=logits.dtype, device=logits.device)
    for K in (*[c for c in _TOP_P_CANDIDATES if c < V], V):
        vals = logits[pending].topk(K, dim=-1).values  # [b, K], descending
        thr, decided = _top_p_threshold(vals, log_total, p[pending])
        if K == V:
            decided = torch.ones_like(decided)
        threshold[pending[decided]] = thr[decided]
        pending, log_total = pending[~decided], log_total[~decided]
        if pending.numel() == 0:
            break
    remove = logits < threshold.unsqueeze(1)  # [B, V]; rows that are off keep everything (> -inf)
    return logits.masked_fill(remove, float("-inf"))


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    """Sample one id from a row of logits (``[V]``, removed tokens ``-inf``) with one uniform number.

    Inverse CDF over the kept tokens in index order, in float64: the result depends only on
    the row and the generator's state (None: torch's global generator).
    """
    ids = (logits > float("-inf")).nonzero().squeeze(1)  # [N]; NaN compares False: removed too
    if ids.numel() == 0:
        raise GenerationError("every token of a row was removed (its logits are all -inf or NaN)")
    vals = logits[ids].double()
    top = vals == float("inf")
    if bool(top.any()):  # softmax would give NaN: the +inf tokens take all the mass, equally
        ids, vals = ids[top], torch.zeros(int(top.sum()), dtype=torch.float64, device=logits.device)
    probs = torch.softmax(vals, dim=0)  # [N]
    cum = probs.cumsum(0)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=logits.device)
    pos = int(torch.searchsorted(cum, (u * cum[-1]).reshape(1), right=True))
    if pos >= ids.numel():  # u * total rounded up to total: take the last token with mass
        pos = int((probs > 0).nonzero()[-1])
    return int(ids[pos])


# --------------------------------------------------------------------------- the sampler


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row [B, V] with NaN taken as -inf (first index on ties). torch's
    argmax takes NaN as the largest value, so a row whose argmax is not NaN has none and
    its argmax is the answer; only rows with a NaN pay for a cleaned copy."""
    ids = logits.argmax(dim=-1)
    if bool(logits.gather(1, ids[:, None]).isnan().any()):
        ids = logits.nan_to_num(float("-inf"), float("inf"), float("-inf")).argmax(dim=-1)
    return ids


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: torch.Tensor | Sequence[Sequence[int] | torch.Tensor] | None = None,
) -> torch.Tensor:
    """Choose the next token of every row.

    logits ``[B, V]`` (cast to float32); ``params`` and ``generators`` one per row (a greedy
    row's generator is not used and may be None); ``seen`` the ``[B, V]`` bool mask of ids in
    each row's prompt + output (or a list of id sequences, turned into one), needed only when
    a row has a repetition penalty != 1. Returns the ids, ``[B]`` long.
    """
    if logits.dim() != 2:
        raise GenerationError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise GenerationError(f"need one SamplingParams and one generator per row: B={B}, "
                              f"got {len(params)} params and {len(generators)} generators")
    logits = logits.float()  # [B, V]
    dev = logits.device
    if all(sp.is_greedy and sp.repetition_penalty == 1.0 for sp in params):
        return _greedy(logits)  # every row greedy (the default): no masks, no copies

    penalty = torch.tensor([sp.repetition_penalty for sp in params], dtype=torch.float32, device=dev)
    if bool((penalty != 1.0).any()):
        if seen is None:
            raise GenerationError("a repetition_penalty != 1 needs the seen ids (prompt + output) of each row")
        if not isinstance(seen, torch.Tensor):
            seen = seen_mask(seen, V, device=dev)
        if seen.shape != (B, V) or seen.dtype != torch.bool:
            raise GenerationError(f"seen must be a [B, V] = [{B}, {V}] bool mask, "
                                  f"got {seen.dtype} {tuple(seen.shape)}")
        logits = apply_repetition_penalty(logits, seen.to(dev), penalty)

    out = torch.empty(B, dtype=torch.long, device=dev)
    greedy = torch.tensor([sp.is_greedy for sp in params], device=dev)
    if bool(greedy.any()):
        out[greedy] = _greedy(logits[greedy])

    rows = [i for i, sp in enumerate(params) if not sp.is_greedy]
    if rows:
        sp_rows = [params[i] for i in rows]
        x = logits[rows]  # [b, V]
        x = apply_temperature(x, torch.tensor([sp.temperature for sp in sp_rows], device=dev))
        x = apply_top_k(x, torch.tensor([min(sp.top_k, V) for sp in sp_rows], device=dev))  # k >= V: off
        x = apply_top_p(x, torch.tensor([sp.top_p for sp in sp_rows], dtype=torch.float64, device=dev))
        for j, i in enumerate(rows):
            out[i] = draw(x[j], generators[i])
    return out
