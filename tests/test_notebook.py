"""HW7.ipynb, executed top to bottom in a real kernel on the demo preset and the bundled sample."""
import importlib.util
import json

import nbformat
import pytest

from conftest import ROOT
from hw7qa.data import load_qa_file
from hw7qa.submission import check_result_csv

NOTEBOOK = ROOT / "HW7.ipynb"


def test_committed_notebook_is_clean_and_valid():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_the_demo_end_to_end(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    run_dir = tmp_path / "notebook-run"
    monkeypatch.setenv("HW7QA_NOTEBOOK_DEMO", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    test_data = load_qa_file(ROOT / "data" / "sample" / "hw7_test.json")
    assert check_result_csv(run_dir / "result.csv", test_data) == []
    dev_scores = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "dev_em" in line]
    assert dev_scores and 0.0 <= dev_scores[-1]["dev_f1"] <= 1.0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    printed = "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in outputs)
    assert "result.csv is valid" in printed and "EM" in printed
    assert "| whole run |" in printed and "the whole run takes about" in printed    # how long, before training
    assert "predicted" in printed and "f1" in printed          # the wrong answers' table
    assert "question: 臺灣大學的前身是什麼？" in printed and "n-best:" in printed   # try your own question
    assert "Loading weights" not in printed and "Writing model shards" not in printed
    if importlib.util.find_spec("matplotlib"):       # the windows drawn, and the training curves
        assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
