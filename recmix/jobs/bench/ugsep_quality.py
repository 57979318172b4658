"""`recmix bench ugsep_quality`: UG-Sep vs TokenMixer-Large test AUC on ml-100k (3 seeds, paired bootstrap).

All four models share T = 8 per-side chunked tokens, D = 32, L = 2 and the global token, so the only
difference is the mask: the baseline has no user tokens (user_tokens 0, the unmasked blocks), UG-Sep 1:1
has 4 user tokens, 3:1 has 6, with and without Information Compensation. Same protocol as
`recmix bench quality` and the same parameters (early stopping on valid AUC, test scored once; `--set dataset=URI`
switches to a synthetic dataset with planted interactions).
"""

from __future__ import annotations

from recmix.jobs.bench.quality import compare
from recmix.platform.bench import BenchReport
from recmix.platform.specs.bench import QualityParams

_BASE = dict(arch="tokenmixer_large", tokenizer="chunk_per_token", global_token="mlp", n_tokens=8, d_model=32,
             n_layers=2, ffn_mult=2.0)
MODELS: dict[str, dict] = {
    "tml_baseline": {**_BASE, "ugsep": {"user_tokens": 0}},
    "ugsep_1_1": {**_BASE, "ugsep": {"user_tokens": "1:1"}},
    "ugsep_3_1_ic": {**_BASE, "ugsep": {"user_tokens": "3:1"}},
    "ugsep_3_1_no_ic": {**_BASE, "ugsep": {"user_tokens": "3:1", "ic_mode": "none"}},
}
PAIRS = [("ugsep_1_1", "tml_baseline"), ("ugsep_3_1_ic", "tml_baseline"), ("ugsep_3_1_ic", "ugsep_3_1_no_ic")]


def run(quick: bool, params: QualityParams) -> BenchReport:
    return compare(MODELS, PAIRS, quick, params, "UG-Sep quality: test split, mean ± std over seeds")
