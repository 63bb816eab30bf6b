"""A run folder's life: decided (new, resumed, or refused), cleared, filled with checkpoints, the
saved model, ``metrics.jsonl`` records, and the trainer's state that a checkpoint holds.

Layout of a run folder (README): ``config.json``, ``metrics.jsonl``, ``model/``,
``checkpoints/step-NNNNNNN/`` (each written under a ``.partial`` name and renamed when complete,
its ``trainer_state.json`` listing its files and their sizes), ``logits/``, ``result.csv``.

A resume checks what it will use before it changes anything (``check_resumable``): a damaged
newest checkpoint, ``metrics.jsonl`` or saved model is named, never loaded, skipped or passed over.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .config import Config, check_resume, load_config, read_json, save_config
from .integrity import DamagedFile, check_file, check_folder
from .models import run_model_dir


def new_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    name = Path(cfg.model_name.rstrip("/")).name.replace("/", "_")
    return Path("outputs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints of a run, oldest first: its ``step-N`` folders (``.partial`` ones are unfinished
    saves). A ``step-N`` folder is renamed only once complete, so one that lacks files is damaged:
    it is listed, and a resume names it (``check_resumable``) instead of passing over it."""
    root = Path(run_dir) / "checkpoints"
    found = [d for d in root.glob("step-*") if d.is_dir() and d.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def check_resumable(run_dir: Path, checkpoints: list[Path]) -> None:
    """Before a resume changes anything: the newest of ``checkpoints`` (every file it lists, at its
    size, and every file in it whole), ``metrics.jsonl`` and the saved model are whole. An older
    checkpoint, whose trainer_state.json lists no files, has the files it holds checked only."""
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


def clear_folder(folder: Path) -> None:
    for item in folder.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> tuple[Path, Path | None]:
    """The run folder, ready for this run, and the checkpoint to continue from (None: from the start).

    A new run goes only into a new or empty folder, or, with ``overwrite``, into an old run's folder
    that it empties first. A resume checks that ``cfg`` continues the run (``check_resume``); with no
    checkpoint yet it starts again and drops the records of the attempt it replaces, so the folder's
    files always describe one run. Writes ``config.json``. Main process only.
    """
    if resume and not cfg.output_dir:
        raise ValueError("resume needs the run folder (output_dir)")
    run_dir = new_run_dir(cfg)
    is_run = (run_dir / "config.json").is_file()
    if resume and is_run:
        check_resume(load_config(run_dir / "config.json"), cfg, run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run:
            raise ValueError(f"output_dir {run_dir} is not empty and holds no run: choose a new or empty folder")
        if not overwrite:
            raise ValueError(f"{run_dir} already holds a run. Continue it with: python -m hw7qa train --resume "
                             f"{run_dir} (notebook: RESUME = True); start it over, deleting it, with --overwrite "
                             f"(notebook: OVERWRITE = True); or choose another output_dir")
        clear_folder(run_dir)
    for unfinished in run_dir.glob("checkpoints/*.partial"):    # saves cut off by a kill
        shutil.rmtree(unfinished, ignore_errors=True)
    checkpoint = newest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None and run_dir.is_dir():
        clear_folder(run_dir)                  # an attempt killed before its first checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    if checkpoint is not None:
        truncate_metrics(run_dir, read_trainer_state(checkpoint).step)
    return run_dir, checkpoint


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a resume continues from, checked (``check_resumable``); None if there is none."""
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        check_resumable(run_dir, checkpoints)
    return (checkpoints or [None])[-1]


def decided_on_main(accelerator, decide):
    """``decide()`` run by the main process alone; its result, or its error, reaches every process
    (a process that decided by itself could pick another folder, or wait forever for one that failed)."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = decide()
        except (ValueError, OSError) as e:
            if accelerator.num_processes == 1:
                raise
            error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        shared = broadcast_object_list([result, None if error is None else str(error)])
        if error is not None:
            raise error
        if shared[1] is not None:
            raise ValueError(shared[1])
        result = shared[0]
    return result


def save_model(model, tokenizer, cfg: Config, directory: Path) -> None:
    """Save model (safetensors), tokenizer and the run's config (``hw7qa_config.json``) to
    ``directory``, replacing it only once complete."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    save_config(cfg, partial / "hw7qa_config.json")
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)


def log_metrics(run_dir: Path, record: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop ``metrics.jsonl`` records after ``step``: the resumed run logs them again."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        records = [line for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip() and json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in records), encoding="utf-8")


# ---------------------------------------------------------------- the state a checkpoint holds

@dataclass
class TrainState:
    """Everything the loop carries from step to step, saved in each checkpoint's trainer_state.json.

    No count of skipped steps: a checkpoint is never written during a streak of them."""
    step: int = 0                   # optimizer steps taken
    epoch: int = 0                  # the epoch in progress (== epochs when finished)
    batches_done: int = 0           # batches of that epoch already trained on
    best_em: float = -1.0           # dev scores of the model in <run>/model
    best_f1: float = -1.0
    running_loss: list = dataclasses.field(default_factory=list)   # per process: loss sum and count since the
    running_n: list = dataclasses.field(default_factory=list)      # last log record
    micro_batch: int = 0            # windows per forward pass and passes per step actually used (auto_batch);
    grad_accum: int = 0             # 0: a checkpoint from before auto_batch, the config's


def read_trainer_state(checkpoint: Path) -> TrainState:
    values = read_json(checkpoint / "trainer_state.json")
    for key in ("running_loss", "running_n"):      # one number in checkpoints of hw7qa before 0.2
        if not isinstance(values.get(key, []), list):
            values[key] = [values[key]]
    known = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in values.items() if k in known})


def save_checkpoint(accelerator, run_dir: Path, state: TrainState, keep: int) -> Path:
    """Everything needed to continue training, into ``<run>/checkpoints/step-NNNNNNN``.

    ``accelerator.save_state`` writes model, optimizer, scheduler, GradScaler and every process's RNG
    states; ``state`` goes to ``trainer_state.json``, written last, with the names and sizes of
    the files beside it (what a resume checks). The folder is filled under a
    ``.partial`` name and renamed when complete, so an interruption never leaves a half-written
    checkpoint that looks complete. Checkpoints beyond the newest ``keep`` are deleted after that.
    Every process must call this.
    """
    final = run_dir / "checkpoints" / f"step-{state.step:07d}"
    partial = final.with_name(final.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.name: p.stat().st_size for p in sorted(partial.iterdir()) if p.is_file()}  # check_resumable's list
        text = json.dumps({**dataclasses.asdict(state), "files": files}, indent=1) + "\n"
        (partial / "trainer_state.json").write_text(text, encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
