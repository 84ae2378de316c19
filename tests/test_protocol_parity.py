"""Vanilla is VLMEvalKit's own model: our runner path feeds the model exactly what VLMEvalKit's
wrapper of the model name feeds it (issue #10).

For each family, the REFERENCE is VLMEvalKit 26.3's own wrapper of the reference model name
(``Qwen2VLChat`` for ``Qwen2.5-VL-7B-Instruct``, ``InternVLChat`` V2.0 for ``InternVL3-8B``,
``LLaVA`` for ``llava_v1.5_7b``, ``LLaVA_Next`` for ``llava_next_vicuna_7b``), built by its own
``__init__`` with the keyword arguments of
``vlmeval.config.supported_VLM`` and no weights: the loaders it calls are answered here (test
stubs written independently of the harness's) with the tiny checkpoint's processor/tokenizer and a
recorder standing in for the original model, and its CUDA calls land on the CPU. Its
``use_custom_prompt`` / ``build_prompt`` / ``generate_inner`` then run unchanged on rows of the
tiny datasets (the paper's ten datasets, twelve names, real formats) whose images have realistic
sizes and aspect ratios, plus an interleaved two-image message.

OURS is the production path: ``vlm_adapter.build_model`` with the default (``vlmeval``) protocol
on the tiny checkpoint, called the way ``vlmeval.inference.infer_data`` calls a model, with the
HF-native model's ``generate`` recorded.

Asserted per sample: the same message (prompt text, image placement), the same token ids reaching
the model (the reference's ids, with the original models' image markers expanded as their
remote / original code does), the same pixels (equal up to the dtype the wrapper casts to), the
same image grid / tile counts, the same generation settings, and the same answer after
post-processing for the same generated tokens. Visual-token counts of two images are also checked
against hand-computed values (Qwen's ``smart_resize``, InternVL's tile grid).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch.overrides import TorchFunctionMode

import custom_internvl
import custom_llava
import custom_llava_next
import custom_qwenvl
import vlm_adapter
from synthetic import tiny_checkpoints, tiny_data
from utils import PruneConfig

# Realistic sizes and aspect ratios, one per dataset: photos (4:3, 16:9, portrait), a document
# page, an OCR crop, a chart.
SIZES = {
    "MME": (640, 480), "MMBench_DEV_EN": (1920, 1080), "MMBench_DEV_CN": (300, 1000), "SEEDBench2_Plus": (1024, 768),
    "OCRBench": (160, 48), "MathVista_MINI": (800, 600), "MathVision_MINI": (500, 500), "MIA-Bench": (1280, 720),
    "ScienceQA_VAL": (640, 360), "ScienceQA_TEST": (224, 224), "POPE": (640, 427), "HallusionBench": (1000, 400),
}
ROWS = 2  # samples compared per dataset and family

FAMILIES = {
    "qwen2_5_vl": (custom_qwenvl, tiny_checkpoints.save_tiny_qwen, "Qwen2.5-VL-7B-Instruct"),
    "internvl3": (custom_internvl, tiny_checkpoints.save_tiny_internvl, "InternVL3-8B"),
    "llava": (custom_llava, tiny_checkpoints.save_tiny_llava, "llava_v1.5_7b"),
    "llava_next": (custom_llava_next, tiny_checkpoints.save_tiny_llava_next, "llava_next_vicuna_7b"),
}


class OnCPU(TorchFunctionMode):
    """The reference's ``.cuda()`` / ``.to('cuda', ...)`` land on the CPU (dtypes untouched)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple("cpu" if a == "cuda" else a for a in args)
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class OriginalRecorder:
    """Stands in for the ORIGINAL model a VLMEvalKit wrapper loads: records the wrapper's calls and
    returns ``new`` (token ids) as the generated answer in the form the original returns it."""

    def __init__(self, new: list[int], tokenizer: Any = None) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.new, self.tokenizer = new, tokenizer

    def cuda(self, *a, **k):
        return self

    def eval(self):
        return self

    def generate(self, *args, **kwargs):
        self.calls.append(("generate", args, kwargs))
        if args:  # the original LLaVA: generate(input_ids, images=...) from embeddings -> new tokens only
            return torch.tensor([self.new])
        return torch.cat([kwargs["input_ids"], torch.tensor([self.new])], dim=1)  # HF-native (Qwen, LLaVA-NeXT): prompt + new

    def chat(self, tokenizer, pixel_values, question, generation_config, **kwargs):
        # InternVL3's remote-code chat returns the decoded answer, cut at <|im_end|>.
        self.calls.append(("chat", (), dict(pixel_values=pixel_values, question=question,
                                            generation_config=dict(generation_config), **kwargs)))
        return tokenizer.batch_decode([self.new], skip_special_tokens=True)[0].split("<|im_end|>")[0].strip()


class Transformers4Processor:
    """The reference's ``LlavaNextProcessor`` as transformers 4.x called it: ``LLaVA_Next`` passes
    ``(prompt, images)`` positionally, which 4.x processors took as text and images (a text-first call
    was swapped); transformers 5.23 reads the first positional argument as the images. This stand-in
    (the test's own, not the harness's ``TextFirstProcessor``) swaps such a call and hands the rest over."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, images=None, text=None, **kwargs):
        def is_text(x):
            return isinstance(x, str) or (isinstance(x, list) and bool(x) and all(isinstance(t, str) for t in x))

        if is_text(images) and not is_text(text):
            images, text = text, images
        return self.processor(images=images, text=text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


@pytest.fixture(scope="module")
def lmu(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("parity_lmu")
    for real, size in SIZES.items():
        tiny_data.write_tiny(real, root, n=1, image_size=size)
    monkeypatch_module.setenv("LMUData", str(root))
    vlm_adapter.register_local_datasets()
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parity_ckpts")
    return {key: save(root / key) for key, (_, save, _) in FAMILIES.items()}


def reference_wrapper(family: str, ckpt: Path, recorder: OriginalRecorder):
    """VLMEvalKit's wrapper of the family's reference name, built by its own ``__init__``; the loaders
    it calls return the tiny checkpoint's processor / tokenizer and ``recorder``."""
    import transformers
    import vlmeval.config
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    entry = vlmeval.config.supported_VLM[FAMILIES[family][2]]
    wrapper_cls = entry.func
    if family == "qwen2_5_vl":
        import vlmeval.vlm.qwen2_vl.model as m

        patches = [mock.patch.object(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: processor),
                   mock.patch.object(transformers.Qwen2_5_VLForConditionalGeneration, "from_pretrained",
                                     lambda *a, **k: recorder),
                   mock.patch.object(m, "get_gpu_memory", lambda: [81920])]
    elif family == "internvl3":
        import vlmeval.vlm.internvl.internvl_chat as m

        patches = [mock.patch.object(m.AutoTokenizer, "from_pretrained", lambda *a, **k: processor.tokenizer),
                   mock.patch.object(m.AutoModel, "from_pretrained", lambda *a, **k: recorder)]
    elif family == "llava_next":
        patches = [mock.patch.object(transformers.LlavaNextProcessor, "from_pretrained",
                                     lambda *a, **k: Transformers4Processor(processor)),
                   mock.patch.object(transformers.LlavaNextForConditionalGeneration, "from_pretrained",
                                     lambda *a, **k: recorder)]
    else:
        import llava.model.builder as m

        patches = [mock.patch.object(m, "load_pretrained_model",
                                     lambda **k: (processor.tokenizer, recorder, processor.image_processor, 2048))]
    obj = wrapper_cls.__new__(wrapper_cls)
    for p in patches:
        p.start()
    try:
        wrapper_cls.__init__(obj, **entry.keywords)
    finally:
        for p in patches:
            p.stop()
    return obj, processor


def ours(family: str, ckpt: Path, new: list[int]):
    """The production path with the HF-native model's generate recorded (returns prompt + ``new``)."""
    module = FAMILIES[family][0]
    options = vlm_adapter.RunOptions(device="cpu")
    protocol = vlm_adapter.resolve_protocol(module, ckpt.name, options)
    model = vlm_adapter.build_model(module, str(ckpt), PruneConfig(), protocol, options)
    calls: list[dict] = []

    def generate(**kwargs):
        calls.append(kwargs)
        return torch.cat([kwargs["input_ids"], torch.tensor([new])], dim=1)

    model._pruned.loaded.model.generate = generate
    return model, calls


def prompt_of(model, dataset, row, name):
    """What vlmeval.inference.infer_data gives the model for a row."""
    if model.use_custom_prompt(name):
        return model.build_prompt(row, dataset=name)
    return dataset.build_prompt(row)


# ----------------------------------------------------------------------------- what the model must receive
def expected_from_reference(family: str, call: tuple[str, tuple, dict], tokenizer, model_config) -> dict[str, Any]:
    """The HF-native model's inputs that the reference's call to the ORIGINAL model means."""
    kind, args, kwargs = call
    if family in ("qwen2_5_vl", "llava_next"):  # HF-native on both sides: the same call
        return dict(kwargs)
    if family == "internvl3":
        # InternVL3's remote-code chat (OpenGVLab/InternVL modeling_internvl_chat.py, template
        # internvl2_5): system turn, question with <image> first if absent, each <image> expanded.
        question, n_tiles = kwargs["question"], kwargs["num_patches_list"]
        if "<image>" not in question:
            question = "<image>\n" + question
        query = (f"<|im_start|>system\n{custom_internvl.INTERNVL2_5_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n"
                 f"{question}<|im_end|>\n<|im_start|>assistant\n")
        per_tile = model_config.image_seq_length
        for n in n_tiles:
            query = query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * per_tile * n + "</img>", 1)
        ids = tokenizer(query, return_tensors="pt")["input_ids"]
        gen = {**kwargs["generation_config"], "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
        return {"input_ids": ids, "pixel_values": kwargs["pixel_values"], **gen}
    # The original LLaVA: one IMAGE_TOKEN_INDEX (-200) per image, replaced by its CLIP features.
    (input_ids,) = args
    images = kwargs.pop("images")
    per_image = (images.shape[-1] // model_config.vision_config.patch_size) ** 2
    ids = []
    for t in input_ids[0].tolist():
        ids += [model_config.image_token_id] * per_image if t == -200 else [t]
    return {"input_ids": torch.tensor([ids]), "pixel_values": images, **kwargs}


def assert_same_inputs(expected: dict[str, Any], got: dict[str, Any]) -> None:
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["pixel_values"], expected["pixel_values"].to(got["pixel_values"].dtype))
    for key in ("image_grid_thw", "image_sizes", "attention_mask"):
        if key in expected:
            assert torch.equal(got[key], expected[key]), key
    settings = lambda d: {k: v for k, v in d.items() if not isinstance(v, torch.Tensor) and k != "stopping_criteria"}  # noqa: E731
    assert settings(got) == settings(expected)
    if "stopping_criteria" in expected:  # LLaVA's "</s>" keyword stop
        [theirs], [mine] = expected["stopping_criteria"], got["stopping_criteria"]
        assert type(mine) is type(theirs) and mine.keywords == theirs.keywords


NEW_TEXT = "B"


def new_tokens(tokenizer) -> list[int]:
    ids = tokenizer(NEW_TEXT, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_dataset_gets_vlmevalkits_prompt_pixels_and_generation(family, checkpoints, lmu):
    from vlmeval.dataset import build_dataset

    ckpt = checkpoints[family]
    model, calls = None, None
    for real in SIZES:
        tiny = real + tiny_data.TINY_SUFFIX
        dataset = build_dataset(tiny)
        recorder = OriginalRecorder([])
        reference, processor = reference_wrapper(family, ckpt, recorder)
        recorder.new = new_tokens(processor.tokenizer)
        if model is None:
            model, calls = ours(family, ckpt, recorder.new)
        reference.set_dump_image(dataset.dump_image)
        model.set_dump_image(dataset.dump_image)
        for i in range(min(ROWS, len(dataset.data))):
            row = dataset.data.iloc[i]
            theirs = prompt_of(reference, dataset, row, real)  # the reference sees the real name
            mine = prompt_of(model, dataset, row, tiny)  # ours is run on the tiny twin, as a runner is
            assert mine == theirs, (real, i)
            with OnCPU():
                answer_theirs = reference.generate(theirs, dataset=real)
            answer_mine = model.generate(mine, dataset=tiny)
            assert answer_mine == answer_theirs, (real, i)
            expected = expected_from_reference(family, recorder.calls[-1], processor.tokenizer, model._pruned.loaded.model.config)
            assert_same_inputs(expected, calls[-1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_interleaved_two_images(family, checkpoints, lmu, tmp_path):
    from PIL import Image

    ckpt = checkpoints[family]
    paths = []
    for k, size in enumerate(((800, 600), (300, 900))):
        paths.append(str(tmp_path / f"{k}.jpg"))
        Image.new("RGB", size, (40 * k, 120, 200)).save(paths[-1])
    message = [{"type": "text", "value": "Compare the first image"}, {"type": "image", "value": paths[0]},
               {"type": "text", "value": "with the second one"}, {"type": "image", "value": paths[1]},
               {"type": "text", "value": "Which is taller?"}]
    recorder = OriginalRecorder([])
    reference, processor = reference_wrapper(family, ckpt, recorder)
    recorder.new = new_tokens(processor.tokenizer)
    model, calls = ours(family, ckpt, recorder.new)
    for dataset in (None, "MMBench_DEV_EN"):
        with OnCPU():
            answer = reference.generate([dict(m) for m in message], dataset=dataset)
        assert model.generate([dict(m) for m in message], dataset=dataset) == answer
        expected = expected_from_reference(family, recorder.calls[-1], processor.tokenizer, model._pruned.loaded.model.config)
        assert_same_inputs(expected, calls[-1])


def test_visual_token_counts_are_vlmevalkits(checkpoints, lmu):
    """Hand-computed: Qwen2.5-VL at min_pixels=1280*28*28 resizes 640x480 to 868x1176 (31 x 42 merged
    tokens = 1302) and, for OCRBench (min_pixels=10*10*28*28), 160x48 to 168x532 (6 x 19 = 114);
    InternVL3 cuts 640x480 into a 3x2 grid plus a thumbnail (7 tiles, max 6) and, for OCRBench
    (max 24), 160x48 into a 7x2 grid plus a thumbnail (15 tiles). The tiny LLaVA-NeXT (56-px crops,
    4 x 4 tokens; pinpoints 56x112, 112x56, 112x112) has no dataset setting: 640x480 takes 2 x 2
    crops, stitched 8 x 8 tokens, of which int(round(480 * 8 / 640)) = 6 rows stay: 16 + 48 = 64
    visual tokens and 6 newlines (70 placeholders); 160x48 takes 56x112 (1 x 2 crops, stitched 4 x 8),
    int(round(48 * 8 / 160)) = 2 rows stay: 16 + 16 = 32 and 2 newlines."""
    from vlmeval.dataset import build_dataset

    counts = {}
    for family in ("qwen2_5_vl", "internvl3", "llava_next"):
        model, calls = ours(family, checkpoints[family], [0])
        for real in ("MME", "OCRBench"):
            dataset = build_dataset(real + tiny_data.TINY_SUFFIX)
            model.set_dump_image(dataset.dump_image)
            row = dataset.data.iloc[0]
            model.generate(prompt_of(model, dataset, row, real + tiny_data.TINY_SUFFIX), dataset=real + tiny_data.TINY_SUFFIX)
            call = calls[-1]
            if family == "qwen2_5_vl":
                t, h, w = call["image_grid_thw"][0].tolist()
                counts[family, real] = t * h * w // 4
            elif family == "llava_next":
                placeholders = int((call["input_ids"] == model._pruned.loaded.model.config.image_token_id).sum())
                (entry,) = custom_llava_next.FAMILY.image_layout(model._pruned.loaded.model, call)
                counts[family, real] = (entry.n, placeholders)
            else:
                counts[family, real] = call["pixel_values"].shape[0]
    assert counts == {("qwen2_5_vl", "MME"): 1302, ("qwen2_5_vl", "OCRBench"): 114,
                      ("internvl3", "MME"): 7, ("internvl3", "OCRBench"): 15,
                      ("llava_next", "MME"): (64, 70), ("llava_next", "OCRBench"): (32, 34)}


def test_generation_settings_are_the_wrappers(checkpoints, lmu):
    """The settings VLMEvalKit's config and wrappers give (vlmeval 26.3): Qwen2.5-VL 2048 new tokens,
    top_k=1 (greedy), repetition_penalty 1.0; InternVL3 4096, greedy; LLaVA-1.5 and LLaVA-NeXT 2048, greedy."""
    got = {}
    for family in FAMILIES:
        model, _ = ours(family, checkpoints[family], [0])
        got[family] = {"qwen2_5_vl": lambda m: m.generate_kwargs, "internvl3": lambda m: m.kwargs,
                       "llava": lambda m: m.kwargs, "llava_next": lambda m: m.kwargs}[family](model)
    assert got["qwen2_5_vl"] == dict(max_new_tokens=2048, top_p=0.001, top_k=1, temperature=0.01, repetition_penalty=1.0)
    assert got["internvl3"] == dict(do_sample=False, max_new_tokens=4096, top_p=None)
    assert got["llava"] == dict(do_sample=False, temperature=0, max_new_tokens=2048, top_p=None, num_beams=1, use_cache=True)
    assert got["llava_next"] == dict(do_sample=False, temperature=0, max_new_tokens=2048, top_p=None, num_beams=1)
