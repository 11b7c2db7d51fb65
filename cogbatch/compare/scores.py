"""How far two answers to the same request are apart: token sequences, texts, and next-token distributions.

Sequence and text scores are plain Python. The distribution scores (`ReferenceDist`, `teacher_forced`)
take torch tensors: the reference side's log-probabilities at the positions of its own greedy tokens
are kept on the host between the two model loads, and the other side's are scored against them.

Keeping all V log-probabilities of every position would hold 65 MB per CogVLM2 answer of 128 tokens
(a vocabulary of 128,256), gigabytes for a sample of a few dozen images, so by default the reference
keeps its `k` most likely tokens and the log of the probability left over (the tail). The KL is then
taken between the two distributions with the tail merged into one outcome: by the log-sum inequality
that is never more than the full KL, and equal to it when both sides spread the tail alike. With
`k=None` every log-probability is kept and the KL is exact.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CHRF_ORDER = 6  # character n-grams up to 6, as sacrebleu's chrF
CHRF_BETA = 2  # recall weighs twice as much as precision, as sacrebleu's chrF
_WORD = re.compile(r"[^\W_]+")


# -- token sequences -------------------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens the two sequences share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The position where two greedy paths fork (one ending early counts), None when they are the same."""
    n = common_prefix(a, b)
    return None if n == len(a) == len(b) else n


def prefix_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions, of the longer sequence, that agree before the first divergence (1.0: identical).

    After a fork the two paths continue from different text, so positions past it are not compared.
    """
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else common_prefix(a, b) / longest


# -- texts -----------------------------------------------------------------------------------------


def chrf(hypothesis: str, reference: str, order: int = CHRF_ORDER, beta: float = CHRF_BETA) -> float:
    """Sentence chrF (0-100) as sacrebleu's `CHRF().sentence_score(hypothesis, [reference])`.

    Character n-grams (n = 1..6) with whitespace removed; precision and recall are averaged over the
    orders that both texts have, then combined as F-beta (beta 2). One difference: two identical texts
    score 100 even when empty (sacrebleu gives 0 for a pair of empty strings).
    """
    if hypothesis == reference:
        return 100.0
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precision = recall = 0.0
    effective = 0
    for n in range(1, order + 1):
        h = Counter(hyp[i : i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i : i + n] for i in range(len(ref) - n + 1))
        if not h or not r:  # an order one text is too short for does not count
            continue
        match = sum(min(c, r[g]) for g, c in h.items() if g in r)
        precision += match / sum(h.values())
        recall += match / sum(r.values())
        effective += 1
    if not effective or precision + recall == 0:
        return 0.0
    precision, recall = precision / effective, recall / effective
    f = beta * beta
    return 100 * (1 + f) * precision * recall / (f * precision + recall)


def words(text: str) -> list[str]:
    """Lowercased runs of letters and digits: rouge-score's tokens for English text, other scripts kept."""
    return _WORD.findall(text.lower())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 (0-1): the longest common subsequence of words over both lengths (symmetric).

    As rouge-score's `RougeScorer(["rougeL"])` without stemming on ASCII text; rouge-score drops
    letters outside a-z (a French or Chinese caption loses its words), these words keep them. Two
    identical texts score 1 even when they have no words.
    """
    if a == b:
        return 1.0
    x, y = words(a), words(b)
    if not x or not y:
        return 0.0
    lcs = _lcs(x, y)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(y), lcs / len(x)
    return 2 * precision * recall / (precision + recall)


def _lcs(x: list[str], y: list[str]) -> int:
    """Length of the longest common subsequence (one row of the table at a time)."""
    row = [0] * (len(y) + 1)
    for xi in x:
        prev_diag = 0
        for j, yj in enumerate(y, 1):
            keep = row[j]
            row[j] = prev_diag + 1 if xi == yj else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


# -- next-token distributions (teacher forcing) ----------------------------------------------------


@dataclass
class ReferenceDist:
    """The reference side's next-token distributions at T positions, kept on the host.

    `ids` None: `logprobs` holds all V log-probabilities (T, V). Else `ids` (T, k) are the k most
    likely tokens, `logprobs` (T, k) theirs and `tail` (T,) the log of the probability of all others.
    """

    top1: Any  # (T,) argmax token per position
    logprobs: Any
    ids: Any = None
    tail: Any = None

    @property
    def positions(self) -> int:
        return int(self.top1.shape[0])

    def kept_mass(self) -> float:
        """Mean share of the probability the kept tokens hold (1.0 when every log-probability is kept)."""
        import torch

        if self.ids is None:
            return 1.0
        return float((1 - torch.exp(self.tail.double())).mean()) if self.positions else 1.0


@dataclass
class ForcedScore:
    """One answer of the reference, scored under the other model: sums over its T positions."""

    positions: int
    kl_sum: float  # nats
    top1_agree: int

    @property
    def kl(self) -> float | None:
        return self.kl_sum / self.positions if self.positions else None

    @property
    def top1(self) -> float | None:
        return self.top1_agree / self.positions if self.positions else None


def reference_dist(logits: Any, k: int | None) -> ReferenceDist:
    """What the reference keeps of its logits (T, V): the top `k` and the tail, or everything (k None or >= V)."""
    import torch

    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top1 = logprobs.argmax(-1)
    host = torch.device("cpu")
    if k is None or k >= logprobs.shape[-1]:
        return ReferenceDist(top1.to(host), logprobs.to(host))
    values, ids = logprobs.topk(k, dim=-1)
    tail = _tail_logmass(logprobs, ids)
    return ReferenceDist(top1.to(host), values.to(host), ids.to(host, torch.int32), tail.to(host))


def teacher_forced(ref: ReferenceDist, logits: Any) -> ForcedScore:
    """KL(reference || other) summed over the positions, and how often the two argmax tokens agree.

    `logits` (T, V) are the other model's at the same positions (the reference's tokens forced).
    Computed in float64 from both sides' float32 log-probabilities, so identical models give exactly 0.
    """
    import torch

    other = torch.log_softmax(logits.float(), dim=-1)
    agree = int((other.argmax(-1).cpu() == ref.top1).sum())
    if ref.ids is None:
        a = ref.logprobs.double()
        b = other.cpu().double()
        kl = (a.exp() * (a - b)).sum()
    else:
        ids = ref.ids.to(other.device, torch.long)
        b = other.gather(-1, ids).cpu().double()
        b_tail = _tail_logmass(other, ids).cpu().double()
        a, a_tail = ref.logprobs.double(), ref.tail.double()
        kept = (a.exp() * (a - b)).sum()
        tail = torch.where(torch.isinf(a_tail), torch.zeros_like(a_tail), a_tail.exp() * (a_tail - b_tail))
        kl = kept + tail.sum()
    return ForcedScore(ref.positions, max(0.0, float(kl)), agree)  # rounding may go a hair below 0


def _tail_logmass(logprobs: Any, ids: Any) -> Any:
    """log of the probability of every token but `ids`, per row (logsumexp of the rest, no 1 - sum)."""
    import torch

    rest = logprobs.scatter(-1, ids, float("-inf"))
    return torch.logsumexp(rest, dim=-1)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None
