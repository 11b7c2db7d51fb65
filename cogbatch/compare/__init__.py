"""`cogbatch compare`: how much a job's quantization changes its answers, measured on the job's own images.

- scores.py: the scores (token agreement, chrF, ROUGE-L, teacher-forced KL and top-1), torch-light.
- groups.py: the layer groups of `--per-layer`, named by quantization-rule globs; the advice.
- run.py: sampling the images, the two sides one after the other, teacher forcing.
- report.py: `CompareReport` (to_dict / describe) and the Parquet pairs file.
"""

from cogbatch.compare.report import CompareReport, GroupKL, Pair, SideStats
from cogbatch.compare.run import DEFAULT_TOPK, compare

__all__ = ["DEFAULT_TOPK", "CompareReport", "GroupKL", "Pair", "SideStats", "compare"]
