"""Exact match as Kaggle grades HW7, and character-level F1."""
from __future__ import annotations

from collections import Counter


def normalize(text: str) -> str:
    """What Kaggle compares: the answer with commas removed (result.csv cannot hold them)."""
    return text.replace(",", "")


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize(prediction) == normalize(gold))


def char_f1(prediction: str, gold: str) -> float:
    """F1 over the multiset of characters (commas and whitespace ignored), as in DRCD/CMRC scoring."""
    pred = [c for c in normalize(prediction) if not c.isspace()]
    ref = [c for c in normalize(gold) if not c.isspace()]
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(predictions: list[str], golds: list[str]) -> dict[str, float]:
    """Mean exact match and character F1 over paired predictions and gold answers."""
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold answers")
    return {"em": sum(map(exact_match, predictions, golds)) / len(golds),
            "f1": sum(map(char_f1, predictions, golds)) / len(golds)}
