"""Command line: ``python -m hw7qa COMMAND`` (``--help`` lists them and the exit codes).

    python -m hw7qa train --config bert-base --set lr=3e-5 epochs=2   # a preset, or a JSON file
    python -m hw7qa train --resume outputs/RUN              # from its last checkpoint
    python -m hw7qa predict outputs/RUN [--file other.json]  # → RUN/result.csv [RUN/result-other.csv]
    python -m hw7qa evaluate outputs/RUN                    # the run's dev_file → EM and F1
    python -m hw7qa ensemble outputs/RUN1 outputs/RUN2 --split dev|test
    python -m hw7qa ask outputs/RUN --question 問題 --paragraph 段落
    python -m hw7qa estimate --config macbert-large          # minutes and GPU memory, measured here
    python -m hw7qa check outputs/RUN/result.csv data/hw7_test.json
    python -m hw7qa demo                                    # the whole pipeline offline on the sample

Expected failures, Ctrl-C and SIGTERM print one line on stderr, no traceback, and exit with an ``EXIT_CODES`` code.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import shlex
import signal
import sys
import threading
from pathlib import Path

# torch, transformers and accelerate are imported in run_command, so that --help and check answer at once
from . import __version__
from .config import FREE_ON_RESUME, PRESETS, TrainingError, demo_config, load_config, preset_names, preset_path
from .data import load_qa_file
from .kaggle import KaggleError
from .submission import SubmissionError, check_result_csv


# Every exit code and what it means: the --help epilog and the README's table are made from this.
EXIT_CODES = {
    0: "done",
    1: "a result.csv is not a valid submission (check, or the one train / predict / ensemble wrote)",
    2: "bad arguments or input: unknown setting, bad data file, missing file or run folder, a file where a "
       "folder is needed or the other way round, a damaged run folder (the file named), a --resume the run "
       "cannot continue, an output_dir that already holds a run",
    3: "training stopped (non-finite loss, GPU out of memory)",
    4: "the system refused to read or write: permission denied, read-only or full disk",
    5: "the kaggle command is missing or refused (credentials, rules not accepted)",
    130: "interrupted (Ctrl-C); one line says what was kept and the command that continues",
    143: "stopped (SIGTERM: kill, a runtime shutting down); the same line",
}


def exit_codes_epilog() -> str:
    import textwrap
    return "exit codes:\n" + "\n".join(textwrap.fill(text, 100, initial_indent=f"  {code:<5}",
                                                     subsequent_indent=" " * 7) for code, text in EXIT_CODES.items())


# errno → what went wrong, in words, and the exit code (see EXIT_CODES)
OS_ERRORS = {
    errno.ENOENT: ("no such file or folder", 2),
    errno.ENOTDIR: ("a file is in the way where a folder is needed", 2),
    errno.EEXIST: ("a file is in the way where a folder is needed", 2),  # mkdir(exist_ok=True) on a file
    errno.EISDIR: ("this is a folder; a file name is needed", 2),
    errno.EACCES: ("permission denied", 4),
    errno.EPERM: ("operation not permitted", 4),
    errno.EROFS: ("read-only file system", 4),
    errno.ENOSPC: ("no space left on the disk", 4),
    errno.EDQUOT: ("disk quota exceeded", 4),
}
# the exit code of every other expected failure, the first kind that matches (DataError is a ValueError)
ERROR_CODES = {SubmissionError: 1, ValueError: 2, TrainingError: 3, KaggleError: 5}


def os_error_message(e: OSError) -> tuple[str, int]:
    """``("<what> (<path>)", exit code)`` for an OSError."""
    if e.errno is None:         # our own, e.g. FileNotFoundError for a folder that is not a run: its own sentence
        return str(e), 2 if isinstance(e, FileNotFoundError) else 4
    what, code = OS_ERRORS.get(e.errno, ((e.strerror or errno.errorcode.get(e.errno, "")).lower(), 4))
    paths = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return (f"{what} ({paths})" if paths else what), code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hw7qa", description="HW7 Chinese extractive QA",
                                     epilog=exit_codes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    settings = argparse.ArgumentParser(add_help=False)      # --set, the same for every command that takes it
    # action="extend": a second --set adds to the first instead of replacing it
    settings.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                          help="override config values (several --set add up; a key set twice is refused)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", parents=[settings], help="fine-tune; predicts the test file too when one is configured")
    p.add_argument("--config", help=f"a preset's name ({', '.join(preset_names())}) or a JSON file")
    p.add_argument("--resume", metavar="RUN", help="continue this run folder from its newest checkpoint (with the "
                   f"run's own config.json; --set may change only {', '.join(FREE_ON_RESUME)})")
    p.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds a run, "
                   "deleting that run (without it, train refuses such a folder)")
    for name, helptext in (("predict", "write result.csv for a test file"), ("evaluate", "dev EM and F1")):
        p = sub.add_parser(name, parents=[settings], help=helptext)
        p.add_argument("run", help="a run folder made by train")
        p.add_argument("--file", default="", help="HW7 or DRCD JSON (default: the run's test/dev file)")
        if name == "predict":
            p.add_argument("--out", default="", help="CSV path (default: RUN/result.csv for the run's own test "
                           "file; RUN/result-<file stem>.csv for any other --file, so that the run's submission "
                           "is never replaced)")
    p = sub.add_parser("ensemble", help="combine several runs' models (decode.ensemble_predictions)")
    p.add_argument("runs", nargs="+", help="two or more run folders made by train")
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--file", default="", help="HW7 or DRCD JSON (default: the first run's dev/test file)")
    p.add_argument("--output-dir", default="", help="where result.csv or dev_predictions.jsonl go "
                   "(default: outputs/ensemble-<time>)")
    p.add_argument("--method", choices=("auto", "chars"), default="auto",
                   help="auto: average logits of members with the same tokenizer and windows, combine the rest "
                        "at the character level; chars: every member at the character level")
    p = sub.add_parser("ask", parents=[settings], help="answer your own question about your own paragraph")
    p.add_argument("run", help="a run folder made by train")
    p.add_argument("--question", help="the question")
    p.add_argument("--paragraph", help="the text in which the answer is to be found")
    p.add_argument("--file", help="many questions instead: HW7 or DRCD JSON, or JSON lines (*.jsonl) of "
                   '{"question": ..., "paragraph": ...}')
    p.add_argument("--n-best", type=int, default=5, help="alternatives listed per question (default 5)")
    p = sub.add_parser("check", help="validate a result.csv against a test JSON")
    p.add_argument("csv")
    p.add_argument("test_json")
    p = sub.add_parser("submit", help="check a run's result.csv, then submit it to Kaggle (the kaggle command)")
    p.add_argument("run", help="a run folder (its result.csv, checked against its test_file), or a CSV file")
    p.add_argument("-m", "--message", default="", help="the submission's description (default: the run's name)")
    p.add_argument("--test-file", default="", help="the test JSON to check against (default: the run's test_file)")
    p = sub.add_parser("download", help="the competition's JSON files from Kaggle into a folder")
    p.add_argument("--dir", default="data", help="where they go (default: data)")
    p = sub.add_parser("estimate", parents=[settings],
                       help="time and memory of a config's whole run here, measured before training")
    p.add_argument("--config", help="a preset's name or a JSON file (as train takes it)")
    p.add_argument("--data", default="", help="a QA file with answers whose windows stand for every split, scaled "
                   "to HW7's size (default: the config's files; HW7-typical lengths where they are missing)")
    p = sub.add_parser("demo", parents=[settings],
                       help="the whole pipeline offline on data/sample with a tiny random model")
    p.add_argument("--output-dir", default="", help="run folder (default: outputs/tiny-random-bert-<time>)")
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Do what ``args`` asks; the exit code of a command that finished (see EXIT_CODES)."""
    if args.command == "check":
        problems = check_result_csv(args.csv, load_qa_file(args.test_json))
        print("\n".join(problems) if problems else f"{args.csv}: valid ({args.test_json})")
        return 1 if problems else 0
    if args.command in ("submit", "download"):
        return kaggle_command(args)
    if args.command == "ask":
        return ask_command(args)
    from .inference import ensemble_runs, evaluate_run, predict_test
    from .runfolder import resume_config
    from .train import train_and_predict
    if args.command == "train" and args.resume:
        if args.config:
            raise ValueError("--resume uses the run's own config.json; leave out --config")
        if args.overwrite:
            raise ValueError("--resume continues the run and --overwrite deletes it; give only one of them")
        train_and_predict(resume_config(args.resume, args.set), resume=True)
    elif args.command == "train":
        train_and_predict(load_config(preset_path(args.config), args.set), overwrite=args.overwrite)
    elif args.command == "predict":
        predict_test(args.run, args.file, args.out, args.set)
    elif args.command == "evaluate":
        evaluate_run(args.run, args.file, args.set)
    elif args.command == "ensemble":
        ensemble_runs(args.runs, args.split, args.file, args.output_dir, args.method)
    elif args.command == "estimate":
        from .estimate import estimate
        path = preset_path(args.config)
        preset = path.stem if path and path.resolve().parent == PRESETS.resolve() else ""   # the course's tier
        print(estimate(load_config(path, args.set), args.data, preset))
    elif args.command == "demo":
        from .models import processes
        run_dir = train_and_predict(demo_config(args.output_dir, args.set))
        if processes().is_main_process:
            print("demo finished. The model is tiny and random: its answers are not meaningful; "
                  f"the run proves the installation works. See {run_dir}")
    return 0


def ask_command(args: argparse.Namespace) -> int:
    """``ask``: one question (``--question`` and ``--paragraph``) or a ``--file`` of them."""
    from .ask import ask_many, format_answer, load_reader, questions_data, read_questions
    if args.file and (args.question is not None or args.paragraph is not None):
        raise ValueError("give either --file or --question with --paragraph, not both")
    if not args.file and (args.question is None or args.paragraph is None):
        raise ValueError("give --question and --paragraph (or --file with many questions)")
    questions = read_questions(args.file) if args.file else questions_data([(args.question, args.paragraph)])
    answers = ask_many(load_reader(args.run, args.set), questions, args.n_best)
    print("\n\n".join((f"id {a.id}\n" if args.file else "") + format_answer(a) for a in answers))
    return 0


def kaggle_command(args: argparse.Namespace) -> int:
    from . import kaggle
    if args.command == "download":
        print("\n".join(str(p) for p in kaggle.download(args.dir)))
        return 0
    run = Path(args.run)
    if not run.exists():
        raise FileNotFoundError(f"{run}: no such run folder or CSV file")
    csv_path = run / "result.csv" if run.is_dir() else run
    test_file = args.test_file or (load_config(run / "config.json").test_file if run.is_dir() else "")
    if not test_file:
        raise ValueError(f"{csv_path}: which test file does it answer? give --test-file")
    print(kaggle.submit(csv_path, load_qa_file(test_file), args.message or f"hw7qa {run.resolve().name}").strip())
    return 0


def end_processes(together: bool) -> None:
    """Take down ``accelerate launch``'s process group once a command is done; ``together``: it ended normally on
    every process. Left to exit, gloo may abort a finished process (exit -6), failing the whole launch."""
    if "torch.distributed" not in sys.modules:          # a command that never started torch
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if together:        # after an error a barrier could wait forever for a process that failed elsewhere
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)       # to say how to run it again
    code = 1
    try:
        with sigterm_as_interrupt():
            code = run_reporting_errors(args)
        return code
    finally:
        end_processes(together=code == 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is, so that the same cleanup runs."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A block in which SIGTERM raises ``Terminated``, not ending Python on the spot with partial saves."""
    def terminate(signum, frame):
        raise Terminated
    if threading.current_thread() is not threading.main_thread():     # only it may set signal handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def interrupted(args: argparse.Namespace, e: KeyboardInterrupt) -> int:
    """Print what the interrupted command kept and how to continue (its ``runfolder.on_interrupt`` hint, else
    run it again); 143 for SIGTERM, else 130."""
    kept = ("nothing was written" if args.command in ("train", "demo", "ask", "check") else
            "no file is left half written" + (" and the logits computed so far are kept"
                                              if args.command in ("predict", "evaluate", "ensemble") else ""))
    hint = e.args[0] if e.args else f"{kept}; run it again: python -m hw7qa {shlex.join(args.argv)}"
    print(f"\n{'stopped (SIGTERM)' if isinstance(e, Terminated) else 'interrupted (Ctrl-C)'}: {hint}", file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def run_reporting_errors(args: argparse.Namespace) -> int:
    """``run_command``, with an expected failure printed as one line and turned into its exit code."""
    try:
        return run_command(args)
    except KeyboardInterrupt as e:
        return interrupted(args, e)
    except tuple(ERROR_CODES) as e:        # before OSError: io.UnsupportedOperation is also a ValueError
        code = next(code for kind, code in ERROR_CODES.items() if isinstance(e, kind))
        print(f"{'training stopped' if isinstance(e, TrainingError) else 'error'}: {e}", file=sys.stderr)
        return code
    except OSError as e:
        message, code = os_error_message(e)
        print(f"error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
