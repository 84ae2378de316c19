"""Tiny synthetic benchmark data for running VLMEvalKit (``nvidia-vlmeval`` 26.3) fully offline.

Provides
--------
* :func:`write_mme_tiny` writes ``<root>/MME_tiny.tsv`` in the real MME TSV layout.
* :func:`register_tiny_datasets` makes ``--data MME_tiny`` load that file offline and score it
  with the real MME scoring.

Paths below are relative to the installed ``vlmeval`` package
(``<venv>/lib/python3.11/site-packages/vlmeval``); line numbers are for 26.3.

How VLMEvalKit is driven (findings)
-----------------------------------
``vlmeval.run.main()`` (run.py:177) parses ``sys.argv`` with argparse (run.py:145-174), so a caller
sets ``sys.argv = ['vlmeval', '--model', ..., '--data', ...]`` before calling it. Flags:

* ``--model NAME [NAME ...]`` / ``--data NAME [NAME ...]``: keys of ``vlmeval.config.supported_VLM``
  and dataset names; ``--config cfg.json`` instead of both (model/data built from the JSON).
* ``--work-dir DIR`` (default ``./outputs``); env ``MMEVAL_ROOT`` overrides it (run.py:196).
* ``--mode all|infer`` (``infer`` = predictions only, no scoring).
* ``--judge NAME``: judge model for evaluation; ``--judge-args JSON`` extra judge kwargs;
  ``--api-nproc N`` (default 4) threads for API models *and* judges; ``--retry N``.
* ``--verbose`` prints every prediction (inference.py:162) and is pushed into model partials that
  have a ``verbose`` keyword (run.py:204).
* ``--reuse`` / ``--reuse-aux`` / ``--ignore`` control resumption (see below); ``--first-n N`` keeps
  only the first N rows; ``--use-vllm`` is Llama-4 only.
* main() never raises for a failing model x dataset pair: the whole body is wrapped in
  ``try/except Exception`` that only logs (run.py:464-467). Check for the score file instead.
* run.py's ``__main__`` also calls ``load_env()`` (smp/misc.py:212), which only logs an error when
  ``<site-packages>/.env`` is missing; calling ``main()`` directly skips it harmlessly.

Custom model: subclass ``vlmeval.vlm.base.BaseModel`` (vlm/base.py:21) and register a zero-argument
factory: ``vlmeval.config.supported_VLM[name] = functools.partial(MyModel, **kw)`` (the dict is
built at config.py:1265-1282; inference.py:128 calls ``supported_VLM[name]()``, so the model is
built lazily, once per process, and only if some prediction is missing). Interface:

* ``generate_inner(self, message, dataset=None) -> str`` (base.py:61), the only required method.
  ``message`` is a list of ``{'type': 'image'|'text', 'value': str}``; image values are local file
  paths (the dataset dumps the base64 image to ``$LMUData/images/<dataset>/<index>.jpg``).
  ``generate()`` (base.py:116) validates/normalises the message and calls it.
* ``use_custom_prompt(self, dataset) -> bool`` (base.py:29, default False). If True,
  ``build_prompt(self, line, dataset)`` (base.py:42) is called with the raw pandas row and must
  return the message; otherwise ``dataset.build_prompt(line)`` is used (for MME: image then
  question, dataset/image_base.py:168).
* ``INTERLEAVE`` (base.py:23, default False) is only read by ``message_to_promptimg`` (base.py:152),
  a helper for models that take one image + one text, and by ``vlmutil check`` (tools.py:321);
  the inference loop ignores it. Set it to True for models that accept several images.
* ``is_api`` (attribute, default absent): True switches to the threaded API path
  (inference.py:130); leave it unset for local models. ``set_dump_image`` is called by the loop.
* Predictions are cached by *model name* (see below): the registered name must encode the whole
  configuration (e.g. the pruning method and ratio), otherwise two configurations share results.

Where files land (run.py:218-240, inference.py:175-219, dataset/image_yorn.py:41-110):

* ``pred_root = <work-dir>/<model>/T<YYYYMMDD>_G<githash8>``. ``githash`` runs
  ``git rev-parse HEAD`` in the *vlmeval package directory* (smp/misc.py:178): for a venv outside
  any git repo it yields an empty hash (``T20261121_G``); for a venv inside a repo it yields that
  repo's HEAD (or the string ``HEAD`` in a repo without commits).
* Predictions: ``<pred_root>/<model>_<data>.xlsx`` (always xlsx in run.py; column ``prediction``
  added to the dataset rows, the ``image`` column dropped).
* In-flight results: ``<pred_root>/<rank><world_size>_<data>.pkl`` (e.g. ``01_MME_tiny.pkl``), a
  pickled ``{index: prediction}`` dict dumped every 10 samples (inference.py:166) and at the end,
  deleted after the xlsx is written (inference.py:215). ``<model>_<data>_PREV.pkl`` holds the
  predictions of an existing xlsx (inference.py:182-189).
* Y/N scoring (MME): ``<model>_<data>_auxmatch.xlsx`` (per-row ``extracted`` Yes/No/Unknown and
  ``score``), ``<model>_<data>_score.csv`` (one row: ``perception``, ``reasoning``, then the 14
  categories), ``_tmp.pkl`` only when an LLM judge is used. MCQ scoring writes
  ``<model>_<data>_<judge>_result.xlsx``/``.pkl`` and ``<model>_<data>_acc.csv``.
* After evaluation, symlinks to every ``<model>_<data>*`` file are made in ``<work-dir>/<model>/``
  (run.py:453-462).

Resumption:

* Same day (same ``pred_root``): an interrupted run resumes from ``<rank><ws>_<data>.pkl``
  (inference.py:101-102), only missing indices are generated. If the xlsx already exists, all its
  predictions are reused (``_PREV.pkl``) and, when complete, the model is not even built
  (inference.py:110-119) -- this happens *without* ``--reuse``. Changing the model's behaviour
  without changing its name therefore silently reuses old predictions.
* A new day (or a new vlmeval githash) gives a new ``pred_root``: nothing is reused unless
  ``--reuse`` is passed; then the newest previous ``pred_root`` containing ``<model>_<data>.xlsx``
  is found and that xlsx (plus its aux files with ``--reuse-aux``, default True) copied over, or
  pkl files from a previous root with the *same* githash (run.py:276-312).
* ``--ignore`` keeps earlier API failures instead of retrying them (inference.py:187).

Judges: with ``--judge exact_matching``, Y/N datasets (MME, POPE, HallusionBench) extract the
answer with a word match (``yes`` xor ``no`` in the lower-cased prediction, else ``Unknown``, which
scores as wrong; dataset/utils/yorn.py:241). Without ``--judge``, run.py:366-372 sets
``chatgpt-0125``; Y/N evaluation then falls back to exact matching with warnings when
``OPENAI_API_KEY`` does not start with ``sk-`` (image_yorn.py:63-74), but would try the network if a
key is set. MCQ datasets (MMBench, ScienceQA, ...) with ``exact_matching`` use ``can_infer``
(option letter or unique option text in the prediction; otherwise option ``Z`` = wrong,
dataset/utils/multiple_choice.py:350-353); without ``--judge`` they build the GPT judge and
``assert model.working()`` (image_mcq.py:251-260), which fails offline. Always pass
``--judge exact_matching`` here.

MME scoring (dataset/utils/yorn.py:60-103, selected by ``'MME' in dataset_name``, image_yorn.py:97):
per category, ``acc`` = mean over questions and ``acc+`` = mean over images of
``score[q0] * score[q1]`` (rows grouped by ``image_path``, so every image_path needs at least two
questions); category score = ``acc + acc+`` (0-200, in percent); ``perception`` sums 10
categories and ``reasoning`` 4 (KeyError unless all 14 are present). An always-"Yes" model on a
balanced set gets 50 per category, perception 500, reasoning 200.

Distributed: rank/world size come from env ``RANK``/``WORLD_SIZE`` (smp/misc.py:125); samples are
sharded ``range(rank, N, world_size)`` (inference.py:105) and rank 0 merges and evaluates. With
``WORLD_SIZE > 1``, run.py:208-214 calls ``torch.cuda.set_device(LOCAL_RANK)`` and
``init_process_group(backend='nccl')`` unconditionally: on a CPU-only torch this fails
(``torch._C`` has no ``_cuda_setDevice``; NCCL unavailable). ``torchrun`` on CPU therefore needs
our launcher to patch those two calls (e.g. make ``set_device`` a no-op and force ``gloo``) before
``main()``. Otherwise the loop only calls ``torch.cuda.empty_cache()`` (a no-op on CPU).

Dataset registration (this module)
----------------------------------
``build_dataset(name)`` (dataset/__init__.py:243) picks the first class whose
``supported_datasets()`` contains the name; ``ImageBaseDataset.supported_datasets()`` is
``list(cls.DATASET_URL)`` and is evaluated on every call (image_base.py:152). ``load_data``
(image_base.py:156-161) maps an empty URL to ``<name>.tsv`` and a missing ``DATASET_MD5`` entry to
"no md5 check"; ``prepare_tsv`` (image_base.py:99-119) then reads ``$LMUData/<name>.tsv`` without
any download as long as the file exists. Adding ``'MME_tiny': ''`` to
``ImageYORNDataset.DATASET_URL`` (image_yorn.py:26) is therefore enough: the Y/N class (TYPE
``'Y/N'``) loads it and its ``evaluate`` routes to ``MME_rating`` by substring. We also append the
name to the import-time list ``vlmeval.dataset.SUPPORTED_DATASETS`` (used by ``vlmutil dlist`` and
``fetch_aux_files`` for ``--reuse``). The registration lives in the Python process: under
``torchrun`` every rank runs the launcher script, so calling :func:`register_tiny_datasets` (and
registering the model) at the top of that script, before ``vlmeval.run.main()``, registers it in
every child. ``torchrun -m vlmeval.run`` cannot work for custom names.

Traps
-----
* ``$LMUData`` is only honoured when the directory exists (smp/file.py:83); otherwise
  ``~/LMUData`` is created and used.
* vlmeval dumps images to ``$LMUData/images/MME_tiny/<index>.jpg`` once and never rewrites an
  existing readable file (image_base.py:135). :func:`write_mme_tiny` therefore deletes that folder
  so that data written with another seed is not paired with stale images.
* In the real MME TSV the second question of an image stores the *index* of the first row in its
  ``image`` column (any value of at most 64 characters is read as an index, image_base.py:74); we
  reproduce that.
"""

from __future__ import annotations

import base64
import io
import logging
import random
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

MME_TINY = "MME_tiny"

# The 14 official MME categories, exactly as vlmeval's MME_rating expects them
# (vlmeval/dataset/utils/yorn.py, ``super_cates``).
MME_PERCEPTION = (
    "OCR", "artwork", "celebrity", "color", "count", "existence",
    "landmark", "position", "posters", "scene",
)
MME_REASONING = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")
MME_CATEGORIES = MME_PERCEPTION + MME_REASONING
MME_COLUMNS = ("index", "image", "question", "answer", "category", "image_path")

_DOT_COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
_BACKGROUNDS = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}
_WORDS = ("CAT", "SUN", "MAP", "BOX", "PEN", "CUP", "KEY", "OWL")
_SUFFIX = " Please answer yes or no."

# category -> (scene attribute the question is about, caption drawn in the image, question template)
_CATEGORY_SPEC = {
    "OCR": ("word", "word", "Does the text in the image read '{}'?"),
    "artwork": ("color", "none", "Is this artwork painted mainly in {}?"),
    "celebrity": ("word", "word", "Is the person in this image labelled '{}'?"),
    "color": ("color", "none", "Are the dots in this image {}?"),
    "count": ("count", "none", "Are there {} dots in this image?"),
    "existence": ("color", "none", "Is there a {} dot in this image?"),
    "landmark": ("word", "word", "Is the landmark in this picture marked '{}'?"),
    "position": ("side", "none", "Are the dots on the {} side of the image?"),
    "posters": ("word", "word", "Is the title of this poster '{}'?"),
    "scene": ("background", "none", "Is the background of this scene {}?"),
    "code_reasoning": ("sum", "code", "Is the output of the code in the image {}?"),
    "commonsense_reasoning": ("more_than", "none", "Are there more than {} dots in this image?"),
    "numerical_calculation": ("sum", "expr", "Is the answer to the arithmetic question in the image {}?"),
    "text_translation": ("word", "word", "Is it appropriate to translate the text in the image as '{}'?"),
}


def _random_scene(rng: random.Random) -> dict:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return {
        "color": rng.choice(sorted(_DOT_COLORS)),
        "background": rng.choice(sorted(_BACKGROUNDS)),
        "count": rng.randint(2, 4),
        "side": rng.choice(["left", "right"]),
        "word": rng.choice(_WORDS),
        "a": a,
        "b": b,
    }


def _true_and_false_value(attr: str, scene: dict, rng: random.Random) -> tuple[str, str]:
    """The attribute's true value and a different (false) value, both as question text."""
    if attr in ("color", "background", "word", "side"):
        pool = {"color": sorted(_DOT_COLORS), "background": sorted(_BACKGROUNDS), "word": list(_WORDS),
                "side": ["left", "right"]}[attr]
        true = scene[attr]
        return true, rng.choice([v for v in pool if v != true])
    if attr == "count":
        true = scene["count"]
        return str(true), str(rng.choice([v for v in range(1, 6) if v != true]))
    if attr == "more_than":  # "more than count-1" is true, "more than count" is false
        return str(scene["count"] - 1), str(scene["count"])
    if attr == "sum":
        true = scene["a"] + scene["b"]
        return str(true), str(true + rng.choice([-2, -1, 1, 2]))
    raise ValueError(attr)


def _draw(scene: dict, caption: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), _BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    r = max(2, size // 16)
    x0 = size // 4 if scene["side"] == "left" else 3 * size // 4
    for k in range(scene["count"]):
        y = int(size * (0.15 + 0.2 * k))
        draw.ellipse((x0 - r, y - r, x0 + r, y + r), fill=_DOT_COLORS[scene["color"]])
    text = {"none": "", "word": scene["word"], "expr": f"{scene['a']}+{scene['b']}=?",
            "code": f"print({scene['a']}+{scene['b']})"}[caption]
    if text:
        ink = (0, 0, 0) if scene["background"] != "black" else (255, 255, 255)
        draw.text((2, size - 14), text, fill=ink)
    return img


def _png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_mme_tiny(root: Path, n_per_category: int = 2, seed: int = 0, image_size: int = 112) -> Path:
    """Write ``<root>/MME_tiny.tsv`` (``root`` plays the role of ``$LMUData``) and return its path.

    Same structure as the real MME TSV: columns ``index, image, question, answer, category,
    image_path``; all 14 categories; ``n_per_category`` images per category, each with two
    questions, one answered "Yes" and one "No" (so the answers are exactly balanced); the first
    row of a pair holds the base64 PNG, the second row holds the first row's index in ``image``.
    Deterministic for a given ``seed``.
    """
    if n_per_category < 1:
        raise ValueError("n_per_category must be >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for category in MME_CATEGORIES:
        attr, caption, template = _CATEGORY_SPEC[category]
        for k in range(n_per_category):
            scene = _random_scene(rng)
            true_value, false_value = _true_and_false_value(attr, scene, rng)
            pair = [(template.format(true_value) + _SUFFIX, "Yes"),
                    (template.format(false_value) + _SUFFIX, "No")]
            if rng.random() < 0.5:
                pair.reverse()
            image_path = f"{category}/{k:04d}.png"
            first_index = len(rows)
            image_b64 = _png_base64(_draw(scene, caption, image_size))
            for j, (question, answer) in enumerate(pair):
                rows.append({
                    "index": len(rows),
                    "image": image_b64 if j == 0 else str(first_index),
                    "question": question,
                    "answer": answer,
                    "category": category,
                    "image_path": image_path,
                })
    path = root / f"{MME_TINY}.tsv"
    pd.DataFrame(rows, columns=list(MME_COLUMNS)).to_csv(path, sep="\t", index=False)
    # vlmeval caches decoded images by row index and never overwrites them: drop stale ones.
    stale = root / "images" / MME_TINY
    if stale.exists():
        shutil.rmtree(stale)
        logger.info("removed stale image cache %s", stale)
    logger.info("wrote %s (%d rows, %d images, seed=%d)", path, len(rows), len(rows) // 2, seed)
    return path


def register_tiny_datasets() -> None:
    """Register ``MME_tiny`` with vlmeval (idempotent; imports vlmeval).

    After this, ``build_dataset('MME_tiny')`` / ``vlmeval.run.main()`` with ``--data MME_tiny``
    read ``$LMUData/MME_tiny.tsv`` without md5 check or download and score it with MME_rating.
    Call it in every process that runs ``vlmeval.run.main()`` (under torchrun: in the launcher
    script, which every rank executes).
    """
    try:
        from tv_compat import ensure_torchvision
    except ImportError:  # pragma: no cover - tv_compat is a sibling module of this file
        logger.warning("tv_compat not importable; importing vlmeval may fail on a CPU-only torch")
    else:
        ensure_torchvision()
    import vlmeval.dataset as vdataset
    from vlmeval.dataset.image_yorn import ImageYORNDataset

    # Empty URL -> the file name is "<name>.tsv" under $LMUData; no DATASET_MD5 entry -> no md5
    # check, so no download is attempted while the file exists.
    ImageYORNDataset.DATASET_URL[MME_TINY] = ""
    ImageYORNDataset.DATASET_MD5.pop(MME_TINY, None)
    if MME_TINY not in vdataset.SUPPORTED_DATASETS:
        vdataset.SUPPORTED_DATASETS.append(MME_TINY)
    logger.debug("registered %s as an ImageYORNDataset (MME scoring)", MME_TINY)
