"""Shared fixtures: the bundled sample data, tiny tokenizers built here, ../shared where it exists."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from hw7qa.data import load_qa_file
from hw7qa.tiny import build_tiny_tokenizer
from hw7qa.models import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SHARED = Path(os.environ.get("HW7QA_SHARED", ROOT.parent / "shared"))
STAND_IN = Path(os.environ.get("HW7QA_STAND_IN", Path.home() / ".cache/stand-in/multilingual-e5-small"))


# Float results computed in another order (other batch splits, process counts, thread counts)
# differ in their last bits: 0.907834529876709 against 0.9078345894813538 for one dev score.
FLOAT_TOLERANCE = {"rel": 1e-5, "abs": 1e-5}


def prediction_records(predictions) -> list[dict]:
    """``predictions`` as a list of dicts: the text of a ``.jsonl`` file (``dev_predictions.jsonl``),
    or a list of dicts or dataclasses (``Prediction``)."""
    if isinstance(predictions, str):
        return [json.loads(line) for line in predictions.splitlines()]
    return [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(p) for p in predictions]


def assert_same_predictions(a, b) -> None:
    """``a`` and ``b`` (see ``prediction_records``), computed in different orders, are the same
    predictions: every field but the floats equal (answers, windows, spans), the floats (scores, sums
    of logits; EM and F1, which follow from the answers) within ``FLOAT_TOLERANCE``. Bit-identical
    results are promised only for a resumed run against an uninterrupted one on the same machine
    and process count, and for a cache read back: compare those exactly."""
    a, b = prediction_records(a), prediction_records(b)
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        floats = {k for k, v in x.items() if isinstance(v, float)}
        assert x.keys() == y.keys() and {k: x[k] for k in x.keys() - floats} == {k: y[k] for k in y.keys() - floats}, \
            (i, x, y)
        assert {k: y[k] for k in floats} == pytest.approx({k: x[k] for k in floats}, **FLOAT_TOLERANCE), (i, x, y)


def run_logits(run_dir, cfg, data):
    """``(enc, windows, logits)`` of a run's model on ``data`` at ``cfg``'s doc_stride, through the
    logits cache (``inference.stride_logits``)."""
    from hw7qa.inference import open_run, stride_logits
    return stride_logits(open_run(run_dir, cfg), data, [cfg.doc_stride])[0]


@dataclasses.dataclass(frozen=True)
class Window:
    """One row of a ``windows.Windows`` table as an object, for tests that read windows one by one."""
    question_index: int         # index into enc.data.questions
    token_start: int            # first paragraph token in the window
    token_end: int              # one past the last paragraph token
    context_start: int          # position of paragraph token ``token_start`` in input_ids
    input_ids: list[int]
    token_type_ids: list[int] | None
    start_position: int | None = None   # training label (position in input_ids)
    end_position: int | None = None

    def char_span(self, enc, position_start: int, position_end: int) -> tuple[int, int]:
        """Characters ``[start, end)`` of the paragraph covered by window positions start..end (inclusive)."""
        offsets = enc.paragraph_offsets[enc.data.questions[self.question_index].paragraph_id]
        return (offsets[self.token_start + position_start - self.context_start][0],
                offsets[self.token_start + position_end - self.context_start][1])


def window_rows(windows) -> list[Window]:
    """Every row of ``windows`` (a ``Windows`` table) as a ``Window``."""
    rows = []
    for i, (first, n) in enumerate(zip(windows.first.tolist(), windows.length.tolist())):
        labels = (None, None) if windows.start_position is None else (
            int(windows.start_position[i]), int(windows.end_position[i]))
        rows.append(Window(int(windows.question_index[i]), int(windows.token_start[i]), int(windows.token_end[i]),
                           int(windows.context_start[i]), windows.ids[first:first + n].tolist(),
                           None if windows.type_ids is None else windows.type_ids[first:first + n].tolist(), *labels))
    return rows


def features(windows: list[Window], with_labels: bool = False) -> list[dict]:
    """Model inputs of each window as dicts for ``DataCollatorWithPadding`` (unpadded)."""
    out = []
    for w in windows:
        f = {"input_ids": w.input_ids, "attention_mask": [1] * len(w.input_ids)}
        if w.token_type_ids is not None:
            f["token_type_ids"] = w.token_type_ids
        if with_labels:
            f["start_positions"], f["end_positions"] = w.start_position, w.end_position
        out.append(f)
    return out


def save_hw7(data, path) -> None:
    """Write ``data`` (a ``QAData``) as HW7 JSON (e.g. DRCD converted), whole or not at all."""
    from hw7qa.files import atomic_write
    questions = [{"id": q.id, "paragraph_id": q.paragraph_id, "question_text": q.question_text,
                  "answer_text": q.answer_text, "answer_start": q.answer_start, "answer_end": q.answer_end}
                 for q in data.questions]
    with atomic_write(path, encoding="utf-8") as f:
        json.dump({"questions": questions, "paragraphs": data.paragraphs}, f, ensure_ascii=False)


def shared_path(relative: str) -> Path:
    """A file of ../shared, or a skip that says why the test cannot run here."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs ../shared beside the checkout (CI has it)")
    return path


@pytest.fixture(scope="session", autouse=True)
def child_temp_folder(tmp_path_factory):
    """The temporary folder (``TMPDIR``) of every process the tests start: one inside pytest's own,
    which pytest prunes (it keeps the newest 3 sessions'). torchrun, which ``accelerate launch``
    starts, leaves a ``torchelastic_*`` folder in the temporary folder at every launch."""
    folder = tmp_path_factory.mktemp("child-temp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def sample_train():
    return load_qa_file(SAMPLE / "hw7_train.json", need_answers=True)


@pytest.fixture(scope="session")
def sample_dev():
    return load_qa_file(SAMPLE / "hw7_dev.json", need_answers=True)


@pytest.fixture(scope="session")
def sample_test():
    return load_qa_file(SAMPLE / "hw7_test.json")


@pytest.fixture(scope="session")
def bert_tokenizer(sample_train):
    """A WordPiece tokenizer from the train file's characters (dev's rare characters become [UNK])."""
    return build_tiny_tokenizer(sample_train.paragraphs + [q.question_text for q in sample_train.questions])


def build_sentencepiece_tokenizer(texts):
    """An XLM-R-like tokenizer (Unigram + Metaspace, ``<s> q </s></s> p </s>``, no token types)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=1500, special_tokens=specials,
                                                           unk_token="<unk>", max_piece_length=3,
                                                           show_progress=False))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(sample_train):
    return build_sentencepiece_tokenizer(sample_train.paragraphs + [q.question_text for q in sample_train.questions])


@pytest.fixture(scope="session")
def real_bert_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(shared_path("models/bert-base-chinese-tokenizer")))


@pytest.fixture(scope="session", params=["wordpiece", "sentencepiece", "stand-in", "stand-in-isolated"])
def any_tokenizer(request, bert_tokenizer, sentencepiece_tokenizer):
    """Each kind of fast tokenizer: BERT WordPiece, sentencepiece, and the real stand-in's if built
    (also with digits and CJK characters isolated)."""
    if request.param == "wordpiece":
        return bert_tokenizer
    if request.param == "sentencepiece":
        return sentencepiece_tokenizer
    if not (STAND_IN / "tokenizer.json").exists():
        pytest.skip(f"no stand-in model at {STAND_IN} (build it with ../shared/tools/stand-in-model/build)")
    isolated = request.param == "stand-in-isolated"
    return load_tokenizer(STAND_IN, isolate_digits=isolated, isolate_cjk=isolated)


def fail_writes(monkeypatch, error: BaseException) -> None:
    """Make files that ``atomic_write`` opens raise ``error`` on their first write."""
    import hw7qa.files
    real_fdopen = os.fdopen

    def write(data):
        raise error

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        f.write = write
        return f
    monkeypatch.setattr(hw7qa.files.os, "fdopen", fdopen)


@pytest.fixture
def full_disk(monkeypatch):
    """Files that ``atomic_write`` opens fail on their first write as on a full disk: ``OSError``
    ENOSPC naming no file, which is what the operating system raises."""
    import errno
    fail_writes(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
