"""A run folder's life: decided (new, resumed or refused), cleared, and filled with ``config.json``,
``metrics.jsonl``, ``model/`` and ``checkpoints/step-NNNNNNN/`` (each written as ``.partial``, renamed when whole).
A resume checks what it will use before it changes anything, naming a damaged file, never passing over it.
A refused write (full disk, read-only folder) is an ``OSError`` naming what it wrote (exit code 4) and leaves
the last complete checkpoint, ``model/`` and every line of ``metrics.jsonl`` as they were.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, apply_overrides, check_resume, load_config, read_json, run_config, save_config
from .files import DamagedFile, append_whole, atomic_write, check_file, check_folder, refused_as, with_new_file_modes
from .models import quiet_transformers, run_model_dir


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run's ``step-N`` checkpoint folders, oldest first (not ``.partial`` or ``.old`` ones); a damaged one is
    listed, so that a resume names it (``check_resumable``)."""
    root = Path(run_dir) / "checkpoints"
    found = [d for d in root.glob("step-*") if d.is_dir() and re.fullmatch(r"step-\d+", d.name)]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def check_resumable(run_dir: Path, checkpoints: list[Path]) -> None:
    """Raise ``DamagedFile`` unless the newest of ``checkpoints`` (every file it lists at its size, if it lists
    any, and every file in it), ``metrics.jsonl`` and the saved model are whole."""
    checkpoint = checkpoints[-1]
    fix = (f"delete {checkpoint} to resume from {checkpoints[-2].name} instead" if len(checkpoints) > 1 else
           "it is the run's only checkpoint: restore it from a copy of the run, or start the run over with --overwrite")
    check_file(checkpoint / "trainer_state.json", fix)
    for name, size in read_json(checkpoint / "trainer_state.json").get("files", {}).items():
        check_file(checkpoint / name, fix, size)
    check_folder(checkpoint, [], fix)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:    # none, or empty: killed before (or while) writing a record
        check_file(metrics, "delete that line and those after it (records after the checkpoint are written "
                            "again), or restore the file, then resume again")
    model = run_dir / "model"
    if model.is_dir():
        run_model_dir(run_dir)
    elif read_trainer_state(checkpoint).best_em >= 0:
        raise DamagedFile(model, f"is missing, but {checkpoint.name} says the best model so far was saved there",
                          "restore it from a copy of the run, or start the run over with --overwrite")


def what_is_kept(run_dir: Path) -> str:
    """A sentence naming the saved model and the last checkpoint of a stopped run, where they exist."""
    model, checkpoints = run_dir / "model", list_checkpoints(run_dir)
    return ((f" The best model so far is in {model}." if model.is_dir() else "") +
            (f" The last good checkpoint is {checkpoints[-1]}." if checkpoints else ""))


@contextlib.contextmanager
def on_interrupt(hint):
    """A block whose KeyboardInterrupt (Ctrl-C; SIGTERM on the command line) carries ``hint()``: what was kept
    and the command that continues, for the command line to print."""
    try:
        yield
    except KeyboardInterrupt as e:
        e.args = e.args or (hint(),)      # an inner block's hint stays
        raise


def clear_folder(folder: Path) -> None:
    for item in folder.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The run folder, ready for this run (``config.json`` written), and the checkpoint to continue from (None:
    from the start): see ``claim_for_new_run`` and ``resume_point``. Refusals touch nothing. Main process only."""
    if resume and not cfg.output_dir:
        raise ValueError("resume needs the run folder (output_dir)")
    new_name = f"{Path(cfg.model_name.rstrip('/')).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) if cfg.output_dir else Path("outputs") / new_name
    checkpoint = None
    if resume:
        put_back(run_dir / "model")        # a kill during a model save left the old one set aside
        checkpoint = resume_point(cfg, run_dir)
        if checkpoint is None:
            clear_folder(run_dir)          # an attempt stopped before it recorded a step: its files go
    else:
        claim_for_new_run(run_dir, overwrite)
    for unfinished in [*run_dir.glob("checkpoints/*.partial"), run_dir / "model.partial"]:  # saves cut off by a kill
        shutil.rmtree(unfinished, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    if checkpoint is not None:
        truncate_metrics(run_dir, read_trainer_state(checkpoint).step)
    return run_dir, checkpoint


def claim_for_new_run(run_dir: Path, overwrite: bool) -> None:
    """ValueError for a folder holding anything but a run, or a run without ``overwrite``; with it, empty it."""
    if not (run_dir.is_dir() and any(run_dir.iterdir())):
        return
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"output_dir {run_dir} is not empty and holds no run: choose a new or empty folder")
    if not overwrite:
        raise ValueError(f"{run_dir} already holds a run. Continue it with: python -m hw7qa train --resume "
                         f"{run_dir} (notebook: RESUME = True); start it over, deleting it, with --overwrite "
                         f"(notebook: OVERWRITE = True); or choose another output_dir")
    clear_folder(run_dir)


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint a resume of ``run_dir`` with ``cfg`` continues from: the newest. None where there is none
    and nothing ``past_the_start`` (starting again loses nothing). Else a ValueError saying why and what to do:
    no run there, a setting it cannot change (``check_resume``), or no checkpoint but work a restart would delete."""
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"cannot resume {run_dir}: it holds no run (no config.json); start a new run there "
                         f"without resume")
    saved = load_config(run_dir / "config.json")
    check_resume(saved, cfg, run_dir)
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        check_resumable(run_dir, checkpoints)   # a damaged newest checkpoint is named, never passed over
        return checkpoints[-1]
    kept = past_the_start(run_dir)
    if not kept:
        return None
    why = "keep_checkpoints=0 saves none" if saved.keep_checkpoints == 0 else "it stopped before its first checkpoint"
    raise ValueError(f"cannot resume {run_dir}: it has no checkpoint to continue from ({why}), and starting it "
                     f"again would delete its {', '.join(kept)} (nothing was changed); to train it again from step 0, "
                     f"deleting them: python -m hw7qa train --config {shlex.quote(str(run_dir / 'config.json'))} --set "
                     f"{shlex.quote(f'output_dir={run_dir}')} --overwrite (notebook: RESUME = False, "
                     f"OVERWRITE = True), or choose another output_dir")


def past_the_start(run_dir: Path) -> list[str]:
    """What in ``run_dir`` a run writes only once it has trained: all but ``config.json``, ``tensorboard/``,
    ``.partial`` checkpoints and a ``metrics.jsonl`` without records past step 0 (lines that are not, passed over)."""
    found = []
    for item in sorted(run_dir.iterdir()):
        if item.name == "metrics.jsonl":
            steps = [0]
            for line in item.read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    steps.append(int(json.loads(line).get("step", 0)))
            found += [f"records up to step {max(steps)} (metrics.jsonl)"] if max(steps) else []
        elif item.name == "checkpoints" and item.is_dir():
            found += ["checkpoints/"] if any(not d.name.endswith(".partial") for d in item.iterdir()) else []
        elif item.name not in ("config.json", "tensorboard"):
            found.append(item.name + ("/" if item.is_dir() else ""))
    return found


def done_on_main(accelerator, work):
    """``work()`` run by the main process alone; its result, or its ValueError/OSError, reaches every process
    (one deciding by itself could pick another folder, or wait forever for one that failed)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = work()
        except (ValueError, OSError) as e:
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise error
    return result


def raise_on_every_process(accelerator, error: Exception | None) -> None:
    """Raise on every process the error any process met (``error``: this one's, or None); a call every
    process makes, so that none waits forever for one that stopped."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        met = gather_object([error])                  # every process calls it, whether it failed or not
        error = error or next((e for e in met if e is not None), None)
    if error is not None:
        raise error


def save_model(model, tokenizer, cfg: Config, directory: Path) -> None:
    """Save model (safetensors), tokenizer and config (``hw7qa_config.json``) to ``directory``, replacing it only
    once complete; a save that fails removes its partial folder, keeps the old one and is an OSError naming it."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with removed_on_failure(partial), refused_as(directory, partial), quiet_transformers():
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        save_config(cfg, partial / "hw7qa_config.json")
        with_new_file_modes(partial)
    replace_folder(partial, directory)


@contextlib.contextmanager
def removed_on_failure(partial: Path):
    """A block that fills the folder ``partial``, removed if the block fails (freeing what a full disk took)."""
    try:
        yield
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def replace_folder(partial: Path, directory: Path) -> None:
    """Rename ``partial`` to ``directory``; an old one is set aside as ``.old`` and deleted once the new one is in
    place (a failure leaves it where it was; a kill in between leaves ``.old``, for ``put_back``)."""
    old = directory.with_name(directory.name + ".old")
    with removed_on_failure(partial), refused_as(directory, partial):
        put_back(directory)
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            directory.rename(old)
        try:
            partial.rename(directory)
        except BaseException:
            put_back(directory)
            raise
    shutil.rmtree(old, ignore_errors=True)


def put_back(directory: Path) -> None:
    """Rename ``directory.old`` back where a kill between ``replace_folder``'s renames left no ``directory``."""
    old = directory.with_name(directory.name + ".old")
    if old.is_dir() and not directory.exists():
        with refused_as(directory, old):
            old.rename(directory)


def log_metrics(run_dir: Path, record: dict) -> None:
    """Append ``record`` to ``metrics.jsonl`` as one line, whole or not at all (``append_whole``)."""
    append_whole(run_dir / "metrics.jsonl", json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step`` (the resumed run logs them again), replacing the file whole."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        records = [line for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_write(path, encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in records))


# ---------------------------------------------------------------- the state a checkpoint holds

@dataclass
class TrainerState:
    """Everything the loop carries from step to step, saved in each checkpoint's ``trainer_state.json`` (no
    count of skipped steps: a checkpoint is never written during a streak of them)."""
    step: int = 0                   # optimizer steps taken
    epoch: int = 0                  # the epoch in progress (== epochs when finished)
    batches_done: int = 0           # batches of that epoch already trained on
    best_em: float = -1.0           # dev scores of the model in <run>/model
    best_f1: float = -1.0
    running_loss: list = dataclasses.field(default_factory=list)   # per process: loss sum and count since the
    running_n: list = dataclasses.field(default_factory=list)      # last log record
    micro_batch: int = 0            # windows per forward pass and passes per step actually used (auto_batch);
    grad_accum: int = 0             # 0: a checkpoint from before auto_batch, the config's


def read_trainer_state(checkpoint: Path) -> TrainerState:
    values = read_json(checkpoint / "trainer_state.json")
    for key in ("running_loss", "running_n"):      # one number in checkpoints of hw7qa before 0.2
        if not isinstance(values.get(key, []), list):
            values[key] = [values[key]]
    known = {f.name for f in dataclasses.fields(TrainerState)}
    return TrainerState(**{k: v for k, v in values.items() if k in known})


def save_checkpoint(accelerator, run_dir: Path, state: TrainerState, keep: int) -> Path:
    """Save all needed to continue training (with ``state``) to ``<run>/checkpoints/step-NNNNNNN``, returned. Every
    process must call it; a failure on any is raised on all as an ``OSError`` naming the checkpoint, and its
    ``.partial`` folder removed. Checkpoints beyond the newest ``keep`` are deleted once it is complete."""
    final = run_dir / "checkpoints" / f"step-{state.step:07d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        with refused_as(final, partial):
            accelerator.save_state(str(partial))    # model, optimizer, scheduler, GradScaler, every RNG
    except OSError as e:
        error = e
    with removed_on_failure(partial) if accelerator.is_main_process else contextlib.nullcontext():
        raise_on_every_process(accelerator, error)
        done_on_main(accelerator, lambda: complete_checkpoint(run_dir, partial, final, state, keep))
    return final


def complete_checkpoint(run_dir: Path, partial: Path, final: Path, state: TrainerState, keep: int) -> None:
    """Write ``trainer_state.json`` (last, listing the files' sizes) into ``partial``, rename it ``final``, and
    delete the checkpoints beyond the newest ``keep``. Main process only."""
    files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}  # check_resumable's list
    text = json.dumps({**dataclasses.asdict(state), "files": files}, indent=1) + "\n"
    with refused_as(final, partial):
        with_new_file_modes(partial)
        (partial / "trainer_state.json").write_text(text, encoding="utf-8")
    replace_folder(partial, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- a saved run's settings



def resume_config(run_dir: str | Path, overrides: list[str] | dict | None = None) -> Config:
    """The config an interrupted run was started with, pointed at its folder, with ``overrides``;
    refused (``check_resume``) if an override would change what the run trains or move the run."""
    saved = dataclasses.replace(run_config(run_dir), output_dir=str(run_dir))
    cfg = check_resume(saved, apply_overrides(saved, overrides or []), run_dir)
    if Path(cfg.output_dir).resolve() != Path(run_dir).resolve():
        raise ValueError(f"a resume continues {run_dir} in its own folder, not in output_dir={cfg.output_dir}; "
                         f"leave output_dir out, or start a new run there: python -m hw7qa train --config "
                         f"{shlex.quote(str(Path(run_dir) / 'config.json'))} --set "
                         f"{shlex.quote(f'output_dir={cfg.output_dir}')}")
    return cfg
