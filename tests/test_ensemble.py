"""Ensembles: logits averaged for members with the same windows, a character-level vote otherwise;
and the window logits cached in the run folder."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import transformers

from conftest import SAMPLE
from hw7qa.__main__ import main
from hw7qa.data import QAData, Question, load_qa_file
from hw7qa.decode import balance_quotes, decode_predictions
from hw7qa.decode import combine_at_characters, ensemble_predictions, softmax, span_scores
from hw7qa.config import demo_config
from hw7qa.config import run_config
from conftest import run_logits
from hw7qa.train import train


def span_probabilities(enc, windows, logits):
    """Per question, ``{(char_start, char_end): probability}``: the softmax of its ``span_scores``."""
    return [softmax(found) for found in span_scores(enc, windows, logits)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs: a and b share tokenizer and windows (different seeds); c has other windows
    (digits split, shorter windows)."""
    root = tmp_path_factory.mktemp("runs")
    knobs = {"epochs": 4, "keep_checkpoints": 0, "test_file": ""}
    return {name: train(demo_config(str(root / name), {**knobs, **extra})) for name, extra in (
        ("a", {}), ("b", {"seed": 1}), ("c", {"isolate_digits": True, "max_length": 96, "doc_stride": 32}))}


@pytest.fixture(scope="module")
def dev():
    return load_qa_file(SAMPLE / "hw7_dev.json", need_answers=True)


def member(run_dir, data):
    return run_logits(run_dir, run_config(run_dir), data)


def test_two_identical_members_give_the_members_answers(runs, dev):
    a = member(runs["a"], dev)
    alone = [p.answer for p in decode_predictions(*a)]
    for method in ("auto", "chars"):
        predictions, how = ensemble_predictions([a, a], method=method)
        assert [p.answer for p in predictions] == alone, method
    assert "averaged" in ensemble_predictions([a, a])[1] and "character" in ensemble_predictions([a, a], method="chars")[1]


def test_same_windows_average_logits_window_by_window(runs, dev):
    a, b = member(runs["a"], dev), member(runs["b"], dev)
    predictions, how = ensemble_predictions([a, b])
    assert how.startswith("logits averaged") and "(#1+#2)" in how
    enc, windows = a[0], a[1]
    mean = [((sa + sb) / 2, (ea + eb) / 2) for (sa, ea), (sb, eb) in zip(a[2], b[2])]
    assert predictions == decode_predictions(enc, windows, mean)
    assert [p.answer for p in predictions] != [p.answer for p in decode_predictions(*a)]  # it did change something


def test_different_tokenizers_vote_at_the_character_level(runs, dev):
    a, c = member(runs["a"], dev), member(runs["c"], dev)
    assert len(a[1]) != len(c[1])                                     # windows do not line up
    predictions, how = ensemble_predictions([a, c, a])                # a twice: weight 2 against 1
    assert how.startswith("character-level vote of 2 groups") and "(#1+#3) + (#2)" in how
    pa, pc = span_probabilities(*a), span_probabilities(*c)
    for qi, (prediction, question) in enumerate(zip(predictions, dev.questions)):
        combined = {span: (2 * pa[qi].get(span, 0) + pc[qi].get(span, 0)) / 3 for span in {**pa[qi], **pc[qi]}}
        best = max(combined, key=combined.get)
        assert prediction.score == pytest.approx(combined[best])
        start, end = balance_quotes(dev.paragraph(question), *best)
        assert (prediction.char_start, prediction.char_end) == (start, end)
        assert prediction.answer == dev.paragraph(question)[start:end] != ""
    for probabilities in pa:
        assert sum(probabilities.values()) == pytest.approx(1.0)


def test_character_vote_weighs_groups_by_their_members():
    data = QAData("hand", [Question(0, "問?", 0)], ["甲乙丙丁戊"])
    enc = SimpleNamespace(data=data)
    x, y = (0, 2), (2, 4)
    first = [{x: 0.7, y: 0.3}]
    second = [{y: 0.8, x: 0.2}]
    fallback = ["unused"]
    assert combine_at_characters(enc, [first, second], [1, 1], fallback)[0].answer == "丙丁"   # 0.55 for y
    assert combine_at_characters(enc, [first, second], [2, 1], fallback)[0].answer == "甲乙"   # 0.53 for x
    assert combine_at_characters(enc, [[{}], [{}]], [1, 1], fallback) == ["unused"]


def test_cli_ensemble_dev_and_test_and_logits_are_reused(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ens"
    assert main(["ensemble", str(runs["a"]), str(runs["c"]), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "#1" in printed and "#2" in printed and "character-level" in printed
    assert len((out / "dev_predictions.jsonl").read_text(encoding="utf-8").splitlines()) == 13
    # every member's logits are now saved: no model is loaded again, and the answers are the same
    assert list((runs["c"] / "logits").glob("*.npz"))
    before = (out / "dev_predictions.jsonl").read_text(encoding="utf-8")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded although its logits were saved")
    monkeypatch.setattr(transformers.AutoModelForQuestionAnswering, "from_pretrained", no_loading)
    assert main(["ensemble", str(runs["a"]), str(runs["c"]), "--output-dir", str(out)]) == 0
    assert (out / "dev_predictions.jsonl").read_text(encoding="utf-8") == before
    monkeypatch.undo()

    assert main(["ensemble", str(runs["a"]), str(runs["b"]), "--split", "test", "--output-dir", str(out)]) == 2
    assert "no test file" in capsys.readouterr().err                  # these runs were trained without one
    assert main(["ensemble", str(runs["a"]), str(runs["b"]), "--split", "test", "--output-dir", str(out),
                 "--file", str(SAMPLE / "hw7_test.json")]) == 0
    lines = (out / "result.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "ID,Answer" and len(lines) == 14
    assert main(["ensemble", str(runs["a"])]) == 2


def test_saved_logits_are_not_reused_for_other_windows_or_a_new_model(runs, dev, tmp_path):
    cfg = run_config(runs["b"])
    first = run_logits(runs["b"], cfg, dev)[2]
    n_files = len(list((runs["b"] / "logits").glob("*.npz")))
    other = run_logits(runs["b"], run_config(runs["b"], ["doc_stride=16"]), dev)[1]
    assert len(list((runs["b"] / "logits").glob("*.npz"))) == n_files + 1 and len(other) > len(first)
    again = run_logits(runs["b"], cfg, dev)[2]
    assert all(np.array_equal(s1, s2) and np.array_equal(e1, e2) for (s1, e1), (s2, e2) in zip(first, again))
    # another model in the same folder (as a resumed run saves a better one) gets new logits
    shutil.copytree(runs["a"] / "model", runs["b"] / "model", dirs_exist_ok=True)
    retrained = run_logits(runs["b"], cfg, dev)[2]
    assert not all(np.array_equal(s1, s2) for (s1, _), (s2, _) in zip(first, retrained))


def test_tta_strides_vote_one_models_windows_of_each_stride(runs, dev, tmp_path, capsys):
    from hw7qa.inference import evaluate_run, predict_test
    run = runs["a"]
    plain_scores, plain = evaluate_run(run)
    assert evaluate_run(run, overrides=["tta_strides=48"])[1] == plain          # doc_stride again: nothing to vote
    cached = set((run / "logits").glob("*.npz"))
    scores, voted = evaluate_run(run, overrides=["tta_strides=24,36"])
    assert len(set((run / "logits").glob("*.npz")) - cached) == 2                # one cached set per extra stride
    members = [run_logits(run, run_config(run, [f"doc_stride={s}"]), dev) for s in (48, 24, 36)]
    assert len(members[0][1]) < len(members[2][1]) < len(members[1][1])        # smaller strides: more windows
    expected, _ = ensemble_predictions(members, run_config(run).decoding, method="chars")
    assert voted == expected and scores["em"] == np.mean([p.answer == q.answer_text for p, q in zip(voted, dev.questions)])
    csv = predict_test(run, str(SAMPLE / "hw7_test.json"), str(tmp_path / "r.csv"), ["tta_strides=24"])
    assert csv.read_text(encoding="utf-8").startswith("ID,Answer")
