"""The views for people: windows drawn over their paragraph, dev EM and F1 curves, tables that
line up with Chinese text. Drawings are checked headless (Agg) by what they hold, not by pixels."""
import json

import numpy as np
import pytest

from hw7qa.config import WindowSpec
from hw7qa.files import DamagedFile
from hw7qa.report import TextTable, as_table, display_width, format_table, plot_metrics, plot_windows
from hw7qa.windows import encode, eval_windows, question_windows



def pyplot():
    """matplotlib's pyplot (a dev and notebook dependency), or a skip where it is missing."""
    return pytest.importorskip("matplotlib.pyplot")


def patches_by_gid(fig):
    return {p.get_gid(): p for ax in fig.axes for p in ax.patches if p.get_gid()}


@pytest.fixture(scope="module")
def dev_windows(bert_tokenizer, sample_dev):
    return encode(sample_dev, bert_tokenizer, WindowSpec(max_length=64, max_question_tokens=16, doc_stride=20))


def test_question_windows_are_the_windows_inference_uses(dev_windows):
    table = eval_windows(dev_windows)
    for qi in range(len(dev_windows.data.questions)):
        rows = np.flatnonzero(table.question_index == qi)
        assert question_windows(dev_windows, qi) == list(zip(table.token_start[rows].tolist(),
                                                             table.token_end[rows].tolist()))


def test_windows_drawing_has_one_bar_per_window_and_the_answer_where_it_is(dev_windows):
    qi = max(range(len(dev_windows.data.questions)), key=lambda i: len(question_windows(dev_windows, i)))
    spans, (first, last) = question_windows(dev_windows, qi), dev_windows.answer_tokens[qi]
    plt = pyplot()
    fig = plot_windows(dev_windows, qi)
    bars = patches_by_gid(fig)
    windows = [bars[f"window-{k}"] for k in range(len(spans))]
    assert len(spans) > 2 and sum(gid.startswith("window-") for gid in bars) == len(spans)
    assert [(round(b.get_x()), round(b.get_x() + b.get_width())) for b in windows] == spans
    assert (bars["answer"].get_x(), bars["answer"].get_width()) == (first, last - first + 1)
    holds = [start <= first and last < end for start, end in spans]
    assert [b.get_facecolor() == windows[holds.index(True)].get_facecolor() for b in windows] == holds
    plt.close(fig)


def test_dev_curve_shows_f1_beside_exact_match(tmp_path):
    records = [{"step": 5, "loss": 2.0, "lr": 1e-3}, {"step": 5, "dev_em": 0.0, "dev_f1": 0.1},
               {"step": 10, "loss": 1.0, "lr": 5e-4}, {"step": 10, "dev_em": 0.0, "dev_f1": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plt = pyplot()
    fig = plot_metrics(tmp_path)
    dev = {line.get_label(): list(line.get_ydata()) for line in fig.axes[2].get_lines()}
    assert dev == {"exact match": [0.0, 0.0], "F1": [0.1, 0.3]}
    plt.close(fig)

    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 15, "lo')                         # a line cut short
    with pytest.raises(DamagedFile, match=r"metrics.jsonl is damaged: line 5 is not a JSON record"):
        plot_metrics(tmp_path)


def test_table_columns_line_up_with_chinese_text():
    rows = [{"id": 7, "question": "明朝的第二位皇帝是誰？", "predicted": "Steve Jobs", "f1": 0.5},
            {"id": 12, "question": "iPhone 在哪一座城市發表的？" * 3, "predicted": "「建文」", "f1": 0.25}]
    header, rule, first, second = format_table(rows, max_width=20).splitlines()

    def column(line, text):       # where ``text`` starts in ``line``, in screen columns
        return display_width(line[:line.index(text)])
    assert column(first, "明朝") == column(second, "iPhone") == column(header, "question")
    assert column(first, "Steve") == column(second, "「建文」") == column(header, "predicted")
    assert display_width(second[second.index("iPhone"):second.index("「建文」")].rstrip()) == 20
    assert second.split("  ")[1].endswith("…")                        # cut at 20 columns
    assert first.endswith(" 0.5") and second.endswith("0.25") and first.startswith(" 7")  # numbers right-aligned
    assert len(rule.split()) == 4


def test_as_table_without_pandas_prints_the_text_table(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pandas)
    rows = [{"id": 1, "gold": "朱允炆"}]
    table = as_table(rows)
    assert isinstance(table, TextTable) and repr(table) == format_table(rows)
