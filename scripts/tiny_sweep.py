"""The tiny sweep: every family's tiny checkpoint (Qwen2.5-VL, InternVL3, LLaVA-1.5, LLaVA-NeXT) x the
tiny datasets of all ten formats, end to end through ``scripts/sweep.sh``, ``scripts/aggregate.py``
and ``scripts/plots.py`` (CPU, minutes).

    python -m scripts.tiny_sweep outputs/tiny_sweep                       # vanilla + FastV at 0.5
    python -m scripts.tiny_sweep outputs/tiny_sweep --ratios "0.5 0.25" \\
        --methods "vanilla pre:divprune_pre_llm intra:fastv_intra_llm"     # the README's sample

It writes the tiny checkpoints (``tiny_checkpoints``, random weights: the scores only show that
each number arrives where it belongs) and the twelve ``<NAME>_tiny`` TSVs at their smallest size
(``tiny_data.write_tiny(name, n=1)``: 58 samples), then sweeps as a user sweeps real datasets
(see ``scripts/sweep_example.conf``): once with ``--judge exact_matching`` over the nine
rule-scored datasets, and once with ``--judge gpt-4o-mini`` over MathVista_MINI, MathVision_MINI
and MIA-Bench, whose judge is a local OpenAI-compatible stub (:class:`StubJudge`) configured through
``OPENAI_API_KEY`` / ``OPENAI_API_BASE`` as a user's judge server would be. Cells run with
``--one-load`` (each checkpoint loaded once) unless ``--per-cell`` asks for one runner per cell.
Tables and plots land in ``<out>/work/_report/``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

from synthetic import tiny_data  # noqa: E402

logger = logging.getLogger("tiny_sweep")

FAMILIES = {"qwen": "save_tiny_qwen", "internvl": "save_tiny_internvl", "llava": "save_tiny_llava",
            "llava_next": "save_tiny_llava_next"}
JUDGED = [f"{name}{tiny_data.TINY_SUFFIX}" for name in tiny_data.JUDGE_REQUIRED]
EXACT = [name for name in tiny_data.TINY_DATASETS if name not in JUDGED]
JUDGE = "gpt-4o-mini"
DEFAULT_METHODS = "vanilla intra:fastv_intra_llm"
DEFAULT_RATIOS = "0.5"


class StubJudge(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint standing in for a judge: answer-extraction prompts
    (MathVista, MathVision) get the model's response back verbatim, MIA-Bench grading prompts a fixed
    grade (5/10), anything else (VLMEvalKit's liveness check) "Hello". Every prompt it answered is
    kept in ``prompts`` (the tests read them)."""

    prompts: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = payload["messages"][-1]["content"]
        text = content if isinstance(content, str) else "\n".join(c.get("text", "") for c in content)
        type(self).prompts.append(text)
        if "Extracted answer:" in text:
            answer = text.rsplit("Model respone: ", 1)[-1].rsplit("Extracted answer:", 1)[0].strip()
        elif "You need to grade" in text:
            answer = "score of component 1: 1/2, total score: 5/10. Stub grade."
        else:
            answer = "Hello"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def stub_judge() -> Iterator[str]:
    """Serve :class:`StubJudge` on a free local port; yields its chat-completions URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    finally:
        server.shutdown()
        server.server_close()


def prepare(out: Path, families: list[str], checkpoints: dict[str, Path] | None = None) -> dict[str, Path]:
    """Write the twelve tiny TSVs (``<out>/lmu``) and the missing tiny checkpoints; ``{family: path}``."""
    from synthetic import tiny_checkpoints

    for name in tiny_data.TINY_DATASETS:
        tiny_data.write_tiny(name, out / "lmu", n=1)
    ckpts = dict(checkpoints or {})
    for family in families:
        if family not in ckpts:
            path = out / f"tiny-{family}"
            ckpts[family] = path if (path / "config.json").exists() else getattr(tiny_checkpoints, FAMILIES[family])(path)
    return {f: ckpts[f] for f in families}


def sweep(out: Path, ckpts: dict[str, Path], datasets: list[str], methods: str, ratios: str, runner_args: list[str],
          env: dict[str, str], python: str, flags: list[str]) -> subprocess.CompletedProcess:
    cmd = ["bash", str(ROOT / "scripts" / "sweep.sh"), "--methods", methods, "--ratios", ratios, "--seeds", "0",
           "--datasets", " ".join(datasets), "--work-dir", str(out / "work"), "--python", python, *flags]
    for family, path in ckpts.items():
        cmd += ["--model", f"{family} {path}"]
    logger.info("%s", " ".join(cmd))
    return subprocess.run([*cmd, "--", *runner_args], env=env, cwd=out, capture_output=True, text=True)


def run(out: Path, families: list[str] = list(FAMILIES), methods: str = DEFAULT_METHODS, ratios: str = DEFAULT_RATIOS,
        checkpoints: dict[str, Path] | None = None, python: str = sys.executable, one_load: bool = True,
        max_new_tokens: int = 2, warmup: int = 1, protocol: str = "vlmeval") -> dict[str, Any]:
    """Prepare, sweep (exact-matching datasets, then the judged ones), aggregate and plot.

    Returns ``{"checkpoints", "sweeps": [CompletedProcess, CompletedProcess], "report": aggregate's
    result, "plots": [PNG paths], "work", "out"}``; raises when a sweep fails.
    """
    from scripts import aggregate, plots

    out = Path(out).resolve()
    ckpts = prepare(out, families, checkpoints)
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM", "MMEVAL_ROOT")) and k not in tiny_data.JUDGE_ENV_VARS}
    base.update(LMUData=str(out / "lmu"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS=base.get("OMP_NUM_THREADS", "1"))
    flags = ["--one-load"] if one_load else []
    common = ["--protocol", protocol, "--max-new-tokens", str(max_new_tokens)]
    procs = [sweep(out, ckpts, EXACT, methods, ratios, ["--judge", "exact_matching", *common], base, python, flags)]
    with stub_judge() as url:
        judge_env = {**base, "OPENAI_API_KEY": "sk-tiny-sweep-stub", "OPENAI_API_BASE": url, "NO_PROXY": "127.0.0.1"}
        procs.append(sweep(out, ckpts, JUDGED, methods, ratios, ["--judge", JUDGE, "--api-nproc", "1", *common],
                           judge_env, python, flags))
    for proc in procs:
        if proc.returncode != 0:
            raise RuntimeError(f"sweep failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    work = out / "work"
    report = aggregate.aggregate(work, work / "_report", warmup=warmup)
    paths = plots.make_plots(work, work / "_report" / "plots", report["cells"])
    return {"checkpoints": ckpts, "sweeps": procs, "report": report, "plots": paths, "work": work, "out": out}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"sweep.sh --methods (default {DEFAULT_METHODS!r})")
    parser.add_argument("--ratios", default=DEFAULT_RATIOS, help=f"sweep.sh --ratios (default {DEFAULT_RATIOS!r})")
    parser.add_argument("--per-cell", action="store_true", help="one runner process per cell (sweep.sh without --one-load)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="FAMILY=PATH",
                        help="use this checkpoint folder for FAMILY instead of a random tiny one (e.g. a trained proxy)")
    parser.add_argument("--warmup", type=int, default=1, help="aggregate --warmup (default 1: the datasets are tiny)")
    parser.add_argument("--protocol", choices=("vlmeval", "chat_template"), default="vlmeval",
                        help="the runners' --protocol (default: VLMEvalKit's wrapper of each family's reference model)")
    args = parser.parse_args(argv)
    ckpts = {}
    for item in args.checkpoint:
        family, sep, path = item.partition("=")
        if not sep or family not in FAMILIES:
            parser.error(f"--checkpoint {item!r}: expected FAMILY=PATH with FAMILY in {', '.join(FAMILIES)}")
        ckpts[family] = Path(path).resolve()
    result = run(args.out, args.families, args.methods, args.ratios, checkpoints=ckpts, one_load=not args.per_cell,
                 warmup=args.warmup, protocol=args.protocol)
    for proc in result["sweeps"]:
        sys.stdout.write(proc.stdout)
    print(result["work"] / "_report" / "report.md")
    for p in result["plots"]:
        print(p)


if __name__ == "__main__":
    main()
