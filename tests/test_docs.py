"""The README and docs/ say what works (issue #13): every relative link resolves, and every command
in their ``bash`` blocks runs as written, or is checked without a real checkpoint:

* ``python run_*.py ...`` runs with ``--dry-run`` (every check a runner makes before loading: the
  configuration, the checkpoint, the datasets; nothing loads) and must pass. The checkpoints named
  by hub id are found in a Hugging Face cache made here: the tiny checkpoints under the real ids,
  their ``config.json`` given the real decoder depth, so layer specs are checked against it;
* ``scripts/sweep.sh ...`` runs with ``--dry-run`` (the plan checks every cell the same way);
* ``python -m scripts.NAME ...`` that needs real data or hours (aggregate a real sweep, calibrate,
  train): its ``--help`` must work and list every flag the command uses;
* ``export`` / ``unset`` / ``VAR=value`` prefixes set the environment of the commands after them;
  ``python -c ...`` runs as written; ``make`` (the quick start: CI runs it) is not re-run here.

Placeholders a reader replaces (``/ckpts/qwen7b``, ``/path/to/ckpt``, ``/tmp/lmu``) are mapped to
the tiny checkpoint and a temporary folder. The README's commands run in a copy of the repository
with the README's new-method example written to ``methods/my_method.py`` (the checkout itself is
never written, so tests running beside this one see the registry they expect).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Blocks not run: they remake the shipped figures or retrain the proxies (checked by --help only
# would need no special case, but they also copy files into docs/ in a shell loop).
SKIP_BLOCKS = {("figures.md", "for f in "): "regenerates docs/*.png from a demo run"}
# Decoder depth of each hub checkpoint the runners know (the real models' config.json).
DEPTH = {
    "Qwen/Qwen2.5-VL-3B-Instruct": 36, "Qwen/Qwen2.5-VL-7B-Instruct": 28,
    "OpenGVLab/InternVL3-1B-hf": 24, "OpenGVLab/InternVL3-2B-hf": 28, "OpenGVLab/InternVL3-8B-hf": 28,
    "OpenGVLab/InternVL3-14B-hf": 48, "OpenGVLab/InternVL3-38B-hf": 64, "OpenGVLab/InternVL3-78B-hf": 80,
    "llava-hf/llava-1.5-7b-hf": 32, "llava-hf/llava-v1.6-vicuna-7b-hf": 32, "llava-hf/llava-v1.6-mistral-7b-hf": 32,
}


def bash_blocks(page: Path) -> list[str]:
    return [m.group(2) for m in re.finditer(r"```(bash|sh)\n(.*?)```", page.read_text(), re.S)]


def test_every_relative_link_resolves():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
            if "../shared" in target or not str(path).startswith(str(ROOT)):
                missing.append(f"{page.relative_to(ROOT)} -> {target} (outside the repository)")
    assert not missing, missing


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """A Hugging Face cache holding the tiny checkpoints under the real hub ids (real depths)."""
    from synthetic import tiny_checkpoints

    root = tmp_path_factory.mktemp("docs")
    tiny = {"Qwen": tiny_checkpoints.save_tiny_qwen(root / "tiny-qwen"),
            "OpenGVLab": tiny_checkpoints.save_tiny_internvl(root / "tiny-internvl"),
            "llava-hf/llava-1.5": tiny_checkpoints.save_tiny_llava(root / "tiny-llava"),
            "llava-hf/llava-v1.6": tiny_checkpoints.save_tiny_llava_next(root / "tiny-llava-next")}
    cache = root / "hf" / "hub"
    for hub_id, depth in DEPTH.items():
        snapshot = cache / f"models--{hub_id.replace('/', '--')}" / "snapshots" / "0"
        snapshot.mkdir(parents=True)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text("0")
        source = next(path for prefix, path in tiny.items() if hub_id.startswith(prefix))
        for f in source.iterdir():
            if f.name == "config.json":
                config = json.loads(f.read_text())
                config["text_config"]["num_hidden_layers"] = depth
                (snapshot / f.name).write_text(json.dumps(config))
            else:
                (snapshot / f.name).symlink_to(f)
    return {"root": root, "hf_home": root / "hf", "qwen": tiny["Qwen"]}


def _env(hub: dict[str, Path], root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEEP_", "PRUNE_", "INTRA_LLM", "MMEVAL_ROOT",
                                                                     "METHOD_TIME", "PREFILL_TIME", "OPENAI", "LMUData"))}
    env.update(HF_HOME=str(hub["hf_home"]), HF_HUB_OFFLINE="1", PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    return env


def _logical_lines(block: str) -> list[str]:
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _check_command(line: str, env: dict[str, str], hub: dict[str, Path], where: str, root: Path) -> dict[str, str]:
    """Run or check one command; returns the environment for the next ones."""
    placeholders = {"/ckpts/qwen7b": str(hub["qwen"]), "/path/to/ckpt": str(hub["qwen"]),
                    "/tmp/lmu": str(hub["root"] / "lmu")}
    for old, new in placeholders.items():
        line = line.replace(old, new)
    words = shlex.split(line, comments=True)
    if not words:
        return env
    if words[0] in ("export", "unset"):
        out = subprocess.run(["bash", "-c", f"{line}\nenv -0"], env=env, capture_output=True, text=True, cwd=root)
        assert out.returncode == 0, (where, line, out.stderr)
        return dict(item.split("=", 1) for item in out.stdout.split("\0") if "=" in item)
    if words[0] in ("make", "wait"):
        return env
    env = dict(env)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if "&" in words:  # a job in the background (then `wait`): checked in the foreground
        words = words[: words.index("&")]
    if words[0] in ("python", ".venv/bin/python"):
        words[0] = sys.executable
    if words[0] == sys.executable and words[1:2] == ["-c"]:
        cmd = words
    elif words[0] == sys.executable and words[1].startswith("run_") and words[1].endswith(".py"):
        cmd = [*words, "--dry-run"]
    elif words[0] == "scripts/sweep.sh":
        cmd = list(words)
        if "--dry-run" not in cmd:
            cmd.insert(cmd.index("--") if "--" in cmd else len(cmd), "--dry-run")
        env.setdefault("PYTHON", sys.executable)
    elif words[0] == sys.executable and words[1] == "-m" and words[2].startswith("scripts."):
        help_out = subprocess.run([sys.executable, "-m", words[2], "--help"], env=env, cwd=root, capture_output=True, text=True)
        assert help_out.returncode == 0, (where, line, help_out.stderr[-2000:])
        flags = {w.split("=")[0] for w in words[3:] if w.startswith("--")}
        unknown = sorted(f for f in flags if f not in help_out.stdout)
        assert not unknown, (where, line, unknown)
        return env
    else:
        raise AssertionError(f"{where}: no rule for the command {line!r}: teach tests/test_docs.py how to check it")
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (where, line, proc.stdout[-2000:], proc.stderr[-3000:])
    return env


def _readme_example_method() -> str:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(# methods/my_method\.py\n.*?)```", readme, re.S)
    assert block, "the README's new-method example is not where the test looks for it"
    return block.group(1)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_command_runs_or_checks(page, hub, tmp_path):
    blocks = bash_blocks(page)
    root = ROOT
    if page.name == "README.md":  # its commands use the new-method example: run them in a copy
        root = tmp_path / "checkout"
        shutil.copytree(ROOT, root, ignore=shutil.ignore_patterns(
            ".git", ".venv", "__pycache__", "outputs", "demo_outputs", "bench_results", "*.pyc"))
        if (ROOT / ".venv").exists():  # commands that name .venv/bin/python find the same environment
            (root / ".venv").symlink_to(ROOT / ".venv")
        assert not (root / "methods" / "my_method.py").exists(), "methods/my_method.py exists in the checkout: move it away"
        (root / "methods" / "my_method.py").write_text(_readme_example_method())
    for n, block in enumerate(blocks):
        if any(page.name == f and marker in block for f, marker in SKIP_BLOCKS):
            continue
        env = _env(hub, root)
        for line in _logical_lines(block):
            env = _check_command(line, env, hub, f"{page.name} block {n}", root)
