"""Each score on hand-made sequences whose values are known (worked out by hand, or sacrebleu / rouge-score)."""

from __future__ import annotations

import math

import pytest
import torch

from cogbatch.compare.scores import (
    chrf,
    common_prefix,
    first_divergence,
    prefix_agreement,
    reference_dist,
    rouge_l,
    teacher_forced,
    words,
)


@pytest.mark.parametrize(
    ("a", "b", "prefix", "fork", "agreement"),
    [
        ([5, 6, 7, 8], [5, 6, 7, 8], 4, None, 1.0),  # identical
        ([5, 6, 7, 8], [5, 6, 9, 8], 2, 2, 0.5),  # fork at position 2; the 8s after it do not count
        ([5, 6], [5, 6, 7], 2, 2, 2 / 3),  # one stops early: a fork at its end
        ([1], [2], 0, 0, 0.0),
        ([], [], 0, None, 1.0),  # two empty answers agree
        ([], [3, 4], 0, 0, 0.0),
    ],
)
def test_token_agreement(a, b, prefix, fork, agreement):
    assert common_prefix(a, b) == prefix
    assert first_divergence(a, b) == fork
    assert prefix_agreement(a, b) == pytest.approx(agreement)


@pytest.mark.parametrize(
    ("reference", "hypothesis", "expected"),
    [
        # By hand. "ab" / "abc": 1-grams P 2/3 R 1, 2-grams P 1/2 R 1, no 3-gram in the reference so order 3
        # does not count: P 7/12, R 1, F2 = 5 * 7/12 / (4 * 7/12 + 1) = 35/40.
        ("ab", "abc", 87.5),
        # "abcd" / "acbd" (spaces removed): every 1-gram matches, no longer n-gram: P = R = 1/4 -> 25.
        ("a b c d", "a c b d", 25.0),
        ("A cat sits on the mat.", "A cat sits on the mat.", 100.0),
        # sacrebleu 2.6.0, CHRF().sentence_score(hypothesis, [reference]).score
        ("A red car parked on the street.", "A red car parked near the street.", 78.57752927672344),
        ("The dog runs.", "A cat sleeps on a sofa.", 6.720430107526883),
        ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps over the lazy fox",
         79.32415353727023),
        ("Un café, s il vous plaît", "Un cafe, s il vous plait", 66.08836224548298),
        ("x", "", 0.0),
        ("", "", 100.0),  # identical: 100 (sacrebleu gives 0 for two empty strings)
    ],
)
def test_chrf(reference, hypothesis, expected):
    assert chrf(hypothesis, reference) == pytest.approx(expected, abs=1e-9)


def test_chrf_weighs_recall_over_precision():
    # "abcd" vs "ab": the short hypothesis is all precision, the long one all recall; beta 2 favours recall.
    assert chrf("abcd", "ab") > chrf("ab", "abcd")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        # rouge-score 0.1.2, RougeScorer(["rougeL"]).score(a, b)["rougeL"].fmeasure
        ("A red car parked on the street.", "A red car parked near the street.", 0.8571428571428571),
        ("a b c d", "a c b d", 0.75),  # LCS 3 of 4 words each way
        ("The quick brown fox jumps over the lazy dog", "The quick brown dog jumps over the lazy fox", 7 / 9),
        ("The dog runs.", "A cat sleeps on a sofa.", 0.0),
        # By hand: LCS "the cat" of 3 / 4 words: P 2/3, R 2/4 (a is the target), F1 = 4/7
        ("the cat sat down", "THE black cat", 4 / 7),
        # Words keep letters outside a-z: un, s, il, vous agree, café/cafe and plaît/plait do not: 4/6
        # (rouge-score drops é and î and gives 0.615).
        ("Un café, s il vous plaît", "Un cafe, s il vous plait", 2 / 3),
        ("", "", 1.0),
        ("...", "", 0.0),
    ],
)
def test_rouge_l(a, b, expected):
    assert rouge_l(a, b) == pytest.approx(expected)
    assert rouge_l(b, a) == pytest.approx(expected)  # F1 is symmetric


def test_words_are_lowercased_alphanumeric_runs():
    assert words("It's 2 o'clock_now, Zoë!") == ["it", "s", "2", "o", "clock", "now", "zoë"]


def _logits(*rows):
    """Logits whose softmax is each row of probabilities."""
    return torch.log(torch.tensor(rows, dtype=torch.float32))


def test_teacher_forced_kl_and_top1_by_hand():
    # Position 0: a = (1/2, 1/4, 1/4), b = (1/4, 1/2, 1/4): KL = 1/2 ln 2 + 1/4 ln 1/2 = ln(2)/4; argmaxes differ.
    # Position 1: the same distribution on both sides: KL 0, argmaxes agree.
    a = _logits([0.5, 0.25, 0.25], [0.125, 0.75, 0.125])
    b = _logits([0.25, 0.5, 0.25], [0.125, 0.75, 0.125])
    score = teacher_forced(reference_dist(a, None), b)
    assert score.positions == 2 and score.top1_agree == 1 and score.top1 == 0.5
    assert score.kl_sum == pytest.approx(math.log(2) / 4, rel=1e-6)
    assert score.kl == pytest.approx(math.log(2) / 8, rel=1e-6)


def test_teacher_forced_topk_merges_the_tail_into_one_outcome():
    # k = 1 at position 0: a keeps token 0 (1/2) and a tail of 1/2; b has 1/4 there and 3/4 elsewhere:
    # KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3), below the full KL (ln(2)/4): a lower bound.
    a = _logits([0.5, 0.25, 0.25])
    b = _logits([0.25, 0.5, 0.25])
    ref = reference_dist(a, 1)
    assert ref.ids.tolist() == [[0]] and ref.kept_mass() == pytest.approx(0.5)
    score = teacher_forced(ref, b)
    assert score.kl_sum == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert score.kl_sum < teacher_forced(reference_dist(a, None), b).kl_sum
    assert reference_dist(a, 3).ids is None  # k >= V keeps everything


@pytest.mark.parametrize("k", [None, 2, 5])
def test_identical_models_give_exactly_zero_and_full_agreement(k):
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    score = teacher_forced(reference_dist(logits, k), logits.clone())
    assert score.kl_sum == 0.0 and score.top1_agree == 7


def test_top1_compares_argmaxes_even_with_ties():
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])  # argmax picks index 1 on both sides
    assert teacher_forced(reference_dist(tied, 2), tied.clone()).top1_agree == 1
