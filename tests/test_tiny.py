"""The tiny tokenizer and the demo leave nothing behind in the system's temporary folder."""
import tempfile

import pytest

from hw7qa.__main__ import main
from hw7qa.tiny import build_tiny_tokenizer
from hw7qa.models import load_tokenizer


@pytest.fixture
def system_temp(tmp_path, monkeypatch):
    """An empty folder that ``tempfile`` gives out as the system's temporary folder, in this process
    (``tempfile.tempdir``) and in the processes it starts (``TMPDIR``)."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_a_tiny_tokenizer_leaves_no_folder_and_saves_without_its_files(system_temp, tmp_path, sample_train):
    texts = sample_train.paragraphs + [q.question_text for q in sample_train.questions]
    tokenizer = build_tiny_tokenizer(texts)
    assert list(system_temp.iterdir()) == []
    # the files it was loaded from are gone: saving and loading again gives the same tokenizer
    tokenizer.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    question = sample_train.questions[0]
    pair = (question.question_text, sample_train.paragraph(question))
    assert again.get_vocab() == tokenizer.get_vocab() and len(tokenizer) > 100
    assert again(*pair)["input_ids"] == tokenizer(*pair)["input_ids"]


def test_the_demo_leaves_nothing_in_the_temporary_folder(system_temp, tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path / "run"), "--set", "epochs=1", "keep_checkpoints=0"]) == 0
    assert (tmp_path / "run" / "result.csv").is_file()
    assert list(system_temp.iterdir()) == []
