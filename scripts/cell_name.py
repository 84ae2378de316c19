"""Names and states of sweep cells, for ``scripts/sweep.sh`` (so bash never re-implements the naming).

A cell is one model x pruning configuration x dataset. Its VLMEvalKit model name is the one the
runner registers (``vlm_adapter.model_name``): ``<display>[__<protocol tag>]__<PruneConfig tag or
vanilla>``, where ``<display>`` is ``--model`` (or a checkpoint folder's name) and the protocol
comes from the runner flags (``--protocol``, ``--vlmeval-model``, ``--max-new-tokens``).

    # the model name of the configuration in the environment (runner flags after --)
    KEEP_RATIO=0.111 PRUNE_METHOD_PRE_LLM=divprune_pre_llm python -m scripts.cell_name name --runner run_qwenvl2_5.py --model Qwen2.5-VL-7B-Instruct
    # plan: reads cells (tab-separated: runner, model, model path or -, dataset, space-separated
    # KEY=VALUE pruning variables) on stdin; prints "status name runner model path dataset vars",
    # dropping repeated (name, dataset) pairs; status "invalid: <why>" for a cell its runner would
    # refuse before loading (configuration, checkpoint folder, depth, family, dataset name)
    python -m scripts.cell_name plan --work-dir outputs/sweep [-- RUNNER FLAGS] < cells.tsv
    python -m scripts.cell_name status --work-dir W --name NAME --data MME   # done / partial / todo
    python -m scripts.cell_name resume --work-dir W --name NAME --data MME [--nproc N]  # "<saved>\\t<what was done>"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import _common  # noqa: E402


def model_name(runner: str, model: str, model_path: str | None, env: dict[str, str] | None,
               runner_args: list[str]) -> str:
    """The runner's VLMEvalKit model name for ``--model model [--model-path model_path]`` and the
    runner flags ``runner_args`` under ``env`` (None: a configuration that cannot be parsed, named
    ``<display>[__<protocol tag>]__?``)."""
    import importlib

    import vlm_adapter
    from utils import PruneConfig

    family = importlib.import_module(RUNNERS[Path(runner).name][0])
    options = vlm_adapter.RunOptions.pop_from(list(runner_args))
    # The display name is resolve_checkpoint's; a stub family accepts any name (the runner itself
    # rejects unknown ones).
    stub = SimpleNamespace(CHECKPOINTS={model: model}, FAMILY=SimpleNamespace(name="any"))
    display, _ = vlm_adapter.resolve_checkpoint(stub, model, model_path or None)
    protocol = vlm_adapter.resolve_protocol(family, display, options)
    if env is None:
        return "__".join(p for p in (display, protocol.tag(display), "?") if p)
    return vlm_adapter.model_name(display, PruneConfig.from_env(env), protocol)


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad pruning variable {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


# runner -> (family module, its Family.name, the config.json model types its MODEL_CLASS loads), so the
# plan checks checkpoint folders without importing the model classes (a test checks it against them).
RUNNERS = {
    "run_qwenvl2_5.py": ("custom_qwenvl", "qwen2_5_vl", ("qwen2_5_vl",)),
    "run_internvl3.py": ("custom_internvl", "internvl", ("internvl",)),
    "run_llava.py": ("custom_llava", "llava", ("llava",)),
    "run_llava_next.py": ("custom_llava_next", "llava_next", ("llava_next",)),
}


class _Checks:
    """The checks a runner makes before loading (``utils.check_checkpoint``, ``PruneConfig.validate_for``,
    ``utils.check_datasets``), made once per checkpoint and dataset for the whole plan."""

    def __init__(self) -> None:
        self.checkpoints: dict[tuple[str, str, str], object] = {}
        self.datasets: dict[str, str | None] = {}
        self.notes: list[str] = []

    def checkpoint(self, runner: str, model: str, path: str):
        """``CheckpointInfo``, or None when it cannot be checked here (a hub id not in the local cache);
        raises ``ConfigError``."""
        key = (runner, model, path)
        if key not in self.checkpoints:
            import importlib

            from utils import CheckpointNotLocal, ConfigError, check_checkpoint

            module, family, types = RUNNERS[runner]
            try:
                target = path if path != "-" else model
                if not Path(target).is_dir() and path == "-":  # a name the runner knows: its hub id
                    import vlm_adapter

                    try:
                        _, target = vlm_adapter.resolve_checkpoint(importlib.import_module(module), model, None)
                    except SystemExit as e:  # the runner's own message for an unknown name
                        raise ConfigError(str(e)) from None
                self.checkpoints[key] = check_checkpoint(target, family, types)
            except CheckpointNotLocal as e:
                self.notes.append(f"note: {e} (the cells of {model} are checked when they run)")
                self.checkpoints[key] = None
            except ConfigError as e:
                self.checkpoints[key] = e
        found = self.checkpoints[key]
        if isinstance(found, Exception):
            raise found
        return found

    def dataset(self, data: str) -> None:
        if data not in self.datasets:
            import os

            from utils import ConfigError, check_datasets

            try:
                # LMUData is VLMEvalKit's variable, read as it reads it; importing vlmeval (only for a name
                # without a TSV there) logs an error about a missing .env file: kept out of the plan's output.
                with contextlib.redirect_stderr(io.StringIO()):
                    check_datasets([data], lmu_root=os.environ.get("LMUData"))
                self.datasets[data] = None
            except ConfigError as e:
                self.datasets[data] = str(e)
        if self.datasets[data] is not None:
            from utils import ConfigError

            raise ConfigError(self.datasets[data])


def plan(work: Path, lines: list[str], runner_args: list[str] | None = None, checks: _Checks | None = None) -> list[str]:
    """Plan lines (``status name runner model path dataset vars``) for cell lines. A cell that its
    runner would refuse before loading (the configuration, the checkpoint folder, the depth and
    family, the dataset name; see ``utils.check_before_loading``) gets the status
    ``invalid: <why>`` (and, when its configuration cannot even be parsed, the name
    ``<display>__?``); the others ``done``, ``partial`` or ``todo``."""
    from methods import UnknownMethodError
    from utils import ConfigError, PruneConfig

    checks = checks or _Checks()
    out, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 5:
            raise SystemExit(f"cell line {n}: expected 5 tab-separated fields, got {len(fields)}: {line!r}")
        runner, model, path, data, env_text = fields
        env = parse_env(env_text)
        try:
            name = model_name(runner, model, None if path == "-" else path, env, runner_args or [])
        except (ConfigError, UnknownMethodError) as e:
            name, problem = model_name(runner, model, None if path == "-" else path, None, runner_args or []), e
        else:
            problem = None
            try:
                info = checks.checkpoint(runner, model, path)
                if info is not None:
                    PruneConfig.from_env(env).validate_for(info.num_layers, RUNNERS[runner][1])
                checks.dataset(data)
            except ConfigError as e:
                problem = e
        if (name, data) in seen:
            continue  # e.g. a deterministic method listed with several seeds: the tag has no seed
        seen.add((name, data))
        if problem is not None:
            status = "invalid: " + " ".join(str(problem).split())
        else:
            status = _common.cell_status(work / name, name, data)
        out.append("\t".join([status, name, runner, model, path, data, env_text]))
    for note in checks.notes:
        print(note, file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    runner_args: list[str] = []
    if "--" in argv:
        argv, runner_args = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("name", help="model name of the configuration in the environment")
    p.add_argument("--runner", required=True, help="run_qwenvl2_5.py, run_internvl3.py, run_llava.py or run_llava_next.py")
    p.add_argument("--model", required=True)
    p.add_argument("--model-path")
    p = sub.add_parser("plan", help="cells on stdin -> plan on stdout")
    p.add_argument("--work-dir", type=Path, required=True)
    for cmd in ("status", "resume"):
        p = sub.add_parser(cmd)
        p.add_argument("--work-dir", type=Path, required=True)
        p.add_argument("--name", required=True)
        p.add_argument("--data", required=True)
        if cmd == "resume":
            p.add_argument("--nproc", type=int, default=1, help="processes (torchrun ranks) of the coming run")
    args = parser.parse_args(argv)

    if args.cmd == "name":
        import os

        print(model_name(args.runner, args.model, args.model_path, dict(os.environ), runner_args))  # as the runner reads it
    elif args.cmd == "plan":
        for line in plan(args.work_dir, sys.stdin.read().splitlines(), runner_args):
            print(line)
    elif args.cmd == "status":
        print(_common.cell_status(args.work_dir / args.name, args.name, args.data))
    elif args.cmd == "resume":
        model_dir = args.work_dir / args.name
        what = _common.carry_forward(model_dir, args.name, args.data, args.nproc) if model_dir.is_dir() else "new cell"
        saved = _common.saved_predictions(model_dir, args.name, args.data, args.nproc) if model_dir.is_dir() else 0
        print(f"{saved}\t{what}")


if __name__ == "__main__":
    main()
