"""The tests' own helpers: ``assert_same_predictions`` lets scores differ in their last bits, and
nothing else."""
import dataclasses
import json

import numpy as np
import pytest

from conftest import assert_same_predictions
from hw7qa.decode import Prediction

PREDICTIONS = [Prediction("雲南", 0.9078345894813538, 3, 10, 12), Prediction("1990年", -2.5, 7, 0, 5)]


def jsonl(predictions):
    return "".join(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in predictions)


def test_scores_summed_in_another_order_are_the_same_predictions():
    other = [dataclasses.replace(PREDICTIONS[0], score=0.907834529876709),
             dataclasses.replace(PREDICTIONS[1], score=float(np.nextafter(np.float32(-2.5), np.float32(0))))]
    assert other != PREDICTIONS
    assert_same_predictions(PREDICTIONS, other)
    assert_same_predictions(jsonl(PREDICTIONS), jsonl(other))


@pytest.mark.parametrize("change", [{"answer": "雲"}, {"window": 4}, {"char_end": 11}, {"score": 0.9079}])
def test_another_answer_window_span_or_score_is_not(change):
    other = [dataclasses.replace(PREDICTIONS[0], **change), PREDICTIONS[1]]
    with pytest.raises(AssertionError):
        assert_same_predictions(PREDICTIONS, other)
    with pytest.raises(AssertionError):
        assert_same_predictions(jsonl(PREDICTIONS), jsonl(other))


def test_a_missing_prediction_is_not():
    with pytest.raises(AssertionError):
        assert_same_predictions(PREDICTIONS, PREDICTIONS[:1])
