"""Metric code against hand-computed cases."""
import numpy as np
import pytest

from minimodel.evaluation.metrics import (correct, normalize_answer, qa_exact_match, qa_f1, qa_question_scores,
                                          retrieval_hits)
from minimodel.evaluation.tasks import BIBLE_PARTS, bible_part


@pytest.mark.parametrize("text, lang, expected", [
    ("The Quick, brown fox!", "en", "quick brown fox"),  # article, comma, "!" and case
    ("  an   apple  a day ", "en", "apple day"),
    ("«Théâtre» d'été", "en", "théâtre dété"),  # Unicode punctuation (category P*) is dropped, accents stay
    ("¿El perro de los vecinos?", "es", "perro de vecinos"),
    ("Der Hund und das Haus.", "de", "hund und haus"),
    ("the dog", "de", "the dog"),  # articles are per language
    ("Những cái bàn", "vi", "bàn"),
    ("الكتاب", "ar", "كتاب"),  # the official script drops every "ال"
    ("北京大学,2008年", "zh", "北 京 大 学 2008 年"),  # CJK characters split, punctuation dropped
    ("mtu wa kwanza", "sw", "mtu wa kwanza"),  # not an MLQA language: whitespace tokens, no articles
])
def test_mlqa_normalisation(text, lang, expected):
    assert normalize_answer(text, lang) == expected


def test_mlqa_exact_match_and_f1_hand_computed():
    assert qa_exact_match("the Eiffel Tower", "Eiffel tower.", "en") == 1.0
    assert qa_exact_match("Eiffel", "Eiffel Tower", "en") == 0.0
    # pred tokens {cat, sat, on, mat}, gold {cat, on, mat}: P = 3/4, R = 1, F1 = 6/7
    assert qa_f1("a cat sat on the mat", "The cat, on a mat", "en") == pytest.approx(6 / 7)
    # repeated tokens count with multiplicity: pred [on, on, on], gold [on]: P = 1/3, R = 1, F1 = 1/2
    assert qa_f1("on on on", "on", "en") == pytest.approx(0.5)
    assert qa_f1("the", "a", "en") == 0.0  # both normalise to nothing: no common token
    # Chinese is scored per character: pred 4 chars, gold 2, both in pred: P = 1/2, R = 1, F1 = 2/3
    assert qa_f1("北京大学", "北京", "zh") == pytest.approx(2 / 3)
    assert qa_f1("北京大学", "北京", "en") == 0.0  # as one whitespace token it does not match


def test_qa_scores_max_over_answers_and_unanswered():
    answers = {"q1": ["Paris", "the city of Paris"], "q2": ["1999"], "q3": ["red fox"]}
    predictions = {"q1": "city of Paris", "q3": "a fox"}  # q2 unanswered: scores 0
    scores = qa_question_scores(predictions, answers, "en")
    # q1: EM with the 2nd answer; q3: EM 0, F1 = 2 * (1/1 * 1/2) / (1 + 1/2) = 2/3; per question, in percent
    assert scores["exact_match"] == [100.0, 0.0, 0.0]
    assert scores["f1"] == pytest.approx([100.0, 0.0, 100 * 2 / 3])


def test_retrieval_hits_constructed_case():
    candidates = np.eye(4)
    queries = np.array([
        [1.0, 0.0, 0.0, 0.0],  # gold 0: rank 0
        [0.0, 0.5, 1.0, 0.0],  # gold 1: candidate 2 is closer -> rank 1
        [0.0, 0.0, 1.0, 0.1],  # gold 2: rank 0
        [0.9, 0.8, 0.7, 0.1],  # gold 3: last -> rank 3
    ])
    hits = retrieval_hits(queries, candidates, ks=(1, 2, 4))
    assert {k: h.tolist() for k, h in hits.items()} == {"top1": [1, 0, 1, 0], "top2": [1, 1, 1, 0], "top4": [1] * 4}
    # explicit gold indices; cosine ignores scale; a tie is not a hit
    assert retrieval_hits(3 * queries[[2, 0]], candidates, gold=[2, 1], ks=(1,))["top1"].tolist() == [1, 0]
    assert retrieval_hits(np.ones((2, 3)), np.ones((2, 3)), ks=(1,))["top1"].tolist() == [0, 0]


def test_accuracy_and_bible_parts():
    assert correct([1, 2, 0, 0], [1, 2, 1, 0]).tolist() == [1, 1, 0, 1]  # accuracy 0.75
    with pytest.raises(ValueError):
        correct([1], [1, 2])
    expected = {1: "law", 5: "law", 6: "history", 17: "history", 18: "wisdom", 22: "wisdom", 23: "prophets",
                39: "prophets", 40: "gospels", 43: "gospels", 44: "epistles", 65: "epistles", 66: "apocalypse"}
    assert {b: BIBLE_PARTS[bible_part(b)] for b in expected} == expected
    for bad in (0, 67):
        with pytest.raises(ValueError, match="outside 1-66"):
            bible_part(bad)


def test_majority_share_is_the_accuracy_of_the_most_frequent_label():
    from minimodel.evaluation.metrics import majority_share

    assert majority_share([2, 0, 2, 1, 2]) == 0.6
    assert correct([2] * 5, [2, 0, 2, 1, 2]).mean() == majority_share([2, 0, 2, 1, 2])
