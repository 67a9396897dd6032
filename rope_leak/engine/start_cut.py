"""What the start cut needs from each forward pass: window masses and a count-free profile.

The causal mask creates absolute position only because the sequence *starts*: with an
infinite past, query ``i``'s normaliser would not depend on ``i``. The completed split
(:mod:`rope_leak.fits.start_cut`) puts the missing past back from the head's own
count-free offset profile. Per head, from the scores the ``hook_attn_scores`` hook sees
(already causally masked):

* the reference window ``R_i = {max(1, i - w + 1), ..., i}`` (the last ``w`` keys, never
  key 0, the sink; queries ``i < w`` use their ``i`` non-sink keys);
* ``log rho_i = LSE_{j in R_i} s_ij - LSE_{j <= i} s_ij``, the log of the visible mass in
  the window, **kept per prompt** (``[prompt, layer, head, n]``): the fit needs it with a
  profile taken from the *other* prompt buckets, which is known only after the pass;
* the profile sums ``sum_{i >= w} Ã_{i, i-d}`` over keys ``i - d >= 1``, with the count-free
  pattern ``Ã_ij = exp(s_ij - LSE_{j' in R_i} s_ij')``, per prompt bucket (``n`` numbers
  per head and bucket);
* the sufficient statistics of ``log A`` (``X^T y``, sum of squares) on the start cut's
  own pairs: the run's pairs restricted to queries ``w <= i <= n - 2`` (:func:`start_cut_spec`).
  Early queries are left out: their window holds fewer than ``w`` keys, and both the
  noise in so small a window and a sink's displacement of the key at offset ``i`` would
  be amplified by the large past imputed to them. The last query is left out because it
  alone sees a key (key 0) beyond the longest offset the profile measures.

A per-query shift of the scores moves both log-sum-exps by the same amount, so every
number here is unchanged by it. On CPU with float32 scores the fused kernel of
:mod:`rope_leak.engine.accumulate` makes all of it in the pass that reads each score row
for ``log Z`` (the same rows as :func:`start_cut_rows`, its log-pattern sums by the formula
of :func:`log_pattern_sums`); elsewhere :func:`start_cut_rows` costs
two log-sum-exps and one pass over the scored cells per head and prompt, on the model's
device.
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from rope_leak.engine.diagonals import lower_diagonal_sums
from rope_leak.engine.pairs import PairDesign, start_cut_spec
from rope_leak.engine.statistics import StartCutStatistics

DEFAULT_WINDOW = 32
"""Default reference window ``w`` (keys)."""

#: at most this many score elements are worked on at once (bounds the temporaries)
CHUNK_ELEMENTS = 1 << 24


def check_window(window: int, n_tokens: int) -> None:
    """Refuse a window the profile cannot be measured with."""
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"the start-cut window must be an integer >= 1, got {window!r}. "
                         "Fix: pass --window 32 (the default) or another positive size.")
    if n_tokens < window + 2:
        raise ValueError(
            f"the start-cut window of {window} keys needs prompts of at least {window + 2} tokens "
            f"(the profile is measured on queries i >= w); got n = {n_tokens}. Fix: use longer "
            f"prompts or a smaller window (--window {max(1, n_tokens - 2)}).")


def window_log_mass(scores: Float[Tensor, "... n n"], window: int) -> Float[Tensor, "... n"]:
    """``LSE_{j in R_i} s_ij`` with ``R_i = {max(1, i - w + 1), ..., i}``; ``-inf`` for row 0.

    Reads the ``w`` keys of each row through a strided view of the flat scores, padded in
    front with ``w - 1`` entries: row ``i``, slot ``k`` is key ``j = i - (w - 1) + k``;
    slots with ``j < 1`` are masked explicitly."""
    n = scores.shape[-1]
    lead = scores.shape[:-2]
    flat = scores.reshape(-1, n * n)
    padded = torch.nn.functional.pad(flat, (window - 1, 0), value=float("-inf"))
    view = padded.as_strided((flat.shape[0], n, window), (padded.stride(0), n + 1, 1))
    key = torch.arange(n, device=scores.device)[:, None] - (window - 1) + torch.arange(window, device=scores.device)
    picked = torch.where(key >= 1, view, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
    return torch.logsumexp(picked, dim=-1).reshape(*lead, n)


def start_cut_rows(
    scores: Float[Tensor, "batch head n n"], window: int, design: PairDesign | None = None,
    log_z: Float[Tensor, "batch head n"] | None = None,
) -> tuple[Float[Tensor, "batch head n"], Float[Tensor, "batch head n"],
           Float[Tensor, "batch head column"] | None, Float[Tensor, "batch head"] | None]:
    """``(log rho, profile sums, X^T log A, sum of (log A)^2)`` of one layer's causally
    masked scores; the last two over ``design``'s cells (None without a design).
    ``log_z``: the rows' ``log Z_i`` when the caller has them (the accumulator computes
    them in the same pass), else computed here.

    ``profile[..., d] = sum_{i >= w, i - d >= 1} exp(s_{i, i-d} - LSE_{R_i} s_i)``. ``log A =
    s - log Z_i`` is the scores plus a part constant along each row, so its sums come from
    the masked scores' sums and ``row_xty`` of ``-log Z`` (no copy of ``log A`` is made).
    Worked in chunks of prompts x heads so that no temporary exceeds
    :data:`CHUNK_ELEMENTS` elements."""
    B, H, n, _ = scores.shape
    f64 = dict(dtype=torch.float64, device=scores.device)
    log_rho, profile = torch.empty((B * H, n), **f64), torch.empty((B * H, n), **f64)
    xty = sumsq = cells = None
    if design is not None:
        xty, sumsq = torch.empty((B * H, design.n_columns), **f64), torch.empty(B * H, **f64)
        j = np.arange(n)
        cells = torch.as_tensor((j[None, :] >= design.key_start[:, None]) & (j[None, :] <= j[:, None]),
                                device=scores.device)
    flat = scores.reshape(B * H, n, n)
    flat_log_z = None if log_z is None else log_z.reshape(B * H, n).to(scores.dtype)
    step = max(1, CHUNK_ELEMENTS // (n * n))
    for start in range(0, B * H, step):
        rows = slice(start, start + step)
        chunk = flat[rows]
        lse_window = window_log_mass(chunk, window)
        log_z = torch.logsumexp(chunk, dim=-1) if flat_log_z is None else flat_log_z[rows]
        log_rho[rows] = (lse_window - log_z).double()
        # the profile: queries i >= w only, keys j >= 1 only (the sink stays out)
        count_free = torch.zeros_like(chunk)
        torch.exp(chunk[:, window:] - lse_window[:, window:, None], out=count_free[:, window:])
        count_free[..., 0] = 0.0
        profile[rows] = lower_diagonal_sums(count_free).double()
        del count_free
        if design is not None:
            masked = torch.where(cells, chunk, torch.zeros((), dtype=chunk.dtype, device=chunk.device))
            xty[rows], sumsq[rows] = log_pattern_sums(
                design, lower_diagonal_sums(masked).double(), masked.sum(-1).double(), masked.sum(-2).double(),
                (masked * masked).sum((-2, -1)).double(), log_z)
    log_rho[:, 0] = float("-inf")  # row 0 has no non-sink key
    shape = lambda t: None if t is None else t.reshape(B, H, *t.shape[1:])  # noqa: E731
    return shape(log_rho), shape(profile), shape(xty), shape(sumsq)


def log_pattern_sums(
    design: PairDesign, diag: Float[Tensor, "... n"], row: Float[Tensor, "... n"], col: Float[Tensor, "... n"],
    sumsq: Float[Tensor, "..."], log_z: Float[Tensor, "... n"],
) -> tuple[Float[Tensor, "... column"], Float[Tensor, "..."]]:
    """``(X^T log A, sum of (log A)^2)`` over ``design``'s cells, from the scores' diagonal,
    column and squared sums over its rows, their row sums (rows outside ``design`` are
    ignored) and ``log Z``: ``log A = s - log Z_i`` is the scores plus a row part."""
    index = design.index(row.device)
    row_count = index["row_count"]
    row = row * (row_count > 0)
    neg_log_z = -log_z.double()
    xty = design.columns(diag, row, col) + design.row_xty(neg_log_z)
    return xty, sumsq + 2 * (neg_log_z * row).sum(-1) + (neg_log_z * neg_log_z * row_count).sum(-1)


def profile_counts(n_tokens: int, window: int) -> np.ndarray:
    """``[n]``: queries ``i >= w`` that have a key ``j = i - d >= 1``, per offset ``d``
    (``n - max(w, d + 1)``, 0 from ``d = n - 1`` on)."""
    d = np.arange(n_tokens)
    return np.clip(n_tokens - np.maximum(window, d + 1), 0, None).astype(float)


class StartCutAccumulator:
    """Accumulates :class:`StartCutStatistics` layer by layer, on the model's device."""

    def __init__(self, design: PairDesign, n_layers: int, n_heads: int, n_buckets: int, window: int,
                 device: torch.device | str = "cpu") -> None:
        n_tokens = design.n_tokens
        check_window(window, n_tokens)
        self.window, self.n_buckets = int(window), n_buckets
        self.spec = design.spec
        self.design = PairDesign(start_cut_spec(design.spec, window, n_tokens), n_tokens)
        self.shape = (n_layers, n_heads, n_tokens)
        self.device = device
        f64 = dict(dtype=torch.float64, device=device)
        self.profile_sum = torch.zeros((n_buckets,) + self.shape, **f64)
        self.xty = torch.zeros((n_buckets, n_layers, n_heads, self.design.n_columns), **f64)
        self.sumsq = torch.zeros((n_buckets, n_layers, n_heads), **f64)
        self.count = torch.zeros(n_buckets, dtype=torch.long, device=device)
        self._log_rho: list[Tensor] = []  # one [batch, layer, head, n] block per batch
        self._prompt_ids: list[Tensor] = []
        self._batch: Tensor | None = None

    def begin_batch(self, batch_size: int) -> None:
        self._batch = torch.full((batch_size,) + self.shape, float("nan"), dtype=torch.float64,
                                 device=self.device)

    def add_layer(self, layer: int, scores: Float[Tensor, "batch head n n"],
                  prompt_ids: Int[Tensor, " batch"], log_z: Float[Tensor, "batch head n"] | None = None,
                  rows: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> None:
        """``log_z``: the rows' log-denominators, when the caller already has them;
        ``rows``: :func:`start_cut_rows`' outputs, when the caller's pass made them."""
        if rows is None:
            rows = start_cut_rows(scores, self.window, self.design, log_z)
        log_rho, profile, xty, sumsq = rows
        self._batch[:, layer] = log_rho
        buckets = prompt_ids.to(self.profile_sum.device) % self.n_buckets
        self.profile_sum[:, layer].index_add_(0, buckets, profile)
        self.xty[:, layer].index_add_(0, buckets, xty)
        self.sumsq[:, layer].index_add_(0, buckets, sumsq)

    def end_batch(self, prompt_ids: Int[Tensor, " batch"]) -> None:
        self._log_rho.append(self._batch)
        self._prompt_ids.append(prompt_ids.detach().long())  # stays on the device until the end
        buckets = prompt_ids.to(self.count.device) % self.n_buckets
        self.count.index_add_(0, buckets, torch.ones_like(buckets))
        self._batch = None

    def state(self) -> dict[str, Tensor]:
        """The running sums and rows (for checkpoints)."""
        empty = torch.zeros((0,) + self.shape, dtype=torch.float64)
        return {"profile_sum": self.profile_sum, "log_pattern_xty": self.xty,
                "log_pattern_sumsq": self.sumsq, "log_pattern_count": self.count,
                "log_rho": torch.cat(self._log_rho) if self._log_rho else empty,
                "prompt_ids": torch.cat(self._prompt_ids) if self._prompt_ids
                else torch.zeros(0, dtype=torch.long, device=self.device)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name, tensor in (("profile_sum", self.profile_sum), ("log_pattern_xty", self.xty),
                             ("log_pattern_sumsq", self.sumsq), ("log_pattern_count", self.count)):
            tensor.copy_(torch.from_numpy(np.asarray(state[name])))
        self._log_rho = [torch.as_tensor(np.asarray(state["log_rho"]), device=self.device)]
        self._prompt_ids = [torch.as_tensor(np.asarray(state["prompt_ids"]), dtype=torch.long, device=self.device)]

    def to_statistics(self) -> StartCutStatistics:
        state = {k: v.cpu().numpy() for k, v in self.state().items()}
        return StartCutStatistics.from_arrays(self.window, self.n_buckets, self.spec, state)
