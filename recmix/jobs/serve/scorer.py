"""One replica's ranking work, without Ray: encoded requests -> scores, with the UG-Sep user-state cache.

UG-Sep models (`ugsep` with user tokens): each request's user state comes from the cache or from
`encode_user` (the misses of a batch in one call), the states are stacked (`UserState.cat`) and every
candidate of every request is scored in one `score` call with its request's user index. Other models run
`forward` on the requests' rows concatenated. Scores are sigmoid probabilities of task 0 (the first label),
as `recmix score` computes them offline.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from recmix.models.ugsep import UserState

from .features import Encoded


class UserCache:
    """Bounded LRU with a TTL: key -> (one user's UserState, insertion time)."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._items: OrderedDict[tuple, tuple[UserState, float]] = OrderedDict()

    def get(self, key: tuple) -> Optional[UserState]:
        hit = self._items.get(key)
        if hit is None:
            return None
        if self.clock() - hit[1] > self.ttl_s:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return hit[0]

    def put(self, key: tuple, state: UserState) -> None:
        if self.size <= 0:
            return
        self._items[key] = (state, self.clock())
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Result:
    scores: list[float]
    cache_hit: Optional[bool]     # None: the model has no user path to cache
    user_ms: float
    candidates_ms: float
    batch_requests: int


class Scorer:
    def __init__(self, model, version: str, cache: UserCache):
        self.model, self.version, self.cache = model, version, cache
        self.device = next(model.parameters()).device   # encoded requests arrive on the CPU
        self.ugsep = getattr(model, "ug", None) is not None and getattr(model, "Tu", 0) > 0
        self.user_names: list[str] = list(model.user_names) if self.ugsep else []
        self.cand_names: list[str] = list(model.cand_names) if self.ugsep else []
        self.all_names: list[str] = [f.name for f in model.schema.inputs]

    def key(self, enc: Encoded) -> tuple:
        return (self.version, enc.user_id, enc.fingerprint(self.user_names))

    @torch.no_grad()
    def score_many(self, encs: list[Encoded]) -> list[Result]:
        if not self.ugsep:
            return self._forward(encs)
        t0 = time.perf_counter()
        keys = [self.key(e) for e in encs]
        states: list[Optional[UserState]] = [self.cache.get(k) for k in keys]
        hits = [s is not None for s in states]
        miss = [i for i, s in enumerate(states) if s is None]
        if miss:
            users = {n: torch.cat([encs[i].request[n] for i in miss]).to(self.device) for n in self.user_names}
            fresh = self.model.encode_user(users)
            for j, i in enumerate(miss):
                states[i] = fresh.take(torch.tensor([j]))
                self.cache.put(keys[i], states[i])
        state = UserState.cat(states)
        t1 = time.perf_counter()
        cands = self._rows(encs, self.cand_names)
        user_index = torch.repeat_interleave(torch.arange(len(encs)), torch.tensor([e.n_candidates for e in encs]))
        p = torch.sigmoid(self.model.score(state, cands, user_index.to(self.device)).logits_BK[:, 0].float())
        t2 = time.perf_counter()
        return self._split(encs, p, hits, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def _forward(self, encs: list[Encoded]) -> list[Result]:
        t0 = time.perf_counter()
        p = torch.sigmoid(self.model(self._rows(encs, self.all_names)).logits_BK[:, 0].float())
        return self._split(encs, p, [None] * len(encs), 0.0, (time.perf_counter() - t0) * 1e3)

    def _rows(self, encs: list[Encoded], names: list[str]) -> dict[str, torch.Tensor]:
        """The requests' rows of `names`, concatenated (one copy per feature; a single request's own tensors
        and request-level views are materialized once, by the cat or `contiguous`)."""
        if len(encs) == 1:
            return {n: encs[0].column(n).contiguous().to(self.device) for n in names}
        return {n: torch.cat([e.column(n) for e in encs]).to(self.device) for n in names}

    @staticmethod
    def _split(encs, p, hits, user_ms, cand_ms) -> list[Result]:
        out, lo = [], 0
        vals = p.cpu().tolist()
        for e, h in zip(encs, hits):
            out.append(Result(vals[lo:lo + e.n_candidates], h, user_ms, cand_ms, len(encs)))
            lo += e.n_candidates
        return out


def ranking(scores: list[float], top_k: Optional[int]) -> list[int]:
    """Candidate indices by descending score (ties: input order), the first top_k."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return (order[:top_k] if top_k else order).tolist()
