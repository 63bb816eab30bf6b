"""HW7.ipynb, executed top to bottom in a real kernel on the demo preset and the bundled sample."""
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
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "result.csv is valid" in printed and "EM" in printed and "holds_answer" in printed
