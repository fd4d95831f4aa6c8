"""Seeded, exactly resumable samplers of row positions over a `RowIndex`.

A sampler yields one GLOBAL stream of index positions: every rank computes the same stream and
keeps its own slice of each global batch (`split_global_batch`), so the data seen by one optimizer
step depends neither on the world size nor on gradient accumulation. Every random choice is drawn
from a generator seeded with (seed, stream, epoch or block), never from a running generator, so the
stream is a pure function of the seed and the draw position: `state_dict()` after k draws, loaded
into a fresh sampler, continues exactly as the uninterrupted stream does (on the same numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from wmtp.data.index import TOKEN_LENGTH_MAX, RowIndex

UNIFORM_BLOCK = 4096
"""Uniform draws are generated in seeded blocks of this many positions."""

# Stream keys: independent random streams of one seed.
_CORRECT_STREAM = 0
_INCORRECT_STREAM = 1
_PAIR_ORDER_STREAM = 2
_BIN_CHOICE_STREAM = 3
_BIN_STREAM_BASE = 16  # bin j of the curriculum uses stream _BIN_STREAM_BASE + j


class _EpochStream:
    """An endless stream of rows: epoch e is the first `epoch_len` rows of a seeded shuffle of `pool`."""

    def __init__(self, pool: np.ndarray, key: tuple[int, ...], epoch_len: int | None = None) -> None:
        self.pool, self.key = pool, key
        self.epoch_len = len(pool) if epoch_len is None else epoch_len
        self._epoch = -1
        self._order = pool[:0]

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # consecutive calls mostly stay in one epoch: keep its order
            self._order = np.random.default_rng([*self.key, epoch]).permutation(self.pool)[: self.epoch_len]
            self._epoch = epoch
        return self._order

    def take(self, start: int, count: int) -> np.ndarray:
        """Stream elements start .. start+count-1."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            epoch, within = divmod(start + filled, self.epoch_len)
            n = min(count - filled, self.epoch_len - within)
            out[filled : filled + n] = self._order_of(epoch)[within : within + n]
            filled += n
        return out


def _uniforms(key: tuple[int, ...], start: int, count: int) -> np.ndarray:
    """Uniform [0, 1) draws for positions start .. start+count-1, each fixed by (key, position)."""
    if count <= 0:
        return np.empty(0)
    first, last = start // UNIFORM_BLOCK, (start + count - 1) // UNIFORM_BLOCK
    blocks = [np.random.default_rng([*key, b]).random(UNIFORM_BLOCK) for b in range(first, last + 1)]
    offset = start - first * UNIFORM_BLOCK
    return np.concatenate(blocks)[offset : offset + count]


def fits_max_seq_len(index: RowIndex, max_seq_len: int) -> np.ndarray:
    """Rows of at most `max_seq_len` tokens (a saturated stored length never fits)."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be >= 2 (BOS and EOS), got {max_seq_len}")
    lengths = index.rows["token_length"]
    return (lengths <= max_seq_len) & (lengths < TOKEN_LENGTH_MAX)


class _Sampler:
    """Position bookkeeping and checkpoint state shared by the samplers."""

    name = ""

    def __init__(self, index: RowIndex, *, seed: int, max_seq_len: int) -> None:
        if seed < 0:
            raise ValueError(f"sampler seed must be >= 0, got {seed}")
        self.index, self.seed, self.max_seq_len = index, seed, max_seq_len
        self.position = 0
        # Rows this sampler would draw from but excludes for having more than max_seq_len tokens.
        self.too_long = 0

    def _empty_pool_error(self, what: str) -> ValueError:
        return ValueError(f"no {what} with <= {self.max_seq_len} tokens in {self.index.path}")

    def _pool_sizes(self) -> list[int]:
        raise NotImplementedError

    def next_ids(self, count: int) -> np.ndarray:
        """The next `count` index positions of the global stream."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        ids = self._draw(self.position, count)
        self.position += count
        return ids

    def _draw(self, start: int, count: int) -> np.ndarray:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.name, "seed": self.seed, "pool_sizes": self._pool_sizes(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"sampler": self.name, "seed": self.seed, "pool_sizes": self._pool_sizes()}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(
                    f"sampler state has {key}={state.get(key)!r} but this sampler has {value!r}: "
                    f"it was saved for other data or settings ({self.index.path})"
                )
        self.position = int(state["position"])


class CorrectOnlySampler(_Sampler):
    """Shuffled epochs over the correct rows that fit in max_seq_len."""

    name = "correct_only"

    def __init__(self, index: RowIndex, *, seed: int, max_seq_len: int) -> None:
        super().__init__(index, seed=seed, max_seq_len=max_seq_len)
        correct, fits = index.rows["is_correct"].astype(bool), fits_max_seq_len(index, max_seq_len)
        self.too_long = int(np.count_nonzero(correct & ~fits))
        pool = np.flatnonzero(correct & fits)
        if not len(pool):
            raise self._empty_pool_error("correct rows")
        self._stream = _EpochStream(pool, (seed, _CORRECT_STREAM))

    def _pool_sizes(self) -> list[int]:
        return [len(self._stream.pool)]

    def _draw(self, start: int, count: int) -> np.ndarray:
        return self._stream.take(start, count)


class BalancedSampler(_Sampler):
    """50/50 correct/incorrect: every even-aligned pair of the stream holds one row of each.

    An epoch has 2 * min(#correct, #incorrect) draws: that many rows of each class, each class
    reshuffled every epoch (so the larger class is covered across epochs); which of the two
    comes first in a pair is random.
    """

    name = "balanced"

    def __init__(self, index: RowIndex, *, seed: int, max_seq_len: int) -> None:
        super().__init__(index, seed=seed, max_seq_len=max_seq_len)
        correct, fits = index.rows["is_correct"].astype(bool), fits_max_seq_len(index, max_seq_len)
        self.too_long = int(np.count_nonzero(~fits))
        pools = {"correct": np.flatnonzero(correct & fits), "incorrect": np.flatnonzero(~correct & fits)}
        for what, pool in pools.items():
            if not len(pool):
                raise self._empty_pool_error(f"{what} rows")
        pairs_per_epoch = min(len(p) for p in pools.values())
        self._correct = _EpochStream(pools["correct"], (seed, _CORRECT_STREAM), pairs_per_epoch)
        self._incorrect = _EpochStream(pools["incorrect"], (seed, _INCORRECT_STREAM), pairs_per_epoch)

    def _pool_sizes(self) -> list[int]:
        return [len(self._correct.pool), len(self._incorrect.pool)]

    def _draw(self, start: int, count: int) -> np.ndarray:
        if count == 0:
            return np.empty(0, dtype=np.int64)
        first_pair, end_pair = start // 2, (start + count - 1) // 2 + 1
        n = end_pair - first_pair
        correct = self._correct.take(first_pair, n)
        incorrect = self._incorrect.take(first_pair, n)
        incorrect_first = _uniforms((self.seed, _PAIR_ORDER_STREAM), first_pair, n) < 0.5
        pairs = np.stack(
            [np.where(incorrect_first, incorrect, correct), np.where(incorrect_first, correct, incorrect)], axis=1
        ).reshape(-1)
        skip = start - 2 * first_pair
        return pairs[skip : skip + count]


class CurriculumSampler(_Sampler):
    """Difficulty curriculum over all rows (correct and incorrect) that fit in max_seq_len.

    Bin i holds bin_edges[i] <= difficulty < bin_edges[i+1] (the first bin also takes difficulties
    below bin_edges[0], the last has no upper edge). `schedule` is [(progress, [w_0, w_1, ...]), ...]
    with increasing progress points in [0, 1]; the weights at progress = draws so far /
    total_samples (clamped to 1) are interpolated linearly between points (constant outside them)
    and renormalised over the non-empty bins. Each draw picks a bin with a uniform fixed by (seed,
    draw position), then takes the next row of that bin's own shuffled epoch stream.
    """

    name = "curriculum"

    def __init__(
        self,
        index: RowIndex,
        *,
        seed: int,
        max_seq_len: int,
        bin_edges: Sequence[int],
        schedule: Sequence[tuple[float, Sequence[float]]],
        total_samples: int,
    ) -> None:
        super().__init__(index, seed=seed, max_seq_len=max_seq_len)
        edges = np.asarray(bin_edges, dtype=np.int64)
        if edges.ndim != 1 or not len(edges) or np.any(np.diff(edges) <= 0):
            raise ValueError(f"curriculum bin_edges must be a non-empty increasing list, got {list(bin_edges)}")
        if total_samples < 1:
            raise ValueError(f"curriculum total_samples must be >= 1, got {total_samples}")
        self.total_samples = total_samples
        self._points, self._weights = _check_schedule(schedule, len(edges))

        fits = fits_max_seq_len(index, max_seq_len)
        self.too_long = int(np.count_nonzero(~fits))
        bins = np.maximum(np.searchsorted(edges, index.rows["difficulty"], side="right") - 1, 0)
        pools = [np.flatnonzero(fits & (bins == j)) for j in range(len(edges))]
        self._nonempty = np.array([len(p) > 0 for p in pools])
        if not self._nonempty.any():
            raise self._empty_pool_error("rows")
        for point, weights in zip(self._points, self._weights):
            if not np.any(weights[self._nonempty] > 0):
                raise ValueError(
                    f"curriculum schedule at progress {point} gives no weight to any non-empty difficulty bin "
                    f"(non-empty bins: {np.flatnonzero(self._nonempty).tolist()}, edges {edges.tolist()}, "
                    f"{index.path})"
                )
        self._streams = [_EpochStream(p, (seed, _BIN_STREAM_BASE + j)) for j, p in enumerate(pools)]
        self._bin_draws = [0] * len(pools)

    def bin_weights(self, progress: np.ndarray | float) -> np.ndarray:
        """Normalised bin weights [..., n_bins] at `progress` (empty bins get 0)."""
        progress = np.clip(np.asarray(progress, dtype=np.float64), 0.0, 1.0)
        w = (
            np.stack(
                [np.interp(progress, self._points, self._weights[:, j]) for j in range(len(self._streams))], axis=-1
            )
            * self._nonempty
        )
        return w / w.sum(axis=-1, keepdims=True)

    def _pool_sizes(self) -> list[int]:
        return [len(s.pool) for s in self._streams]

    def _draw(self, start: int, count: int) -> np.ndarray:
        positions = start + np.arange(count, dtype=np.int64)
        weights = self.bin_weights(positions / self.total_samples)
        u = _uniforms((self.seed, _BIN_CHOICE_STREAM), start, count)
        # The bin is the first whose cumulative weight exceeds u, so zero-weight bins are never
        # chosen; the cap guards against a cumulative sum that rounds to just below 1.
        last_weighted = weights.shape[-1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=-1)
        chosen = np.minimum(np.sum(np.cumsum(weights, axis=-1) <= u[:, None], axis=-1), last_weighted)
        ids = np.empty(count, dtype=np.int64)
        for j, stream in enumerate(self._streams):
            where = np.flatnonzero(chosen == j)
            ids[where] = stream.take(self._bin_draws[j], len(where))
            self._bin_draws[j] += len(where)
        return ids

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bin_draws": list(self._bin_draws)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._bin_draws = [int(n) for n in state["bin_draws"]]


def _check_schedule(schedule: Sequence[tuple[float, Sequence[float]]], n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(progress points [P], weights [P, n_bins]) of a validated curriculum schedule."""
    if not schedule:
        raise ValueError("curriculum schedule is empty")
    points = np.array([float(p) for p, _ in schedule])
    weights = []
    for point, w in schedule:
        if len(w) != n_bins:
            raise ValueError(f"curriculum schedule at progress {point} has {len(w)} weights for {n_bins} bins")
        weights.append([float(x) for x in w])
    weights_arr = np.array(weights)
    if np.any((points < 0) | (points > 1)) or np.any(np.diff(points) <= 0):
        raise ValueError(f"curriculum schedule progress points must increase within [0, 1], got {points.tolist()}")
    if not np.all(np.isfinite(weights_arr)) or np.any(weights_arr < 0):
        raise ValueError(f"curriculum schedule weights must be finite and >= 0, got {weights}")
    return points, weights_arr


def split_global_batch(
    ids: np.ndarray, *, rank: int, world_size: int, micro_batch_size: int, grad_accum: int
) -> list[np.ndarray]:
    """This rank's `grad_accum` micro-batches: its contiguous slice of the global batch, in order."""
    for name, value in (("world_size", world_size), ("micro_batch_size", micro_batch_size), ("grad_accum", grad_accum)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per_rank = micro_batch_size * grad_accum
    if len(ids) != per_rank * world_size:
        raise ValueError(
            f"global batch has {len(ids)} ids, expected micro_batch_size x grad_accum x world_size "
            f"= {micro_batch_size} x {grad_accum} x {world_size} = {per_rank * world_size}"
        )
    mine = np.asarray(ids)[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(grad_accum)]
