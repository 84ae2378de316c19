"""The three measurements ``tests/test_proxy_models.py`` pins on the shipped proxy checkpoints,
printed per family (the README quotes them):

    python -m scripts.proxy_checks            # all three families, 40 held-out scenes (seed 7) each

* ``vanilla``: held-out accuracy per question type, no pruning;
* ``blank 0.5``: a check-only method keeps half the visual tokens, all of them cells with no
  object (from the scene's true labels): what survives is what the background alone tells;
* ``random 0.111``: ``random_pre_llm`` at 11 % (``PRUNE_SEED=0``).

Each model is loaded through the harness's ``from_pretrained`` path and pruned by the engine; the
accuracy is the greedy first answer token (:func:`scripts.train_proxy.heldout_accuracy`, batch 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

import torch  # noqa: E402

import methods  # noqa: E402
from synthetic import proxy_data as P  # noqa: E402
from scripts.train_proxy import heldout_accuracy, load  # noqa: E402
from utils import PruneConfig  # noqa: E402

CHECKPOINTS = {"qwen2_5_vl": "qwen", "internvl3": "internvl", "llava1_5": "llava"}  # folder -> family
N, SEED = 40, 7  # held-out scenes per measurement and their seed
BLANK = "keep_blank_background_pre_llm"
RANDOM_011 = {"KEEP_RATIO": "0.111", "PRUNE_METHOD_PRE_LLM": "random_pre_llm", "PRUNE_SEED": "0"}
BLANK_05 = {"KEEP_RATIO": "0.5", "PRUNE_METHOD_PRE_LLM": BLANK}


def load_proxy(folder: str):
    """``(family module, patched model, processor)`` of a shipped checkpoint."""
    import importlib

    from scripts.train_proxy import FAMILY_MODULES

    family = CHECKPOINTS[folder]
    model, processor = load(family, ROOT / "synthetic" / "proxy_checkpoints" / folder)
    module = importlib.import_module(FAMILY_MODULES[family])
    module.patch(model)
    return module, model, processor


@contextlib.contextmanager
def blank_background_method() -> Iterator[Callable[[list], None]]:
    """Register :data:`BLANK` while the block runs; yields the ``on_batch`` hook that gives it the
    current scene's labels (batch 1). It keeps the first ``keep`` tokens whose cell is empty."""
    current: dict[str, torch.Tensor] = {}

    @methods.register_prune(BLANK, stage="pre_llm")
    def keep_blank(ctx, keep):
        empty = torch.nonzero(current["shape"][ctx.token_index] == 0).flatten()
        if len(empty) < keep:
            raise ValueError(f"only {len(empty)} empty cells for a budget of {keep}")
        return empty[:keep]

    def on_batch(scenes: list) -> None:
        (scene,) = scenes
        current["shape"] = torch.from_numpy(P.token_labels(scene)["shape"])

    try:
        yield on_batch
    finally:
        methods._REGISTRY.pop(BLANK, None)


def measure(module, model, processor, env: dict[str, str] | None = None, on_batch=None) -> dict[str, float]:
    """Held-out accuracy per type under the configuration ``env`` (none: vanilla)."""
    module.patch(model, PruneConfig.from_env(env or {}))
    try:
        with torch.no_grad():
            return heldout_accuracy(model, processor, n=N, seed=SEED, batch=1, on_batch=on_batch)
    finally:
        module.patch(model, PruneConfig())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", choices=list(CHECKPOINTS), default=list(CHECKPOINTS))
    args = parser.parse_args(argv)
    print("| checkpoint | measurement | " + " | ".join(P.TYPES) + " |\n|" + "---|" * (2 + len(P.TYPES)))
    for folder in args.checkpoints:
        proxy = load_proxy(folder)
        with blank_background_method() as on_batch:
            rows = {"vanilla": measure(*proxy), "blank 0.5": measure(*proxy, BLANK_05, on_batch=on_batch),
                    "random 0.111": measure(*proxy, RANDOM_011)}
        for name, acc in rows.items():
            print(f"| {folder} | {name} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in P.TYPES) + " |")


if __name__ == "__main__":
    main()
