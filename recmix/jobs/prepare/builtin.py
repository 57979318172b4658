"""The built-in feature schema shared by the MovieLens-100K and synthetic sources.

Id conventions (docs/data.md): user and item ids start at 1, so id 0 is free for padding in sequences;
every other categorical uses the ids [0, vocab_size).
"""

from __future__ import annotations

from recmix.platform.specs.data import FeatureSchema, ItemNeighbors

EMBEDDING_DIM = 16
N_GENRES = 19
N_OCCUPATIONS = 21
AGE_BUCKETS = 10          # age // 10, ages 0..99
ZIP_BUCKETS = 1000        # zip[:3] hashed by the model into this many buckets
RATING_VOCAB = 6          # ratings 1..5, 0 free for padding
# Time gap from a history entry to the row, floor(log2(seconds)) clipped to 0..GAP_BUCKETS-1 (2^25 s ~ 1 year).
GAP_BUCKETS = 26
# year // 5 mapped to 1..YEAR_BUCKETS-1 from 1900 (earlier years clip to 1, later to the last); 0 = unknown.
YEAR_BASE = 1900 // 5
YEAR_BUCKETS = 26


def year_bucket(year):
    """Release year -> bucket id; `year` is a float array with NaN for unknown."""
    import numpy as np

    y = np.asarray(year, dtype=np.float64)
    b = np.clip(np.floor(np.nan_to_num(y, nan=0.0) / 5) - YEAR_BASE + 1, 1, YEAR_BUCKETS - 1).astype(np.int64)
    return np.where(np.isnan(y), 0, b)


def gap_bucket(seconds):
    """Seconds (>= 1) between a history entry and its row -> bucket id in [0, GAP_BUCKETS)."""
    import numpy as np

    s = np.maximum(np.asarray(seconds, dtype=np.int64), 1)
    return np.minimum(np.floor(np.log2(s)).astype(np.int64), GAP_BUCKETS - 1)


# [choice] defaults of the history's position-aware tokens, chosen on ml-100k valid (docs/models.md): items paired
# with their rating and time gap, pooled and target-attention tokens, and the item-neighbourhood token (similarities
# fitted from the training split, summed per history rating).
HISTORY_TOKENS = {"attributes": ["hist_ratings", "hist_gaps"], "target": "item_id",
                  "neighbors": {"attribute": "hist_ratings", "user": "user_id"}}
# [choice] neighbours per item: 256 where the (folds + 1) x items x k tables stay within NEIGHBOR_BUDGET entries
# (32 MiB: int32 ids + float32 similarities; ml-100k's 1,682 items), else the spec's 64. In the logistic-regression
# probe on ml-100k valid, k 64 / 128 / 256 / all gave 0.7433 / 0.7439 / 0.7444 / 0.7446 (docs/log.md); the
# tables ride in every checkpoint and artifact, so the larger k is kept for catalogues where it is cheap.
NEIGHBOR_K, NEIGHBOR_BUDGET = 256, 1 << 22


def history_tokens(n_items: int) -> dict:
    nb = HISTORY_TOKENS["neighbors"]
    folds = ItemNeighbors.model_fields["folds"].default
    if (folds + 1) * (n_items + 1) * NEIGHBOR_K <= NEIGHBOR_BUDGET:
        nb = {**nb, "k": NEIGHBOR_K}
    return {**HISTORY_TOKENS, "neighbors": nb}


def builtin_schema(n_users: int, n_items: int, history_len: int, user_dropout: float = 0.0) -> FeatureSchema:
    """Groups user/history (user side) and item/context (candidate side), label `label`. The history's
    items carry their ratings and time-gap buckets as aligned attributes (`tokens`); `user_dropout` is
    user_id's `train_dropout` (a source whose evaluation users are mostly unseen in training sets it)."""
    d = EMBEDDING_DIM

    def cat(name, role, group, vocab=None, buckets=None, **kw):
        return {"name": name, "role": role, "type": "categorical", "vocab_size": vocab, "hash_buckets": buckets,
                "embedding_dim": d, "group": group, **kw}

    return FeatureSchema.model_validate({
        "groups": [
            {"name": "user", "side": "user"},
            {"name": "history", "side": "user"},
            {"name": "item", "side": "candidate"},
            {"name": "context", "side": "candidate"},
        ],
        "features": [
            cat("user_id", "user", "user", vocab=n_users + 1, train_dropout=user_dropout),
            cat("age_bucket", "user", "user", vocab=AGE_BUCKETS),
            cat("gender", "user", "user", vocab=2),
            cat("occupation", "user", "user", vocab=N_OCCUPATIONS),
            cat("zip_prefix", "user", "user", buckets=ZIP_BUCKETS),
            {"name": "hist_items", "role": "sequence", "type": "sequence", "vocab_size": n_items + 1,
             "embedding_dim": d, "table": "item_id", "group": "history", "max_len": history_len, "tokens": history_tokens(n_items)},
            {"name": "hist_ratings", "role": "sequence", "type": "sequence", "vocab_size": RATING_VOCAB,
             "embedding_dim": d, "group": "history", "max_len": history_len},
            {"name": "hist_gaps", "role": "sequence", "type": "sequence", "vocab_size": GAP_BUCKETS,
             "embedding_dim": d, "group": "history", "max_len": history_len},
            cat("item_id", "item", "item", vocab=n_items + 1),
            {"name": "genres", "role": "item", "type": "multi_categorical", "vocab_size": N_GENRES,
             "embedding_dim": d, "group": "item", "max_len": N_GENRES},
            cat("year_bucket", "item", "item", vocab=YEAR_BUCKETS),
            cat("hour", "context", "context", vocab=24),
            cat("weekday", "context", "context", vocab=7),
            {"name": "label", "role": "label", "type": "dense"},
        ],
    })
