"""Names and states of sweep cells, for ``scripts/sweep.sh`` (so bash never re-implements the naming).

A cell is one model x pruning configuration x dataset. Its VLMEvalKit model name is the one the
runner registers (``vlm_adapter.model_name``): ``<display>[__<protocol tag>]__<PruneConfig tag or
vanilla>``, where ``<display>`` is ``--model`` (or a checkpoint folder's name) and the protocol
comes from the runner flags (``--protocol``, ``--vlmeval-model``, ``--max-new-tokens``).

    # the model name of the configuration in the environment (runner flags after --)
    KEEP_RATIO=0.111 PRUNE_METHOD_PRE_LLM=divprune_pre_llm python -m scripts.cell_name name --runner run_qwenvl2_5.py --model Qwen2.5-VL-7B-Instruct
    # plan: reads cells (tab-separated: runner, model, model path or -, dataset, space-separated
    # KEY=VALUE pruning variables) on stdin; prints "status name runner model path dataset vars",
    # validating every configuration and dropping repeated (name, dataset) pairs
    python -m scripts.cell_name plan --work-dir outputs/sweep [-- RUNNER FLAGS] < cells.tsv
    python -m scripts.cell_name status --work-dir W --name NAME --data MME   # done / partial / todo
    python -m scripts.cell_name resume --work-dir W --name NAME --data MME [--nproc N]  # "<saved>\\t<what was done>"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import _common  # noqa: E402


RUNNER_FAMILY = {"run_qwenvl2_5.py": "custom_qwenvl", "run_internvl3.py": "custom_internvl", "run_llava.py": "custom_llava",
                 "run_llava_next.py": "custom_llava_next"}


def model_name(runner: str, model: str, model_path: str | None, env: dict[str, str], runner_args: list[str]) -> str:
    """The runner's VLMEvalKit model name for ``--model model [--model-path model_path]`` and the
    runner flags ``runner_args`` under ``env``."""
    import importlib

    import vlm_adapter
    from utils import PruneConfig

    family = importlib.import_module(RUNNER_FAMILY[Path(runner).name])
    options = vlm_adapter.RunOptions.pop_from(list(runner_args))
    # The display name is resolve_checkpoint's; a stub family accepts any name (the runner itself
    # rejects unknown ones).
    stub = SimpleNamespace(CHECKPOINTS={model: model}, FAMILY=SimpleNamespace(name="any"))
    display, _ = vlm_adapter.resolve_checkpoint(stub, model, model_path or None)
    protocol = vlm_adapter.resolve_protocol(family, display, options)
    return vlm_adapter.model_name(display, PruneConfig.from_env(env), protocol)


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"bad pruning variable {item!r}: expected KEY=VALUE")
        env[key] = value
    return env


def plan(work: Path, lines: list[str], runner_args: list[str] | None = None) -> list[str]:
    from utils import ConfigError

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
        except ConfigError as e:
            raise SystemExit(f"cell {model} / {env_text or 'vanilla'} / {data}: {e}") from None
        if (name, data) in seen:
            continue  # e.g. a deterministic method listed with several seeds: the tag has no seed
        seen.add((name, data))
        status = _common.cell_status(work / name, name, data)
        out.append("\t".join([status, name, runner, model, path, data, env_text]))
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
        saved = _common.saved_predictions(model_dir, args.name, args.data) if model_dir.is_dir() else 0
        print(f"{saved}\t{what}")


if __name__ == "__main__":
    main()
