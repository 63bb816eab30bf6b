"""Shared fixtures: the bundled sample data, tiny tokenizers built here, ../shared where it exists."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from hw7qa.data import load_qa_file
from hw7qa.tiny import build_tiny_tokenizer
from hw7qa.windows import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample"
SHARED = Path(os.environ.get("HW7QA_SHARED", ROOT.parent / "shared"))
STAND_IN = Path(os.environ.get("HW7QA_STAND_IN", Path.home() / ".cache/stand-in/multilingual-e5-small"))


def shared_path(relative: str) -> Path:
    """A file of ../shared, or a skip that says why the test cannot run here."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not found: this test needs ../shared beside the checkout (CI has it)")
    return path


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
