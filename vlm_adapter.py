"""VLMEvalKit integration: a device-agnostic model adapter and the runner shared by ``run_*.py``.

``main(family_module, argv)`` does what a runner script does:
  1. reads the pruning configuration (:meth:`utils.PruneConfig.from_env`, fails fast on bad input);
  2. resolves each ``--model`` (a name users type, a local checkpoint folder, or ``--model-path``);
  3. registers an adapter under ``<model>`` or ``<model>__<config tag>`` in
     ``vlmeval.config.supported_VLM`` and rewrites ``--model`` to that name, so two pruning
     configurations never share cached predictions;
  4. hands over to ``vlmeval.run.main()`` with every other flag untouched.

Outputs: VLMEvalKit's usual files under ``<work-dir>/<model name>/``, plus ``prune_config.json``
(the resolved configuration) and ``prune_records.jsonl`` (one record per sample: prefill ms, the
pruning events with their kept positions and method ms) in that folder; with ``METHOD_TIME`` /
``PREFILL_TIME`` the seed's ``method_times_<method>.txt`` / ``prefill_times.txt`` lines are
appended in the current directory (format: :class:`utils.TimingSink`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from utils import ensure_torchvision

ensure_torchvision()

import torch  # noqa: E402

from utils import PruneConfig, TimingSink  # noqa: E402

logger = logging.getLogger(__name__)

def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pretrained(family: ModuleType, path: str, device: torch.device, dtype: str = "auto"):
    """``from_pretrained`` of the family's model class and ``AutoProcessor`` (the real-checkpoint path)."""
    from transformers import AutoProcessor

    torch_dtype = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if torch_dtype == "auto" and device.type == "cpu":
        torch_dtype = torch.float32  # half precision on CPU is slow and changes selections
    model = family.MODEL_CLASS.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


def build_inputs(processor: Any, message: list[dict[str, str]], device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for a VLMEvalKit message (``[{'type': 'image'|'text', 'value': ...}, ...]``,
    images as file paths) through the checkpoint's own chat template and processor."""
    from PIL import Image

    content, images = [], []
    for part in message:
        if part["type"] == "image":
            content.append({"type": "image"})
            images.append(Image.open(part["value"]).convert("RGB"))
        elif part["type"] == "text":
            content.append({"type": "text", "text": part["value"]})
        else:
            raise ValueError(f"unsupported message part {part['type']!r}")
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return processor(text=[prompt], images=images or None, return_tensors="pt").to(device)


def messages_from_tsv(path: Path, limit: int, workdir: Path) -> list[list[dict[str, str]]]:
    """The first ``limit`` (image, question) messages of a VLMEvalKit TSV (base64 ``image`` column)."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    rows = pd.read_csv(path, sep="\t").head(limit)
    images: dict[str, str] = {}
    out = []
    for _, row in rows.iterrows():
        data = str(row["image"])
        if data not in images and len(data) < 64 and data in set(rows["index"].astype(str)):
            data = str(rows[rows["index"].astype(str) == data].iloc[0]["image"])  # MME's image reuse
        if data not in images:
            file = workdir / f"{len(images)}.png"
            Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").save(file)
            images[data] = str(file)
        out.append([{"type": "image", "value": images[data]}, {"type": "text", "value": str(row["question"])}])
    return out


@functools.cache
def make_adapter_class():
    from vlmeval.vlm.base import BaseModel

    class PrunedVLM(BaseModel):
        """A Hugging Face VLM of one family, patched with the pruning engine, for VLMEvalKit."""

        INSTALL_REQ = False
        INTERLEAVE = True

        def __init__(
            self,
            family: ModuleType,
            model_path: str,
            config: PruneConfig,
            sink: TimingSink | None = None,
            max_new_tokens: int = 128,
            device: str | None = None,
            dtype: str = "auto",
            loaded: "LoadedModel | None" = None,
            **kwargs: Any,
        ) -> None:
            super().__init__()
            self.max_new_tokens = max_new_tokens
            if loaded is not None:  # one load, several configurations: the caller configures the model
                self.model, self.processor, self.device = loaded.model, loaded.processor, loaded.device
                return
            self.device = pick_device(device)
            self.model, self.processor = load_pretrained(family, model_path, self.device, dtype)
            family.patch(self.model, config, sink)
            logger.info("loaded %s on %s; pruning: %s", model_path, self.device, config.tag() or "none")

        def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
            # Which sample this is, for the per-sample record (the image file names carry the row index).
            self.model._prune_state.sample_info = {
                "dataset": dataset, "images": [p["value"] for p in message if p["type"] == "image"],
            }
            inputs = build_inputs(self.processor, message, self.device)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            return self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()

    return PrunedVLM


def _pop_flag(argv: list[str], flag: str) -> str | None:
    """Remove ``flag value`` / ``flag=value`` from ``argv``; return the value."""
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _flag_values(argv: list[str], flag: str) -> tuple[int, int]:
    """The slice ``[start, end)`` of ``argv`` holding the values of a multi-valued ``flag``."""
    start = argv.index(flag) + 1
    end = start
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    return start, end


def resolve_checkpoint(family: ModuleType, name: str, model_path: str | None) -> tuple[str, str]:
    """``(display name, path or hub id)`` for a ``--model`` value."""
    if model_path:
        return name, model_path
    if Path(name).is_dir():
        return Path(name).resolve().name, str(Path(name).resolve())
    if name in family.CHECKPOINTS:
        return name, family.CHECKPOINTS[name]
    known = ", ".join(sorted(family.CHECKPOINTS))
    raise SystemExit(
        f"unknown model {name!r} for {family.FAMILY.name}: use one of {known}, a checkpoint folder, or --model-path DIR"
    )


def model_name(display: str, config: PruneConfig) -> str:
    """The model name VLMEvalKit sees (and its output folder): ``<display>__<config tag>``, or
    ``<display>`` unpruned, so two configurations never share cached predictions."""
    return f"{display}__{config.tag()}" if config.tag() else display


def _cpu_distributed() -> None:
    """VLMEvalKit's run.main() calls torch.cuda.set_device and NCCL when WORLD_SIZE > 1; on a CPU
    machine make the first a no-op and use gloo, so ``torchrun`` works without a GPU."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    torch.cuda.set_device = lambda *a, **k: None
    init = dist.init_process_group

    def init_gloo(*args: Any, **kwargs: Any) -> None:
        kwargs["backend"] = "gloo"
        init(*args, **kwargs)

    dist.init_process_group = init_gloo


def register_local_datasets() -> list[str]:
    """Register the datasets this project writes itself with vlmeval: the tiny copies of the paper's
    ten (``<NAME>_tiny``) and the proxy suite (``Proxy_MCQ``, ...). Every process that runs
    VLMEvalKit calls it (the runners, the one-load sweep)."""
    from synthetic import proxy_data
    from synthetic import tiny_data

    return tiny_data.register_tiny_datasets() + proxy_data.register_datasets()


def main(family: ModuleType, argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    config = PruneConfig.from_env()
    logger.info("pruning configuration: %s", json.dumps(config.to_dict()))
    model_path = _pop_flag(argv, "--model-path")
    max_new_tokens = int(_pop_flag(argv, "--max-new-tokens") or 128)
    device = _pop_flag(argv, "--device")
    dtype = _pop_flag(argv, "--dtype") or "auto"
    if "--model" not in argv:
        raise SystemExit("--model is required (a model name, or a checkpoint folder)")

    from synthetic import tiny_data
    import vlmeval.config
    import vlmeval.run

    register_local_datasets()
    if "--data" in argv:  # say which datasets need an LLM judge for their official score
        start, end = _flag_values(argv, "--data")
        judge = argv[argv.index("--judge") + 1] if "--judge" in argv[:-1] else None
        tiny_data.log_judge_notes(argv[start:end], judge)
    _cpu_distributed()
    work_dir = Path(os.environ.get("MMEVAL_ROOT") or _pop_flag(argv, "--work-dir") or "./outputs")
    start, end = _flag_values(argv, "--model")
    for i in range(start, end):
        display, path = resolve_checkpoint(family, argv[i], model_path)
        argv[i], _ = register(family, display, path, config, work_dir, Path.cwd(),
                              max_new_tokens=max_new_tokens, device=device, dtype=dtype)
    sys.argv = [sys.argv[0], *argv, "--work-dir", str(work_dir)]
    vlmeval.run.main()


@dataclass
class LoadedModel:
    """A checkpoint loaded and patched once, serving several configurations one after another
    (``scripts/sweep_one_load.py`` switches them with :func:`prune_engine.pruning`)."""

    model: torch.nn.Module
    processor: Any
    device: torch.device


def register(
    family: ModuleType, display: str, path: str, config: PruneConfig, work_dir: Path, text_dir: Path,
    loaded: LoadedModel | None = None, **adapter_kwargs: Any,
) -> tuple[str, TimingSink]:
    """Register the adapter of one configuration with VLMEvalKit under :func:`model_name` and write
    ``<work_dir>/<name>/prune_config.json``; returns the name and the sink of its records (timing
    files in ``text_dir``). With ``loaded``, the adapter wraps that model instead of loading one."""
    import vlmeval.config

    name = model_name(display, config)
    out = work_dir / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_config.json").write_text(json.dumps({"model": path, **config.to_dict()}, indent=2))
    sink = TimingSink(text_dir=text_dir, jsonl=out / "prune_records.jsonl")
    vlmeval.config.supported_VLM[name] = functools.partial(
        make_adapter_class(), family=family, model_path=path, config=config, sink=sink, loaded=loaded, **adapter_kwargs,
    )
    return name, sink

