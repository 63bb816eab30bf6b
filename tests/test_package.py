"""The package as users install it: a wheel, installed outside the checkout, runs the demo with
the presets and sample data it ships; the command line answers at once where it needs no model."""
import importlib
import json
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtual environment, outside the checkout, with the wheel of this checkout installed. It
    sees this interpreter's packages (torch & co. are not installed twice) but not the checkout."""
    root = tmp_path_factory.mktemp("package")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "wheel")], check=True, capture_output=True)
    venv.create(root / "env", with_pip=False)
    python = root / "env" / "bin" / "python"
    [wheel] = (root / "wheel").glob("hw7qa-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True)
    # after the install: through the .pth file pip would see this interpreter's hw7qa and try to uninstall it
    share_site_packages(python)
    return root, python


def site_folders() -> list[str]:
    """This interpreter's site-packages folders (its own; the base interpreter's, with
    ``--system-site-packages``; the user's) in the order ``sys.path`` has them."""
    folders = set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        folders.add(site.getusersitepackages())
    return [p for p in sys.path if p in folders]


def share_site_packages(python: Path) -> None:
    """Let the virtual environment of ``python`` import this interpreter's packages, after its own.

    ``venv.create(system_site_packages=True)`` would share the base interpreter's folders, and in a
    virtual environment torch & co. are not there (or at other versions). A ``.pth`` file of plain
    folders adds the folders alone: the ``.pth`` files inside them are not run, so an editable
    install of the checkout stays out of sight.
    """
    ask = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         check=True, capture_output=True, text=True)
    (Path(ask.stdout.strip()) / "tests-site-packages.pth").write_text("\n".join(site_folders()) + "\n",
                                                                    encoding="utf-8")


def run_in(folder, *command):
    return subprocess.run([str(c) for c in command], cwd=folder, capture_output=True, text=True, timeout=600)


def test_the_installed_wheel_runs_the_demo_outside_the_checkout(installed):
    root, python = installed
    (root / "work").mkdir()
    where = run_in(root / "work", python, "-c", "import hw7qa; print(hw7qa.__file__)")
    assert str(root / "env") in where.stdout                          # the installed copy, not the checkout
    done = run_in(root / "work", root / "env" / "bin" / "hw7qa", "demo", "--output-dir", "run", "--set", "epochs=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "demo finished" in done.stdout
    rows = (root / "work" / "run" / "result.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "ID,Answer" and len(rows) == 14                 # the 13 questions of the shipped sample
    preset = run_in(root / "work", python, "-m", "hw7qa", "train", "--config", "no-such-preset")
    assert preset.returncode == 2 and "bert-base, demo, macbert-base" in preset.stderr


DEPENDENCIES = ("torch", "transformers", "accelerate", "tokenizers", "numpy", "safetensors", "tqdm")
WHERE = ("import importlib, json, sys; "
         "print(json.dumps({n: [m.__version__, m.__file__] for n in sys.argv[1:] for m in [importlib.import_module(n)]}))")


def test_the_environment_imports_exactly_this_interpreters_packages(installed):
    """hw7qa's dependencies come from the same files, so at the same versions, as in the interpreter
    that runs the tests, not from the one a virtual environment was made from."""
    root, python = installed
    done = run_in(root, python, "-c", WHERE, *DEPENDENCIES)
    assert done.returncode == 0, done.stderr[-2000:]
    outer = {n: [m.__version__, m.__file__] for n in DEPENDENCIES for m in [importlib.import_module(n)]}
    assert json.loads(done.stdout) == outer


PROBE = """
import sys
try:
    from hw7qa.__main__ import main
    code = main(sys.argv[1:])
except SystemExit as e:                     # argparse: --help and argument errors
    code = e.code
print("IMPORTED", sorted(m for m in ("torch", "transformers", "accelerate") if m in sys.modules))
sys.exit(code)
"""


def test_commands_that_need_no_model_do_not_import_torch(tmp_path):
    """--help, check and a mistyped argument answer at once: torch alone takes seconds to import."""
    (tmp_path / "result.csv").write_text("ID,Answer\n", encoding="utf-8")
    test_file = ROOT / "data" / "sample" / "hw7_test.json"
    for args, code in ((["check", tmp_path / "result.csv", test_file], 1), (["train", "--sett", "x"], 2),
                       (["--help"], 0)):
        done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True)
        assert done.returncode == code and "IMPORTED []" in done.stdout, (args, done.stdout, done.stderr)
