"""Find VTW's withdrawal layer K for a model, as the original's ``--findk`` does.

    python -m scripts.vtw_find_k --family llava --model llava-hf/llava-1.5-7b-hf \\
        --data $LMUData/MME.tsv --limit 20 --eta 0.003

For each of ``--limit`` samples and each layer d from ``--start`` to L-1, it compares the
last-position logits of the prompt with all visual tokens withdrawn at d against the unpruned
ones: KL(P_withdrawn || P_full) (``methods.vtw.vtw_kl``). K is ``--start`` plus the first layer
whose mean KL is <= ``--eta`` (0.003 for LLaVA-1.5-7B, 0.0005 for 13B, 0.0001 for v1.6-7B in the
original). Prints K and the ``INTRA_LLM_LAYER_SPECS`` that uses it; ``--out`` saves the KL matrix.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ensure_torchvision  # noqa: E402

ensure_torchvision()

import torch  # noqa: E402

FAMILY_MODULES = {"qwen2_5_vl": "custom_qwenvl", "internvl": "custom_internvl", "llava": "custom_llava",
                  "llava_next": "custom_llava_next"}
logger = logging.getLogger("vtw_find_k")


@torch.no_grad()
def kl_matrix(family_module, model, processor, messages, start: int, device) -> torch.Tensor:
    """``[n_samples, L - start]`` KL of withdrawal at each layer ``start..L-1``."""
    import prune_engine
    import vlm_adapter
    from methods.vtw import vtw_kl
    from utils import PruneConfig

    family_module.patch(model)
    layers = len(family_module.FAMILY.text_model(model).layers)
    if not 0 < start < layers:
        raise SystemExit(f"--start must be in 1..{layers - 1} for this {layers}-layer decoder")
    rows = []
    for message in messages:
        inputs = vlm_adapter.build_inputs(processor, message, device)
        full = model(**inputs).logits[0, -1]
        row = []
        for d in range(start, layers):
            with prune_engine.pruning(model, PruneConfig.from_env({"INTRA_LLM_LAYER_SPECS": f"{d}:vtw_intra_llm"})):
                row.append(vtw_kl(full, model(**inputs).logits[0, -1]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def main(argv: list[str] | None = None) -> int | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILY_MODULES))
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id")
    parser.add_argument("--data", required=True, type=Path, help="a VLMEvalKit TSV (e.g. $LMUData/MME.tsv)")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--eta", type=float, default=0.003)
    parser.add_argument("--start", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the KL matrix and K as JSON")
    args = parser.parse_args(argv)

    import vlm_adapter
    from methods.vtw import vtw_pick_layer

    family = importlib.import_module(FAMILY_MODULES[args.family])
    device = vlm_adapter.pick_device(args.device)
    model, processor = vlm_adapter.load_pretrained(family, args.model, device)
    with tempfile.TemporaryDirectory() as tmp:
        messages = vlm_adapter.messages_from_tsv(args.data, args.limit, Path(tmp))
        kl = kl_matrix(family, model, processor, messages, args.start, device)
    k = vtw_pick_layer(kl, args.eta, args.start)
    means = kl.mean(dim=0).tolist()
    for j, m in enumerate(means):
        logger.info("layer %d: mean KL %.6f", args.start + j, m)
    if args.out:
        args.out.write_text(json.dumps({"start": args.start, "eta": args.eta, "k": k, "kl": kl.tolist()}, indent=1))
    if k is None:
        logger.info("no layer reaches mean KL <= %g: VTW would change this model's answers at every layer", args.eta)
        return 1
    logger.info("K = %d  ->  INTRA_LLM_LAYER_SPECS=\"%d:vtw_intra_llm\"", k, k)
    return None


if __name__ == "__main__":
    sys.exit(main())
