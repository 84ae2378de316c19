"""Run sweep cells in one process, loading each checkpoint once (``scripts/sweep.sh --one-load``).

The shell path starts one runner per cell (model x configuration x dataset), so every cell pays the
imports and the model load. Here one process reads the plan lines ``sweep.sh`` computed (on stdin,
tab-separated: ``status name runner model path data vars``, see ``scripts/cell_name.py plan``),
loads each checkpoint once, patches it with no configuration, and runs each cell's configuration
through :func:`prune_engine.pruning` (which restores the previous configuration afterwards and
reseeds the random methods' generator, as a fresh process would). Each cell is otherwise what the
shell path does: the same VLMEvalKit model name and output folder (``vlm_adapter.register``, the
runner's own registration), the same ``prune_config.json`` and ``prune_records.jsonl``, the same
resume (``_common.carry_forward``), ledger lines, lock, ``run.log`` and seed timing files in
``<work>/_sweep/<name>/<data>/``, so ``scripts/aggregate.py`` reads either. One difference: the
model is warm after the first cell, so the aggregator's warm-up exclusion (per ledger attempt, i.e.
per cell here) is conservative.

    python -m scripts.cell_name plan --work-dir W < cells.tsv | \\
        python -m scripts.sweep_one_load --work-dir W [--no-timing] [-- RUNNER_ARGS...]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

from scripts import _common  # noqa: E402

TIMING_ENV = {"METHOD_TIME": "1", "PREFILL_TIME": "1"}

logger = logging.getLogger("sweep")


def _nlines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors: VLMEvalKit's loggers, tqdm) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


@contextlib.contextmanager
def _in_dir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """The shell path's per-name lock (``flock`` on the same file): True when held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class Group:
    """The cells of one checkpoint (runner, model, model path), sharing one load."""

    def __init__(self, runner: str, model: str, path: str, runner_args: list[str], timing: bool) -> None:
        import vlm_adapter

        self.runner, self.model, self.path, self.timing = runner, model, path, timing
        from scripts.cell_name import RUNNERS

        self.family = importlib.import_module(RUNNERS[runner][0])
        self.display, self.checkpoint = vlm_adapter.resolve_checkpoint(self.family, model, None if path == "-" else path)
        args = list(runner_args)
        self.options = vlm_adapter.RunOptions.pop_from(args)
        if self.options.model_path is not None or vlm_adapter._pop_flag(args, "--work-dir") is not None:
            raise SystemExit("sweep_one_load: --work-dir and --model-path are set by the sweep, not in the runner flags")
        self.protocol = vlm_adapter.resolve_protocol(self.family, self.display, self.options)
        self.runner_args = list(runner_args)  # for the ledger: what the shell path would pass
        self.vlmeval_args = args
        self.loaded = None

    def load(self):
        import vlm_adapter

        if self.loaded is None:
            device = vlm_adapter.pick_device(self.options.device)
            model, processor = vlm_adapter.load_pretrained(self.family, self.checkpoint, device, self.options.dtype)
            self.family.patch(model)  # no configuration: each cell brings its own
            self.loaded = vlm_adapter.LoadedModel(model, processor, device)
            logger.info("loaded %s once for its cells", self.checkpoint)
        return self.loaded

    def command(self, work: Path, data: str, env: str) -> str:
        """The shell path's equivalent of a cell (for the ledger)."""
        timing = " METHOD_TIME=1 PREFILL_TIME=1" if self.timing else ""
        model_path = f" --model-path {self.path}" if self.path != "-" else ""
        return (f"[one load] export{(' ' + env) if env else ''}{timing}; python {ROOT / self.runner} --model {self.model}"
                f"{model_path} --data {data} --work-dir {work} " + " ".join(self.runner_args))

    def run_cell(self, work: Path, name: str, data: str, env_text: str) -> None:
        """One cell in this process: register the configuration's adapter around the loaded model and
        call VLMEvalKit (raises on a configuration the model refuses)."""
        import prune_engine
        from synthetic import tiny_data
        import vlm_adapter
        import vlmeval.run
        from scripts.cell_name import parse_env
        from utils import PruneConfig

        env = parse_env(env_text)
        if self.timing:
            env.update(TIMING_ENV)
        config = PruneConfig.from_env(env)
        loaded = self.load()
        registered, sink = vlm_adapter.register(
            self.family, self.display, self.checkpoint, config, self.protocol, self.options, work, Path.cwd(), loaded=loaded,
        )
        if registered != name:
            raise RuntimeError(f"the plan's model name {name} is not the runner's {registered}")
        judge = self.vlmeval_args[self.vlmeval_args.index("--judge") + 1] if "--judge" in self.vlmeval_args[:-1] else None
        tiny_data.log_judge_notes([data], judge)
        state = prune_engine.get_state(loaded.model)
        with prune_engine.pruning(loaded.model, config):
            state.sink, state.samples = sink, 0  # records numbered from 1, as in a fresh runner
            try:
                sys.argv = ["vlmeval", "--model", name, "--data", data, "--work-dir", str(work), *self.vlmeval_args]
                vlmeval.run.main()
            finally:
                state.sink = None


def run(work: Path, plan: list[list[str]], runner_args: list[str], timing: bool) -> int:
    """Run the plan's cells, grouped by checkpoint in plan order; returns the number of failed cells."""
    import vlm_adapter

    (work / _common.SWEEP_DIR).mkdir(parents=True, exist_ok=True)
    with _output_to(work / _common.SWEEP_DIR / "one_load.log"):  # importing vlmeval logs an error about .env
        vlm_adapter.register_local_datasets()
    groups: dict[tuple[str, str, str], list[list[str]]] = {}
    for fields in plan:
        groups.setdefault((fields[2], fields[3], fields[4]), []).append(fields)
    failed = 0
    for (runner, model, path), cells in groups.items():
        group = Group(runner, model, path, runner_args, timing)
        for status, name, _, _, _, data, env_text in cells:
            if status.startswith("invalid"):  # the plan's checks refused it: never started
                logger.info("FAIL  %s  %s (not run: %s)", name, data, status.partition(": ")[2])
                failed += 1
                continue
            model_dir = work / name
            if status != "done":
                status = _common.cell_status(model_dir, name, data)
            if status == "done":
                logger.info("skip  %s  %s (done)", name, data)
                continue
            book = work / _common.SWEEP_DIR / name
            with _lock(book / "lock") as held:
                if not held:
                    logger.info("skip  %s (another sweep holds %s)", name, book / "lock")
                    continue
                (book / data).mkdir(parents=True, exist_ok=True)
                what = _common.carry_forward(model_dir, name, data) if model_dir.is_dir() else "new cell"
                saved = _common.saved_predictions(model_dir, name, data) if model_dir.is_dir() else 0
                records = model_dir / "prune_records.jsonl"
                logger.info("run   %s  %s (%s; %s)", name, data, status, what)
                ledger = _common.ledger_path(work, name)
                with open(ledger, "a") as f:
                    f.write(f"start\t{data}\t{_nlines(records)}\t{saved}\t{time.time():.6f}\t"
                            f"{group.command(work, data, env_text)}\n")
                rc = 0
                with _output_to(book / data / "run.log"), _in_dir(book / data):
                    try:
                        group.run_cell(work, name, data, env_text)
                    except Exception:  # noqa: BLE001 - one failed cell must not stop the sweep
                        traceback.print_exc()
                        rc = 1
                with open(ledger, "a") as f:
                    f.write(f"end\t{data}\t{_nlines(records)}\t{rc}\t{time.time():.6f}\n")
            if _common.cell_status(model_dir, name, data) != "done":
                logger.info("FAIL  %s  %s (exit %d, no score file; log: %s)", name, data, rc, book / data / "run.log")
                failed += 1
            else:
                logger.info("done  %s  %s", name, data)
    return failed


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    runner_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, runner_args = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--no-timing", action="store_true", help="do not set METHOD_TIME=1 PREFILL_TIME=1")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("sweep_one_load runs in one process; for torchrun use sweep.sh --nproc without --one-load")
    os.environ.pop("MMEVAL_ROOT", None)  # it would override --work-dir

    # Progress lines go to the original stdout; everything a cell prints goes to its run.log.
    progress = logging.StreamHandler(os.fdopen(os.dup(1), "w", buffering=1))
    progress.setFormatter(logging.Formatter("[sweep %(asctime)s] %(message)s", "%H:%M:%S"))
    logger.addHandler(progress)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")

    plan = [line.split("\t") for line in sys.stdin.read().splitlines() if line.strip()]
    bad = [f for f in plan if len(f) != 7]
    if bad:
        raise SystemExit(f"sweep_one_load: plan lines need 7 tab-separated fields, got {bad[0]}")
    sys.exit(1 if run(args.work_dir.resolve(), plan, runner_args, not args.no_timing) else 0)


if __name__ == "__main__":
    main()
