"""VLMEvalKit integration: the runner behind ``run_*.py`` and the model VLMEvalKit calls.

``main(family_module, argv)`` does what a runner script does:
  1. reads the pruning configuration (:meth:`utils.PruneConfig.from_env`, fails fast on bad input)
     and the runner's own flags (:class:`RunOptions`; everything else goes to VLMEvalKit);
  2. resolves each ``--model`` (a VLMEvalKit model name, a local checkpoint folder, or a name with
     ``--model-path``) and the evaluation protocol (:class:`Protocol`);
  3. registers the model under :func:`model_name` in ``vlmeval.config.supported_VLM`` and rewrites
     ``--model`` to that name, so two configurations (or protocols) never share cached predictions;
  4. hands over to ``vlmeval.run.main()`` with every other flag untouched.

The protocol (how a sample becomes model inputs and an answer):

* ``vlmeval`` (the default): VLMEvalKit's own wrapper of the reference model name (``Qwen2VLChat``
  for ``Qwen2.5-VL-7B-Instruct``, ``InternVLChat`` for ``InternVL3-8B``, ``LLaVA`` for
  ``llava_v1.5_7b``, ``LLaVA_Next`` for ``llava_next_vicuna_7b``, ...), built by its own ``__init__``
  from ``vlmeval.config.supported_VLM`` with its own keyword arguments, and run by its own
  ``use_custom_prompt`` / ``build_prompt`` / ``generate_inner``: the same prompts, image
  preprocessing and generation settings as VLMEvalKit. Only the loading is ours: the wrapper's
  loaders are answered with the checkpoint we loaded and patched (:func:`vlmeval_wrapper`), and its
  ``self.model`` is a :class:`ModelShim` that hands each generate call to our (HF-native) model. Families supply the loaders and the shim
  (``custom_*.py``: ``VLMEVAL_DEFAULT``, ``vlmeval_loaders``, ``vlmeval_shim``).
* ``chat_template``: the checkpoint's own chat template and processor, greedy decoding (for
  checkpoints VLMEvalKit has no wrapper of, and the proxy models, which were trained on it).

Outputs: VLMEvalKit's usual files under ``<work-dir>/<model name>/``, plus ``prune_config.json``
(the resolved configuration and protocol) and ``prune_records.jsonl`` (one record per sample: the
protocol, prefill ms, the visual tokens per image, the pruning events); with ``METHOD_TIME`` /
``PREFILL_TIME`` the seed's ``method_times_<method>.txt`` / ``prefill_times.txt`` lines are
appended in the current directory (format: :class:`utils.TimingSink`).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence
from unittest import mock

from utils import ensure_torchvision

ensure_torchvision()

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from utils import PruneConfig, TimingSink  # noqa: E402

logger = logging.getLogger(__name__)

PROTOCOLS = ("vlmeval", "chat_template")
CHAT_TEMPLATE_MAX_NEW_TOKENS = 128  # the chat_template protocol's default answer length


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


@dataclass
class LoadedModel:
    """A checkpoint loaded and patched once; several adapters (configurations, one after another:
    ``scripts/sweep_one_load.py`` switches them with :func:`prune_engine.pruning`) may wrap it."""

    model: torch.nn.Module
    processor: Any
    device: torch.device


# ----------------------------------------------------------------------------- runner flags
@dataclass(frozen=True)
class RunOptions:
    """The runner's own flags; :meth:`pop_from` removes them from the VLMEvalKit flags.

    ``--model-path DIR`` (a local checkpoint for the named model), ``--max-new-tokens N`` (overrides
    the protocol's answer length; recorded in the model name), ``--device``, ``--dtype
    {auto,fp32,bf16,fp16}``, ``--protocol {vlmeval,chat_template}``, ``--vlmeval-model NAME`` (the
    VLMEvalKit model whose protocol a checkpoint folder gets; default: ``--model`` when it is such a
    name, else the family's ``VLMEVAL_DEFAULT``).
    """

    model_path: str | None = None
    max_new_tokens: int | None = None
    device: str | None = None
    dtype: str = "auto"
    protocol: str = "vlmeval"
    vlmeval_model: str | None = None

    @classmethod
    def pop_from(cls, argv: list[str]) -> "RunOptions":
        values = {flag: _pop_flag(argv, flag) for flag in
                  ("--model-path", "--max-new-tokens", "--device", "--dtype", "--protocol", "--vlmeval-model")}
        mnt = values["--max-new-tokens"]
        if mnt is not None and not (mnt.isdigit() and int(mnt) > 0):
            raise SystemExit(f"--max-new-tokens {mnt}: give a positive integer")
        dtype = values["--dtype"] or "auto"
        if dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise SystemExit(f"--dtype {dtype}: use auto, fp32, bf16 or fp16")
        protocol = values["--protocol"] or "vlmeval"
        if protocol not in PROTOCOLS:
            close = difflib.get_close_matches(protocol, PROTOCOLS, n=1)
            raise SystemExit(f"--protocol {protocol}: use {' or '.join(PROTOCOLS)}" + (f" (did you mean {close[0]}?)" if close else ""))
        if protocol == "chat_template" and values["--vlmeval-model"]:
            raise SystemExit("--vlmeval-model names the VLMEvalKit protocol to reproduce: drop it, or --protocol chat_template")
        return cls(values["--model-path"], int(mnt) if mnt else None, values["--device"], dtype, protocol,
                   values["--vlmeval-model"])


def _pop_flag(argv: list[str], flag: str) -> str | None:
    """Remove ``flag value`` / ``flag=value`` from ``argv``; return the value."""
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
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


# ----------------------------------------------------------------------------- protocol and names
@dataclass(frozen=True)
class Protocol:
    """How a sample becomes model inputs and an answer (see the module docstring).

    ``name``: ``"vlmeval"`` or ``"chat_template"``; ``reference``: the VLMEvalKit model name whose
    wrapper is reproduced (vlmeval only); ``max_new_tokens``: an override of the protocol's answer
    length (None: the protocol's own, e.g. 2048 for Qwen2VLChat, 4096 for InternVLChat)."""

    name: str
    reference: str | None = None
    max_new_tokens: int | None = None

    def tag(self, display: str) -> str:
        """The part of the model name that tells protocols apart ('' for VLMEvalKit's protocol of
        the model's own name, unchanged)."""
        parts = []
        if self.name == "chat_template":
            parts.append("chat-template")
        elif self.reference != display:
            parts.append(f"vlmeval-{self.reference}")
        if self.max_new_tokens is not None:
            parts.append(f"mnt{self.max_new_tokens}")
        return "__".join(parts)

    @property
    def label(self) -> str:
        """What records say: ``vlmeval:<reference>`` or ``chat_template`` (``+mnt<N>`` when overridden)."""
        base = f"vlmeval:{self.reference}" if self.name == "vlmeval" else self.name
        return base + (f"+mnt{self.max_new_tokens}" if self.max_new_tokens is not None else "")


def resolve_protocol(family: ModuleType, display: str, options: RunOptions) -> Protocol:
    """The protocol of ``--model`` (shown as ``display``) under ``options``."""
    if options.protocol == "chat_template":
        return Protocol("chat_template", None, options.max_new_tokens)
    reference = options.vlmeval_model or (display if display in family.CHECKPOINTS else family.VLMEVAL_DEFAULT)
    if reference not in family.CHECKPOINTS:
        close = difflib.get_close_matches(reference, list(family.CHECKPOINTS), n=3, cutoff=0.5)
        raise SystemExit(
            f"--vlmeval-model {reference}: not a VLMEvalKit model of the {family.FAMILY.name} family"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; use one of {', '.join(sorted(family.CHECKPOINTS))}"
        )
    return Protocol("vlmeval", reference, options.max_new_tokens)


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


def model_name(display: str, config: PruneConfig, protocol: Protocol) -> str:
    """The model name VLMEvalKit sees (and its output folder):
    ``<display>[__<protocol tag>]__<config tag or 'vanilla'>``. The unpruned configuration gets its
    own tag, so its predictions never mix with VLMEvalKit's own run of ``<display>`` (another code
    path), nor with another protocol's or configuration's."""
    return "__".join(p for p in (display, protocol.tag(display), config.tag() or "vanilla") if p)


def dataset_for_protocol(dataset: str | None) -> str | None:
    """The dataset name the protocol sees: a tiny twin (``OCRBench_tiny``) stands in for its real
    dataset, so it gets the real one's prompts and image settings (``dataset == 'OCRBench'``)."""
    from synthetic import tiny_data

    return tiny_data.real_name(dataset) if dataset else dataset


# ----------------------------------------------------------------------------- VLMEvalKit's wrapper around our model
class CudaOnDevice(TorchFunctionMode):
    """Inside VLMEvalKit's wrapper code, ``.cuda()`` and ``.to('cuda')`` mean ``device``: the wrappers
    hard-code CUDA (``inputs.to('cuda')``, ``input_ids.cuda()``). Only active when ``device`` is not
    the current CUDA device (CPU runs, ``--device cuda:1``); paused around model calls
    (:meth:`paused`), so the model itself runs without it."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def _retarget(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("cuda") or isinstance(value, torch.device) and value.type == "cuda":
            return self.device
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to(self.device, non_blocking=kwargs.get("non_blocking", False))
        if func is torch.Tensor.to:
            args = tuple(self._retarget(a) for a in args)
            if "device" in kwargs:
                kwargs = {**kwargs, "device": self._retarget(kwargs["device"])}
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.__exit__(None, None, None)
        try:
            yield
        finally:
            self.__enter__()


def _redirect_needed(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    return device.index is not None and device.index != torch.cuda.current_device()


class ModelShim:
    """What a VLMEvalKit wrapper holds as ``self.model``: it hands the wrapper's ``generate`` calls
    to our (patched, HF-native) model, with floating inputs in the model's dtype and outside the
    :class:`CudaOnDevice` redirect; ``.cuda()`` / ``.eval()`` / ``.to()`` (called by the wrappers'
    ``__init__``) return the shim. Families whose original model API differs from the HF-native one
    (InternVL's remote-code ``chat``, the original LLaVA's ``generate(input_ids, images=...)``)
    subclass it (``custom_*.vlmeval_shim``)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.redirect: CudaOnDevice | None = None

    def cuda(self, *args: Any, **kwargs: Any) -> "ModelShim":
        return self

    def eval(self) -> "ModelShim":
        return self

    def to(self, *args: Any, **kwargs: Any) -> "ModelShim":
        return self

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def dtype(self) -> torch.dtype:
        return self.loaded.model.dtype

    @property
    def config(self) -> Any:
        return self.loaded.model.config

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.call_model(*args, **kwargs)

    def call_model(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` with floating tensors cast to the model's dtype (the wrappers cast images
        to the dtype they load their model in), outside the device redirect."""
        def cast(v: Any) -> Any:
            return v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

        args = tuple(cast(a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        with self.redirect.paused() if self.redirect is not None else contextlib.nullcontext(), torch.inference_mode():
            return self.loaded.model.generate(*args, **kwargs)


@dataclass
class _AdapterState:
    family: ModuleType
    loaded: LoadedModel
    protocol: Protocol
    shim: ModelShim | None = None


def _note_sample(model: torch.nn.Module, message: list[dict[str, str]], dataset: str | None, protocol: Protocol) -> None:
    """Tell the engine which sample the next prefill is, for its record: the dataset, the image
    files (their names carry the row index), the text and the protocol."""
    state = getattr(model, "_prune_state", None)
    if state is not None:
        state.sample_info = {
            "dataset": dataset,
            "images": [p["value"] for p in message if p["type"] == "image"],
            "text": "\n".join(p["value"] for p in message if p["type"] == "text"),
            "protocol": protocol.label,
        }


FAILED_SAMPLE = "[sample failed] "  # the prediction of a sample whose input could not be built


class SampleGuard:
    """A sample whose input cannot be built (an image that does not decode) fails alone: its
    prediction is ``FAILED_SAMPLE + reason``, scored as a wrong answer, and its record says
    ``"failed"``; the other samples, and everything already predicted, are kept.

    VLMEvalKit builds a prompt with the model's ``build_prompt`` when ``use_custom_prompt`` says so,
    else with the dataset's (``infer_data``), where a bad image raises out of the whole dataset. So
    the model always claims the prompt, and builds it the way VLMEvalKit would have: with its own
    (the wrapper's) ``build_prompt`` for the datasets it customises, else with the dataset's, found
    through the ``dump_image`` VLMEvalKit handed it (``set_dump_image(dataset.dump_image)``)."""

    def own_prompt(self, dataset: str | None) -> bool:
        return False

    def own_build_prompt(self, line, dataset: str | None):
        raise NotImplementedError

    def use_custom_prompt(self, dataset):
        return True

    def build_prompt(self, line, dataset=None):
        try:
            if self.own_prompt(dataset):
                return self.own_build_prompt(line, dataset)
            owner = getattr(self.dump_image_func, "__self__", None)
            if owner is None:
                raise RuntimeError("the dataset's build_prompt is unknown: set_dump_image(dataset.dump_image) first")
            return owner.build_prompt(line)
        except Exception as e:  # noqa: BLE001 - whatever breaks one sample's input breaks only that sample
            reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
            logger.error("%s row %s: cannot build its input (%s); the sample counts as failed", dataset, line.get("index"), reason)
            return [{"type": "text", "value": FAILED_SAMPLE + reason, "failed": True}]

    def failed_sample(self, message: list[dict], dataset: str | None, model: torch.nn.Module, protocol: "Protocol") -> str | None:
        """The prediction of a failed sample (and its record), or None for a sample that can run."""
        if not (len(message) == 1 and message[0].get("failed")):
            return None
        state = getattr(model, "_prune_state", None)
        if state is not None and state.sink is not None:
            state.samples += 1
            record = {"sample": state.samples, "dataset": dataset, "protocol": protocol.label,
                      "failed": message[0]["value"][len(FAILED_SAMPLE):], "events": []}
            state.sink.write_sample(record, state.config)
        return message[0]["value"]


class VLMEvalAdapter(SampleGuard):
    """Mixed in before a VLMEvalKit wrapper class (:func:`vlmeval_wrapper`): tiny twins get their
    real dataset's protocol, a sample whose input cannot be built fails alone (:class:`SampleGuard`),
    each sample is noted for its record, and the wrapper's CUDA calls land on our device.
    Everything else is the wrapper's own code."""

    _pruned: _AdapterState

    def own_prompt(self, dataset):
        return super(SampleGuard, self).use_custom_prompt(dataset_for_protocol(dataset))

    def own_build_prompt(self, line, dataset):
        return super(SampleGuard, self).build_prompt(line, dataset=dataset_for_protocol(dataset))

    def generate_inner(self, message, dataset=None):
        st = self._pruned
        failed = self.failed_sample(message, dataset, st.loaded.model, st.protocol)
        if failed is not None:
            return failed
        _note_sample(st.loaded.model, message, dataset, st.protocol)
        if not _redirect_needed(st.loaded.device):
            return super().generate_inner(message, dataset_for_protocol(dataset))
        with CudaOnDevice(st.loaded.device) as redirect:
            st.shim.redirect = redirect
            try:
                return super().generate_inner(message, dataset_for_protocol(dataset))
            finally:
                st.shim.redirect = None


@functools.cache
def _adapter_class(wrapper_cls: type) -> type:
    return type(f"Pruned{wrapper_cls.__name__}", (VLMEvalAdapter, wrapper_cls), {"__module__": __name__})


def vlmeval_wrapper(family: ModuleType, protocol: Protocol, loaded: LoadedModel) -> Any:
    """VLMEvalKit's wrapper of ``protocol.reference`` around ``loaded``: the class and keyword
    arguments of ``vlmeval.config.supported_VLM[reference]``, built by the wrapper's own
    ``__init__`` while the loaders it calls (``family.vlmeval_loaders``) return our processor /
    tokenizer and the family's :class:`ModelShim`."""
    import vlmeval.config

    entry = vlmeval.config.supported_VLM[protocol.reference]
    wrapper_cls, kwargs = entry.func, dict(entry.keywords)
    if protocol.max_new_tokens is not None:
        kwargs["max_new_tokens"] = protocol.max_new_tokens  # every wrapper takes it as a generation keyword
    obj = _adapter_class(wrapper_cls).__new__(_adapter_class(wrapper_cls))
    shim = family.vlmeval_shim(loaded)
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the wrappers warn about the generation kwargs they received
        for target, attribute, replacement in family.vlmeval_loaders(loaded, shim):
            stack.enter_context(mock.patch.object(target, attribute, replacement))
        wrapper_cls.__init__(obj, **kwargs)
    obj._pruned = _AdapterState(family, loaded, protocol, shim)
    return obj


# ----------------------------------------------------------------------------- the checkpoint's own chat template
def messages_from_tsv(path: Path, limit: int, workdir: Path) -> list[list[dict[str, str]]]:
    """The first ``limit`` (image, question) messages of a VLMEvalKit TSV (base64 ``image`` column),
    images written once each to ``workdir`` (MME rows that reuse another row's image name its index).
    For the calibration scripts (``scripts/vtw_find_k.py``, ``scripts/fitprune_calibrate.py``), which
    feed them to :func:`build_inputs`."""
    import base64
    import io

    import pandas as pd
    from PIL import Image

    rows = pd.read_csv(path, sep="\t").head(limit)
    indices = set(rows["index"].astype(str))
    files: dict[str, str] = {}
    out = []
    for _, row in rows.iterrows():
        data = str(row["image"])
        if data not in files and len(data) < 64 and data in indices:  # MME: the image of another row
            data = str(rows[rows["index"].astype(str) == data].iloc[0]["image"])
        if data not in files:
            files[data] = str(workdir / f"{len(files)}.png")
            Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").save(files[data])
        out.append([{"type": "image", "value": files[data]}, {"type": "text", "value": str(row["question"])}])
    return out


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


@functools.cache
def _chat_template_class() -> type:
    from vlmeval.vlm.base import BaseModel

    class ChatTemplateVLM(SampleGuard, BaseModel):
        """The ``chat_template`` protocol: the dataset's prompt (VLMEvalKit's ``build_prompt``)
        through the checkpoint's own chat template, greedy decoding."""

        INSTALL_REQ = False
        INTERLEAVE = True

        def __init__(self, loaded: LoadedModel, protocol: Protocol) -> None:
            super().__init__()
            self.model, self.processor, self.device = loaded.model, loaded.processor, loaded.device
            self.protocol = protocol
            self.max_new_tokens = protocol.max_new_tokens or CHAT_TEMPLATE_MAX_NEW_TOKENS

        def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
            failed = self.failed_sample(message, dataset, self.model, self.protocol)
            if failed is not None:
                return failed
            _note_sample(self.model, message, dataset, self.protocol)
            inputs = build_inputs(self.processor, message, self.device)
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = out[:, inputs["input_ids"].shape[1] :]
            return self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()

    return ChatTemplateVLM


def build_model(
    family: ModuleType, checkpoint: str, config: PruneConfig, protocol: Protocol, options: RunOptions,
    sink: TimingSink | None = None, loaded: LoadedModel | None = None,
) -> Any:
    """The model VLMEvalKit calls (``supported_VLM[name]()``): ``loaded`` (configured by the caller)
    or the checkpoint loaded and patched with ``config`` now, behind the protocol's adapter."""
    if loaded is None:
        device = pick_device(options.device)
        model, processor = load_pretrained(family, checkpoint, device, options.dtype)
        family.patch(model, config, sink)
        loaded = LoadedModel(model, processor, device)
        logger.info("loaded %s on %s; pruning: %s; protocol: %s", checkpoint, device, config.tag() or "none", protocol.label)
    if protocol.name == "chat_template":
        return _chat_template_class()(loaded, protocol)
    return vlmeval_wrapper(family, protocol, loaded)


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
    from synthetic import proxy_data, tiny_data

    return tiny_data.register_tiny_datasets() + proxy_data.register_datasets()


def main(family: ModuleType, argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    config = PruneConfig.from_env()
    logger.info("pruning configuration: %s", json.dumps(config.to_dict()))
    options = RunOptions.pop_from(argv)
    dry_run = "--dry-run" in argv
    if dry_run:
        argv.remove("--dry-run")
    if "--model" not in argv:
        raise SystemExit("--model is required (a model name, or a checkpoint folder)")

    import vlmeval.run

    from synthetic import tiny_data

    register_local_datasets()
    datasets = argv[slice(*_flag_values(argv, "--data"))] if "--data" in argv else []
    if datasets:  # say which datasets need an LLM judge for their official score
        judge = argv[argv.index("--judge") + 1] if "--judge" in argv[:-1] else None
        tiny_data.log_judge_notes(datasets, judge)
    _cpu_distributed()
    work_dir = Path(os.environ.get("MMEVAL_ROOT") or _pop_flag(argv, "--work-dir") or "./outputs")
    start, end = _flag_values(argv, "--model")
    names, checked = [], []
    for i in range(start, end):
        display, path = resolve_checkpoint(family, argv[i], options.model_path)
        protocol = resolve_protocol(family, display, options)
        info = check_before_loading(family, config, path, datasets)
        checked.append(f"{display}: {info.model_type} checkpoint at {info.path}, {info.num_layers} decoder layers")
        if not dry_run:
            argv[i], _ = register(family, display, path, config, protocol, options, work_dir, Path.cwd())
            names.append(argv[i])
        else:
            names.append(model_name(display, config, protocol))
    if dry_run:
        print("checks passed (nothing loaded); would run " + ", ".join(f"{n} x {d}" for n in names for d in datasets or ["?"]))
        print("\n".join(checked))
        return
    sys.argv = [sys.argv[0], *argv, "--work-dir", str(work_dir)]
    infer_only = "--mode" in argv[:-1] and argv[argv.index("--mode") + 1] == "infer"
    with _ErrorLog() as errors:
        vlmeval.run.main()
    missing = _missing_results(work_dir, names, datasets, infer_only, errors.messages)
    if missing and int(os.environ.get("RANK", "0") or 0) == 0:
        what = "predictions" if infer_only else "score"
        lines = "\n".join(f"  {name} x {data}: {why}" for name, data, why in missing)
        raise SystemExit(f"{len(missing)} of {len(names) * len(datasets)} model x dataset runs produced no {what}:\n{lines}")


def check_before_loading(family: ModuleType, config: PruneConfig, checkpoint: str, datasets: list[str]) -> Any:
    """Everything checkable before a model loads (``utils.check_before_loading``: the checkpoint
    folder, its model type and weights, the layers and methods against its depth and family, the
    dataset names); a failure stops the runner with the message (exit 1). A hub id that is not in
    the local cache has its ``config.json`` fetched (the weights download when the model loads)."""
    from utils import CheckpointNotLocal, ConfigError
    from utils import check_before_loading as check

    model_types = (family.MODEL_CLASS.config_class.model_type,)
    try:
        try:
            return check(config, checkpoint, family.FAMILY.name, model_types, datasets)
        except CheckpointNotLocal:
            return check(config, checkpoint, family.FAMILY.name, model_types, datasets, download=True)
    except ConfigError as e:
        raise SystemExit(str(e)) from None


class _ErrorLog(logging.Handler):
    """Collects the ERROR lines VLMEvalKit's run logger writes (a failed dataset is one such line),
    to say why a dataset produced no score."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_ErrorLog":
        logging.getLogger("RUN").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("RUN").removeHandler(self)


def _missing_results(
    work_dir: Path, names: list[str], datasets: list[str], infer_only: bool, errors: list[str]
) -> list[tuple[str, str, str]]:
    """``(model name, dataset, why)`` for every requested pair without a score file (without a
    predictions file under ``--mode infer``)."""
    from scripts import _common

    out = []
    for name in names:
        for data in datasets:
            model_dir = work_dir / name
            if infer_only:
                ok = any((root / f"{name}_{data}.xlsx").exists() for root in [model_dir, *_common.pred_roots(model_dir)])
            else:
                ok = _common.find_score_file(model_dir, name, data) is not None
            if not ok:
                said = [m for m in errors if data in m]
                why = said[-1].splitlines()[0][:500] if said else "no error was logged; see the log above"
                out.append((name, data, why))
    return out


def register(
    family: ModuleType, display: str, path: str, config: PruneConfig, protocol: Protocol, options: RunOptions,
    work_dir: Path, text_dir: Path, loaded: LoadedModel | None = None,
) -> tuple[str, TimingSink]:
    """Register the model of one configuration with VLMEvalKit under :func:`model_name` and write
    ``<work_dir>/<name>/prune_config.json``; returns the name and the sink of its records (timing
    files in ``text_dir``). With ``loaded``, the adapter wraps that model instead of loading one."""
    import vlmeval.config

    name = model_name(display, config, protocol)
    out = work_dir / name
    out.mkdir(parents=True, exist_ok=True)
    (out / "prune_config.json").write_text(json.dumps(
        {"model": path, "protocol": asdict(protocol), "protocol_label": protocol.label, **config.to_dict()}, indent=2))
    sink = TimingSink(text_dir=text_dir, jsonl=out / "prune_records.jsonl", label=name)
    vlmeval.config.supported_VLM[name] = functools.partial(
        build_model, family, path, config, protocol, options, sink=sink, loaded=loaded,
    )
    return name, sink
