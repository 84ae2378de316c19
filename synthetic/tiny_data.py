"""Tiny synthetic benchmark data for running VLMEvalKit (``nvidia-vlmeval`` 26.3) fully offline.

Provides
--------
* :data:`TINY_DATASETS`: the paper's datasets, each as ``<REAL_NAME>_tiny`` with the real TSV
  layout of its VLMEvalKit dataset class (table below).
* :func:`write_tiny` writes ``<root>/<REAL_NAME>_tiny.tsv`` for one of them (``root`` plays the role
  of ``$LMUData``); :func:`write_all_tiny` writes them all; :func:`write_mme_tiny` is the MME
  writer under its historical name.
* :func:`register_tiny_datasets` makes ``--data <REAL_NAME>_tiny`` load that file offline (no md5
  check, no download) and score it with the real scoring of ``<REAL_NAME>``.
* :data:`JUDGE_REQUIRED`, :data:`JUDGE_OPTIONAL`, :data:`NO_JUDGE`, :func:`judge_note`,
  :func:`log_judge_notes`: which datasets need an LLM judge, and why.

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

Answer matching (see also "Judges" below): with ``--judge exact_matching``, Y/N datasets (MME,
POPE, HallusionBench) extract the answer with a word match (``yes`` xor ``no`` in the lower-cased
prediction, else ``Unknown``, which scores as wrong; dataset/utils/yorn.py:241). Without ``--judge``, run.py:366-372 sets
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
``build_dataset(name)`` (dataset/__init__.py:243) walks the list ``vlmeval.dataset.DATASET_CLASSES``
and builds the first class whose ``supported_datasets()`` contains the name;
``ImageBaseDataset.supported_datasets()`` is ``list(cls.DATASET_URL)``, evaluated on every call
(image_base.py:152). ``load_data`` (image_base.py:156-161) maps an empty URL to ``<name>.tsv`` and a
missing ``DATASET_MD5`` entry to "no md5 check"; ``prepare_tsv`` (image_base.py:99-119) then reads
``$LMUData/<name>.tsv`` without any download as long as the file exists.

:func:`register_tiny_datasets` therefore creates, per tiny dataset, a subclass of the real
dataset's class (``ImageYORNDataset``, ``ImageMCQDataset``, ``OCRBench``, ``MathVista``,
``MathVision``, ``MIABench``) whose ``DATASET_URL`` is ``{'<REAL_NAME>_tiny': ''}`` and whose
``DATASET_MD5`` is empty, and appends it to ``DATASET_CLASSES`` (and the name to the import-time
list ``SUPPORTED_DATASETS``, used by ``vlmutil dlist`` and by ``fetch_aux_files`` for ``--reuse``).
The real classes' tables are left untouched. The subclass inherits ``TYPE``, ``build_prompt`` and
``evaluate``; the real evaluate functions route by substring of the dataset name (``'MME'``,
``'POPE'``, ``'Hallusion'`` in image_yorn.py:97-104; ``'mmbench'`` -> circular evaluation in
image_mcq.py:244), so ``<REAL_NAME>_tiny`` takes the same branch as ``<REAL_NAME>``, and run.py's
default judge choice (run.py:363-382, also by substring) is the real one. The only override is
``evaluate``, which logs the judge situation (:func:`judge_note`) and then calls the real one; for
MIA-Bench it also redirects one hard-coded lookup (see below). The registration lives in the Python
process: under ``torchrun`` every rank runs the launcher script, so calling
:func:`register_tiny_datasets` (and registering the model) at the top of that script, before
``vlmeval.run.main()``, registers it in every child. ``torchrun -m vlmeval.run`` cannot work for
custom names.

The datasets and their formats
------------------------------
Columns are those the real class and its evaluate read (verified in the code cited) plus, where
noted, metadata columns of the upstream TSV that nothing in vlmeval reads. Indices are integers
``0..N-1`` unless stated. Rows that show the same image as an earlier row store that row's index
in ``image`` (any value of at most 64 characters is read as an index, image_base.py:74), as the real
TSVs do. ``n`` is the ``n`` argument of :func:`write_tiny`.

* ``MME_tiny`` (``ImageYORNDataset``): ``index, image, question, answer (Yes/No), category,
  image_path``; all 14 categories (MME_rating needs each of them, yorn.py:87-100); ``n`` images per
  category, each with one "Yes" and one "No" question (acc+ pairs rows by ``image_path``).
* ``MMBench_DEV_EN_tiny`` / ``MMBench_DEV_CN_tiny`` (``ImageMCQDataset``, circular evaluation):
  ``index, question, hint, A, B, C, D, answer (letter), category, image, source, l2-category,
  comment, split ('dev')``; ``l2-category`` is one of the six MMBench abilities
  (``MMB_abbrs`` in dataset/utils/multiple_choice.py:22-29) and ``category`` one of its 20 leaf
  skills. ``n`` questions with 2-4 options; as in the real TSV, a question with ``k`` options has
  ``k`` rows, the options rotated, at indices ``i, 1e6 + i, 2e6 + i, ...``; ``index % 1e6`` groups
  them and a question counts as correct only if every rotation is (mcq_circular_eval,
  multiple_choice.py:478-549). ``hint`` is empty for some rows (the prompt then has no "Hint:"
  line). The CN set has Chinese questions, hints and options and the same English category names.
  ``source`` and ``comment`` are upstream metadata.
* ``SEEDBench2_Plus_tiny`` (``ImageMCQDataset``, plain evaluation): ``index, image, question, A, B,
  C, D, answer, category`` with ``category`` in ``chart``, ``map``, ``web``.
* ``ScienceQA_VAL_tiny`` / ``ScienceQA_TEST_tiny`` (``ImageMCQDataset``, plain evaluation): ``index,
  image, question, hint, A, B, C, D, E, answer, category, split``; 2 to 5 options (unused option
  cells empty), ScienceQA category names (e.g. ``Classification``), ``split`` ``val`` / ``test``.
* ``OCRBench_tiny`` (``OCRBench``): ``index, image, question, answer, category``; ``answer`` is a
  Python list literal of accepted strings (``"['CAT']"``, read with ``eval``, image_vqa.py:189);
  the 10 OCRBench categories (image_vqa.py:170-181), ``n`` questions per category. A question
  scores if one accepted answer is a substring of the prediction (case-insensitive; spaces
  removed for the formula category). The score is written to ``<model>_OCRBench_tiny_score.json``;
  its ``Final Score Norm`` is the hit count / 10, which is a percentage only for the real 1000
  questions.
* ``MathVista_MINI_tiny`` (``MathVista``): ``index, image, question, answer, question_type
  (multi_choice / free_form), answer_type (text / integer / float), choices (list literal, empty
  for free_form), answer_option (letter, multi_choice only), task, skills (list literal)``, the
  columns MathVista_auxeval / MathVista_acc read (dataset/utils/mathvista.py:89-179); ``question``
  is MathVista's full query (``Hint: ...`` + ``Question: ...`` [+ ``Choices:``]), as the judge's
  in-context examples expect. ``n`` questions cycling through the five MathVista tasks.
* ``MathVision_MINI_tiny`` (``MathVision``): ``index, image, question, answer, choices, category,
  level``; ``answer`` is a letter when ``choices`` (a list literal) is non-empty, else the value;
  ``category`` is the subject, which MATH_V_acc reports (dataset/utils/mathv.py:166-195);
  ``level`` (1-5) is upstream metadata. Multiple-choice questions list their options in
  ``question`` (``Choices:`` lines), since the default prompt is the question alone.
* ``MIA-Bench_tiny`` (``MIABench``): ``index, image, question, num_of_component, components,
  component_weight, component_type``; the last three are list literals; ``component_type`` must be
  written exactly as ``"['a', 'b']"`` (get_score_dict slices ``[2:-2]`` and splits on
  ``"', '"``, miabench.py:101-102) and the weights of a row sum to 10.
* ``POPE_tiny`` (``ImageYORNDataset``): ``index, image, question, answer (Yes/No), category``.
  ``n`` images; per image one "Yes" question shared by the three POPE subsets (``category`` =
  ``"adversarial,popular,random"``; POPE_rating splits on ``,`` and counts the row once per subset,
  yorn.py:170) and three "No" questions, one per subset.
* ``HallusionBench_tiny`` (``ImageYORNDataset``): ``index, image, question, answer (Yes/No),
  category (VD / VS), l2-category``; string indices
  ``<category>_<l2-category>_<visual_input>_<set>_<figure>_<question>``: Hallusion_rating reads
  fields 3, 4, 5 as set, figure and question id (yorn.py:127-129) and groups by figure (fAcc) and
  by question across figures (qAcc); fields 0-2 follow HallusionBench's own ``category``,
  ``subcategory`` and ``visual_input`` fields. ``n`` sets, each an original and an edited figure
  with two questions whose answers flip between the figures.

Judges
------
The official score of three of the datasets needs an LLM judge, and vlmeval 26.3 has no
exact-matching fallback for any of them (:data:`JUDGE_REQUIRED`):

* MathVista_MINI (image_vqa.py:266-312): evaluate builds the judge and ``assert model.working()``
  before scoring (image_vqa.py:278-279), even though a rule-based prefetch (post_check,
  mathvista.py:89-116) would settle exact answers. With ``--judge exact_matching`` and no key,
  ``build_judge`` creates ``OpenAIWrapper('exact_matching')``, whose ``get_api_key`` asserts that
  ``OPENAI_API_KEY`` starts with ``sk-`` (api/gpt.py:67-73): AssertionError; run.py logs
  "combination failed" (run.py:464-467) and writes no score file. With a key but no reachable
  server, ``working()`` retries and the same assertion fails.
* MathVision_MINI (image_vqa.py:456-505): the same (image_vqa.py:471-472). In addition, for
  free-form questions its prefetch calls ``is_equal``, decorated with ``timeout_decorator``
  (signals, mathv.py:29), inside the judge's worker threads (track_progress_rich), where Python
  refuses signals ("signal only works in main thread"); post_check logs and swallows the error
  (mathv.py:141-143), so every free-form row goes to the judge's answer extraction, even a bare
  correct number. Multiple-choice rows return before ``is_equal`` and are prefetched.
* MIA-Bench (miabench.py:128-182): the judge grades every response per instruction component;
  there is no rule-based score at all. ``build_judge`` is called unconditionally (miabench.py:131).
  Also, evaluate rebuilds the *real* dataset ``MIABench('MIA-Bench')`` to fetch the images it sends
  to the judge (miabench.py:143), i.e. reads or downloads ``$LMUData/Mia-Bench.tsv``; for
  ``MIA-Bench_tiny`` the subclass points that lookup at the tiny TSV while its evaluate runs.

Everything else scores without a judge: MME, POPE, HallusionBench match yes/no words
(YOrN_Extraction, yorn.py:241-248) and use a judge only for answers without a clear yes/no;
MMBench, SEEDBench2_Plus, ScienceQA match the option letter or a unique option text
(can_infer, multiple_choice.py:349-353) and use a judge only when that fails; OCRBench is pure
substring matching. Their default judge (``chatgpt-0125``, run.py:366-372) needs an OpenAI key: for
MCQ datasets a missing key is fatal (image_mcq.py:256-260), for Y/N datasets vlmeval falls back to
exact matching with a warning (image_yorn.py:63-74). Offline, pass ``--judge exact_matching``.

A user-configured judge goes through unchanged: ``--judge NAME`` (``gpt-4o-mini`` for MathVista /
MathVision and ``gpt-4o`` for MIA-Bench are run.py's defaults, run.py:375-378; ``--judge-args``
JSON adds keyword arguments) and the environment read by ``build_judge``
(dataset/utils/judge_util.py:25-62) and ``OpenAIWrapper`` (api/gpt.py:50-148):
``OPENAI_API_KEY`` (must start with ``sk-``), ``OPENAI_API_BASE`` (full chat-completions URL of
any OpenAI-compatible server, e.g. a local vLLM / LMDeploy), ``LOCAL_LLM`` (model name sent to
that server, replaces the judge name's mapping), or ``AZURE_OPENAI_API_KEY`` /
``AZURE_OPENAI_ENDPOINT`` / ``AZURE_OPENAI_DEPLOYMENT_NAME`` / ``OPENAI_API_VERSION`` with
``--judge-args '{"use_azure": true}'``. ``load_env()`` also copies non-empty values from
``<site-packages>/.env`` into the environment (smp/misc.py:212-235). ``EVAL_PROXY`` sets a proxy
for the evaluation only (run.py:430-433).

Traps
-----
* ``$LMUData`` is only honoured when the directory exists (smp/file.py:83); otherwise
  ``~/LMUData`` is created and used.
* vlmeval dumps images to ``$LMUData/images/<name>/<index>.jpg`` once and never rewrites an
  existing readable file (image_base.py:135). :func:`write_tiny` therefore deletes that folder
  so that data written with another seed is not paired with stale images.
* The image cache folder is ``images/<name>`` for every tiny name (img_root_map, image_base.py:21,
  maps only the real MMBench names to a shared ``MMBench`` folder).
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import pandas as pd
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

TINY_SUFFIX = "_tiny"
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

# MMBench: the six abilities (``l2-category``) and their 20 leaf skills (``category``), as in the
# real TSV; the abilities are the keys of vlmeval's MMB_abbrs (dataset/utils/multiple_choice.py).
MMBENCH_L2_CATEGORIES = {
    "coarse_perception": ("image_style", "image_scene", "image_emotion", "image_quality", "image_topic"),
    "finegrained_perception (instance-level)": (
        "object_localization", "attribute_recognition", "celebrity_recognition", "ocr"),
    "finegrained_perception (cross-instance)": (
        "spatial_relationship", "attribute_comparison", "action_recognition"),
    "logic_reasoning": ("structuralized_imagetext_understanding", "future_prediction"),
    "relation_reasoning": ("social_relation", "physical_relation", "nature_relation"),
    "attribute_reasoning": ("physical_property_reasoning", "function_reasoning", "identity_reasoning"),
}
SEEDBENCH2_PLUS_CATEGORIES = ("chart", "map", "web")
SCIENCEQA_CATEGORIES = ("Classification", "Astronomy", "Atoms and molecules", "Cells", "Adaptations",
                        "Chemical reactions")
# The ten OCRBench categories, exactly as OCRBench.evaluate counts them (image_vqa.py).
OCRBENCH_CATEGORIES = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
    "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
MATHVISTA_TASKS = ("figure question answering", "geometry problem solving", "math word problem",
                   "textbook question answering", "visual question answering")
MATHVISION_SUBJECTS = ("counting", "arithmetic", "algebra", "combinatorics")
POPE_CATEGORIES = ("adversarial", "popular", "random")
HALLUSIONBENCH_L2_CATEGORIES = ("chart", "figure", "illusion", "map", "math", "ocr", "table", "video")

_LETTERS = "ABCDE"
_COLOR_CN = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
_BACKGROUND_CN = {"white": "白色", "gray": "灰色", "black": "黑色"}
_SIDE_CN = {"left": "左边", "right": "右边"}


# ---------------------------------------------------------------------------------------------
# Judges
# ---------------------------------------------------------------------------------------------

# Datasets whose official score needs an LLM judge; vlmeval 26.3 has no exact-matching fallback for
# any of them (details and file:line references in the module docstring, section "Judges").
JUDGE_REQUIRED = {
    "MathVista_MINI": (
        "an LLM extracts the answer from free-form responses; vlmeval builds the judge and asserts it "
        "works before scoring (dataset/image_vqa.py:278-279), with no exact-matching fallback"
    ),
    "MathVision_MINI": (
        "an LLM extracts the answer from free-form responses; vlmeval builds the judge and asserts it "
        "works before scoring (dataset/image_vqa.py:471-472), with no exact-matching fallback"
    ),
    "MIA-Bench": (
        "an LLM grades each response per instruction component (dataset/miabench.py:131-182); there is "
        "no rule-based score"
    ),
}
# Datasets scored by rules; an LLM judge, if configured, only parses answers the rules cannot.
JUDGE_OPTIONAL = {
    **dict.fromkeys(("MME", "POPE", "HallusionBench"), (
        "yes/no word matching (dataset/utils/yorn.py:241-248); a judge only maps answers without a "
        "clear yes/no")),
    **dict.fromkeys(("MMBench_DEV_EN", "MMBench_DEV_CN", "SEEDBench2_Plus", "ScienceQA_VAL",
                     "ScienceQA_TEST"), (
        "option letter / unique option text matching (can_infer, dataset/utils/multiple_choice.py:"
        "349-353); a judge only extracts the option when that fails")),
}
NO_JUDGE = {"OCRBench": "substring matching of the reference answers (dataset/image_vqa.py:168-255)"}
# What run.py uses when --judge is not given (run.py:363-382).
DEFAULT_JUDGE = {
    **dict.fromkeys(JUDGE_OPTIONAL, "chatgpt-0125"),
    "MathVista_MINI": "gpt-4o-mini",
    "MathVision_MINI": "gpt-4o-mini",
    "MIA-Bench": "gpt-4o",
}
JUDGE_ENV_VARS = ("OPENAI_API_KEY", "OPENAI_API_BASE", "LOCAL_LLM", "AZURE_OPENAI_API_KEY",
                  "AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_DEPLOYMENT_NAME", "OPENAI_API_VERSION")


def real_name(dataset: str) -> str:
    """``'POPE_tiny'`` -> ``'POPE'``; other names are returned unchanged."""
    return dataset[: -len(TINY_SUFFIX)] if dataset.endswith(TINY_SUFFIX) else dataset


def judge_note(dataset: str, judge: str | None) -> tuple[int, str] | None:
    """``(logging level, message)`` on how ``dataset`` (real or tiny name) is scored with ``judge``
    (the ``--judge`` value; None when it is not given), or None for a dataset not covered here."""
    real = real_name(dataset)
    shown = judge or f"none given (vlmeval picks {DEFAULT_JUDGE.get(real, 'its default')})"
    if real in JUDGE_REQUIRED:
        has_key = os.environ.get("OPENAI_API_KEY", "").startswith("sk-") or "AZURE_OPENAI_API_KEY" in os.environ
        if judge in (None, "exact_matching") or not has_key:
            problem = ("vlmeval 26.3 has no exact-matching fallback for it" if judge == "exact_matching"
                       else "OPENAI_API_KEY (sk-...) is not set")
            return logging.WARNING, (
                f"{dataset}: the official score needs an LLM judge ({JUDGE_REQUIRED[real]}). "
                f"Judge: {shown}; {problem}. Without a reachable judge vlmeval stops this evaluation "
                "with an AssertionError and writes no score file; configure one with --judge NAME plus "
                "OPENAI_API_KEY (sk-...) and, for a local OpenAI-compatible server, OPENAI_API_BASE "
                "(full chat-completions URL) and LOCAL_LLM (served model name)")
        where = os.environ.get("OPENAI_API_BASE") or "the OpenAI API"
        return logging.INFO, f"{dataset}: scored with the LLM judge {judge!r} at {where} ({JUDGE_REQUIRED[real]})"
    if real in JUDGE_OPTIONAL:
        return logging.INFO, f"{dataset}: {JUDGE_OPTIONAL[real]}; judge: {shown}"
    if real in NO_JUDGE:
        return logging.INFO, f"{dataset}: no judge used, {NO_JUDGE[real]}"
    return None


def log_judge_notes(datasets: Iterable[str], judge: str | None) -> None:
    """Log :func:`judge_note` for each dataset (e.g. before a run, with the ``--data`` names)."""
    for dataset in datasets:
        note = judge_note(dataset, judge)
        if note is not None:
            logger.log(*note)


# ---------------------------------------------------------------------------------------------
# Images and questions
# ---------------------------------------------------------------------------------------------

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


def _render(scene: dict, text: str, size: int | tuple[int, int]) -> Image.Image:
    """Dots of one colour on one side of a plain background, ``text`` written at the bottom;
    ``size`` is a square's side or ``(width, height)``."""
    w, h = (size, size) if isinstance(size, int) else size
    img = Image.new("RGB", (w, h), _BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    r = max(2, min(w, h) // 16)
    x0 = w // 4 if scene["side"] == "left" else 3 * w // 4
    for k in range(scene["count"]):
        y = int(h * (0.15 + 0.2 * k))
        draw.ellipse((x0 - r, y - r, x0 + r, y + r), fill=_DOT_COLORS[scene["color"]])
    if text:
        ink = (0, 0, 0) if scene["background"] != "black" else (255, 255, 255)
        draw.text((2, h - 14), text, fill=ink)
    return img


def _draw(scene: dict, caption: str, size: int | tuple[int, int]) -> Image.Image:
    text = {"none": "", "word": scene["word"], "expr": f"{scene['a']}+{scene['b']}=?",
            "code": f"print({scene['a']}+{scene['b']})"}[caption]
    return _render(scene, text, size)


def _png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


# kind -> (English question, Chinese question, caption drawn)
_FACTS = {
    "color": ("What color are the dots in the image?", "图中圆点是什么颜色？", "none"),
    "count": ("How many dots are in the image?", "图中有几个圆点？", "none"),
    "side": ("On which side of the image are the dots?", "圆点位于图像的哪一侧？", "none"),
    "background": ("What is the background color of the image?", "图像的背景是什么颜色？", "none"),
    "word": ("Which word is written at the bottom of the image?", "图像底部写的是哪个单词？", "word"),
    "sum": ("What is the result of the expression written in the image?", "图中算式的结果是多少？", "expr"),
}


def _options(kind: str, scene: dict, rng: random.Random, n_options: int, lang: str = "en") -> tuple[list[str], str]:
    """``n_options`` distinct option texts in random order (one correct) and the correct one."""
    if kind == "count":
        pool, correct = [str(v) for v in range(1, 6)], str(scene["count"])
    elif kind == "sum":
        total = scene["a"] + scene["b"]
        pool, correct = [str(total + d) for d in (-2, -1, 0, 1, 2)], str(total)
    else:
        pool = {"color": sorted(_DOT_COLORS), "side": ["left", "right"], "background": sorted(_BACKGROUNDS),
                "word": list(_WORDS)}[kind]
        correct = scene[kind]
    if n_options > len(pool):
        raise ValueError(f"{kind} has only {len(pool)} options")
    options = [correct] + rng.sample([v for v in pool if v != correct], n_options - 1)
    rng.shuffle(options)
    if lang == "cn":
        table = {"color": _COLOR_CN, "side": _SIDE_CN, "background": _BACKGROUND_CN}.get(kind, {})
        options, correct = [table.get(v, v) for v in options], table.get(correct, correct)
    return options, correct


def _max_options(kind: str) -> int:
    return {"side": 2, "background": 3, "color": 4, "word": 4, "count": 5, "sum": 5}[kind]


def _list_literal(values) -> str:
    """A Python list literal as the real TSVs store lists (read back with ``eval``)."""
    return repr(list(values))


# ---------------------------------------------------------------------------------------------
# Row builders: (rng, n, image_size) -> rows
# ---------------------------------------------------------------------------------------------

def _mme_rows(rng: random.Random, n: int, size: int) -> list[dict]:
    rows = []
    for category in MME_CATEGORIES:
        attr, caption, template = _CATEGORY_SPEC[category]
        for k in range(n):
            scene = _random_scene(rng)
            true_value, false_value = _true_and_false_value(attr, scene, rng)
            pair = [(template.format(true_value) + _SUFFIX, "Yes"),
                    (template.format(false_value) + _SUFFIX, "No")]
            if rng.random() < 0.5:
                pair.reverse()
            image_path = f"{category}/{k:04d}.png"
            first_index = len(rows)
            image_b64 = _png_base64(_draw(scene, caption, size))
            for j, (question, answer) in enumerate(pair):
                rows.append({
                    "index": len(rows),
                    "image": image_b64 if j == 0 else str(first_index),
                    "question": question,
                    "answer": answer,
                    "category": category,
                    "image_path": image_path,
                })
    return rows


_MMBENCH_KIND = {  # ability -> kind of question asked about the synthetic image
    "coarse_perception": "background",
    "finegrained_perception (instance-level)": "color",
    "finegrained_perception (cross-instance)": "side",
    "logic_reasoning": "sum",
    "relation_reasoning": "count",
    "attribute_reasoning": "word",
}


def _mmbench_rows(lang: str) -> Callable[[random.Random, int, int], list[dict]]:
    hints = {"en": "The image shows coloured dots on a plain background.", "cn": "图像中有彩色圆点和纯色背景。"}

    def rows_for(rng: random.Random, n: int, size: int) -> list[dict]:
        abilities = list(MMBENCH_L2_CATEGORIES)
        base, rotations = [], []
        for i in range(n):
            l2 = abilities[i % len(abilities)]
            leaves = MMBENCH_L2_CATEGORIES[l2]
            category = leaves[(i // len(abilities)) % len(leaves)]
            kind = _MMBENCH_KIND[l2]
            scene = _random_scene(rng)
            n_options = rng.randint(2, min(4, _max_options(kind)))
            options, correct = _options(kind, scene, rng, n_options, lang)
            question = _FACTS[kind][0 if lang == "en" else 1]
            hint = hints[lang] if i % 3 == 0 else None
            image_b64 = _png_base64(_draw(scene, _FACTS[kind][2], size))
            for k in range(n_options):  # circular copies: options rotated by k, index k * 1e6 + i
                rotated = options[k:] + options[:k]
                row = {
                    "index": k * 1_000_000 + i,
                    "question": question,
                    "hint": hint,
                    **{letter: (rotated[j] if j < n_options else None) for j, letter in enumerate("ABCD")},
                    "answer": _LETTERS[rotated.index(correct)],
                    "category": category,
                    "image": image_b64 if k == 0 else str(i),
                    "source": "synthetic",
                    "l2-category": l2,
                    "comment": None,
                    "split": "dev",
                }
                (base if k == 0 else rotations).append(row)
        rotations.sort(key=lambda r: r["index"])
        return base + rotations

    return rows_for


def _plain_mcq_rows(categories: tuple[str, ...], kinds: tuple[str, ...], n_options: Callable[[str, random.Random], int],
                    hint: str | None, split: str | None, letters: str) -> Callable[[random.Random, int, int], list[dict]]:
    def rows_for(rng: random.Random, n: int, size: int) -> list[dict]:
        rows = []
        for i in range(n):
            kind = kinds[i % len(kinds)]
            scene = _random_scene(rng)
            k = n_options(kind, rng)
            options, correct = _options(kind, scene, rng, k)
            row = {"index": i, "image": _png_base64(_draw(scene, _FACTS[kind][2], size)),
                   "question": _FACTS[kind][0]}
            if hint is not None:
                row["hint"] = hint if i % 2 == 0 else None
            row.update({letter: (options[j] if j < k else None) for j, letter in enumerate(letters)})
            row["answer"] = _LETTERS[options.index(correct)]
            row["category"] = categories[i % len(categories)]
            if split is not None:
                row["split"] = split
            rows.append(row)
        return rows

    return rows_for


def _ocrbench_rows(rng: random.Random, n: int, size: int) -> list[dict]:
    rows = []
    for category in OCRBENCH_CATEGORIES:
        for _ in range(n):
            scene = _random_scene(rng)
            if category == "Digit String Recognition":
                text = "".join(rng.choice("0123456789") for _ in range(4))
                question, answers = "what is the number in the image?", [text]
            elif category == "Non-Semantic Text Recognition":
                text = "".join(rng.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(4))
                question, answers = "what is written in the image?", [text]
            elif category == "Handwritten Mathematical Expression Recognition":
                text = f"{scene['a']}+{scene['b']}"
                question = "Please write out the expression of the formula in the image using LaTeX format."
                answers = [text]
            elif category == "Key Information Extraction":
                text = f"TOTAL {scene['a']}{scene['b']}"
                question, answers = "what is the total in the image?", [f"{scene['a']}{scene['b']}"]
            elif category == "Doc-oriented VQA":
                text = scene["word"]
                question, answers = "What is the title of this document?", [text, text.lower()]
            elif category == "Scene Text-centric VQA":
                text = scene["word"]
                question, answers = "what word is written on the sign?", [text]
            else:
                text = scene["word"]
                question, answers = "what is written in the image?", [text]
            rows.append({"index": len(rows), "image": _png_base64(_render(scene, text, size)),
                         "question": question, "answer": _list_literal(answers), "category": category})
    return rows


_MATHVISTA_HINTS = {
    "multi_choice": "Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Please answer the question requiring an integer answer and provide the final value, "
               "e.g., 1, 2, 3, at the end.",
    "float": "Please answer the question requiring a floating-point number with one decimal place and "
             "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
}
# task -> (question_type, answer_type, kind, skills)
_MATHVISTA_ITEMS = {
    "figure question answering": ("free_form", "integer", "count", ["statistical reasoning"]),
    "geometry problem solving": ("multi_choice", "text", "side", ["geometry reasoning"]),
    "math word problem": ("free_form", "integer", "sum", ["arithmetic reasoning"]),
    "textbook question answering": ("free_form", "float", "half_sum", ["algebraic reasoning", "arithmetic reasoning"]),
    "visual question answering": ("multi_choice", "text", "color", ["logical reasoning"]),
}


def _mathvista_rows(rng: random.Random, n: int, size: int) -> list[dict]:
    rows = []
    for i in range(n):
        task = MATHVISTA_TASKS[i % len(MATHVISTA_TASKS)]
        question_type, answer_type, kind, skills = _MATHVISTA_ITEMS[task]
        scene = _random_scene(rng)
        choices, option = [], None
        if kind == "half_sum":
            question = "What is half of the result of the expression written in the image?"
            answer, caption = f"{(scene['a'] + scene['b']) / 2:.1f}", "expr"
        elif question_type == "multi_choice":
            choices, answer = _options(kind, scene, rng, _max_options(kind))
            option = _LETTERS[choices.index(answer)]
            question, caption = _FACTS[kind][0], _FACTS[kind][2]
        else:
            question, caption = _FACTS[kind][0], _FACTS[kind][2]
            answer = str(scene["count"] if kind == "count" else scene["a"] + scene["b"])
        query = f"Hint: {_MATHVISTA_HINTS[answer_type if question_type == 'free_form' else question_type]}\n"
        query += f"Question: {question}"
        if choices:
            query += "\nChoices:\n" + "\n".join(f"({_LETTERS[j]}) {c}" for j, c in enumerate(choices))
        rows.append({
            "index": i, "image": _png_base64(_draw(scene, caption, size)), "question": query,
            "answer": answer, "question_type": question_type, "answer_type": answer_type,
            "choices": _list_literal(choices) if choices else None, "answer_option": option,
            "task": task, "skills": _list_literal(skills),
        })
    return rows


def _mathvision_rows(rng: random.Random, n: int, size: int) -> list[dict]:
    rows = []
    for i in range(n):
        kind = ("count", "sum")[i % 2]
        multiple_choice = (i // 2) % 2 == 0
        scene = _random_scene(rng)
        question = _FACTS[kind][0]
        if multiple_choice:
            choices, correct = _options(kind, scene, rng, 5)
            answer = _LETTERS[choices.index(correct)]
            question += "\nChoices:\n" + "\n".join(f"({_LETTERS[j]}) {c}" for j, c in enumerate(choices))
        else:
            choices = []
            answer = str(scene["count"] if kind == "count" else scene["a"] + scene["b"])
        rows.append({
            "index": i, "image": _png_base64(_draw(scene, _FACTS[kind][2], size)), "question": question,
            "answer": answer, "choices": _list_literal(choices),
            "category": MATHVISION_SUBJECTS[i % len(MATHVISION_SUBJECTS)], "level": 1 + i % 5,
        })
    return rows


# (instruction, [(component, weight, type), ...]); weights of one instruction sum to 10.
_MIA_INSTRUCTIONS = (
    ("What color are the dots? Answer with one word.",
     [("Name the color of the dots in one word", 10, "length_limit")]),
    ("Describe the image in exactly two sentences and mention how many dots there are.",
     [("Describe the image in exactly two sentences", 5, "length_limit"),
      ("Mention how many dots there are", 5, "mention")]),
    ("Write a short poem about the image that includes the word written in it and uses the first person.",
     [("Write a short poem about the image", 4, "genre"), ("Include the word written in the image", 3, "OCR"),
      ("Use the first person", 3, "perspective")]),
    ("Describe the background, count the dots, add their number to five, and answer in the past tense.",
     [("Describe the background", 3, "describe"), ("Count the dots", 2, "mention"),
      ("Add their number to five", 3, "math"), ("Answer in the past tense", 2, "grammar")]),
)


def _miabench_rows(rng: random.Random, n: int, size: int) -> list[dict]:
    rows = []
    for i in range(n):
        instruction, components = _MIA_INSTRUCTIONS[i % len(_MIA_INSTRUCTIONS)]
        scene = _random_scene(rng)
        rows.append({
            "index": i, "image": _png_base64(_draw(scene, "word", size)), "question": instruction,
            "num_of_component": len(components),
            "components": _list_literal(c for c, _, _ in components),
            "component_weight": _list_literal(w for _, w, _ in components),
            "component_type": _list_literal(t for _, _, t in components),
        })
    return rows


def _pope_rows(rng: random.Random, n: int, size: int) -> list[dict]:
    rows = []
    for _ in range(n):
        scene = _random_scene(rng)
        absent = [c for c in sorted(_DOT_COLORS) if c != scene["color"]]
        rng.shuffle(absent)
        questions = [(scene["color"], "Yes", ",".join(POPE_CATEGORIES))]
        questions += [(color, "No", category) for color, category in zip(absent, POPE_CATEGORIES)]
        rng.shuffle(questions)
        first = len(rows)
        image_b64 = _png_base64(_draw(scene, "none", size))
        for j, (color, answer, category) in enumerate(questions):
            rows.append({"index": len(rows), "image": image_b64 if j == 0 else str(first),
                         "question": f"Is there a {color} dot in the image?", "answer": answer,
                         "category": category})
    return rows


def _hallusionbench_rows(rng: random.Random, n: int, size: int) -> list[dict]:
    rows = []
    for s in range(n):
        category = ("VD", "VS")[s % 2]
        l2 = HALLUSIONBENCH_L2_CATEGORIES[s % len(HALLUSIONBENCH_L2_CATEGORIES)]
        original = _random_scene(rng)
        edited = dict(original, color=rng.choice([c for c in sorted(_DOT_COLORS) if c != original["color"]]))
        colors = (original["color"], edited["color"])
        for figure, scene in enumerate((original, edited)):
            first = f"{category}_{l2}_1_{s}_{figure}_0"
            image_b64 = _png_base64(_draw(scene, "none", size))
            for q, color in enumerate(colors):
                rows.append({
                    "index": f"{category}_{l2}_1_{s}_{figure}_{q}",
                    "image": image_b64 if q == 0 else first,
                    "question": f"Are the dots in this figure {color}?",
                    "answer": "Yes" if scene["color"] == color else "No",
                    "category": category,
                    "l2-category": l2,
                })
    return rows


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TinySpec:
    """One tiny dataset: the real VLMEvalKit name and class, TSV columns, row builder, default n."""

    real: str
    vlmeval_class: str
    columns: tuple[str, ...]
    rows: Callable[[random.Random, int, int], list[dict]]
    default_n: int
    n_means: str

    @property
    def tiny(self) -> str:
        return self.real + TINY_SUFFIX


_MCQ4 = ("A", "B", "C", "D")
_MMBENCH_COLUMNS = ("index", "question", "hint", *_MCQ4, "answer", "category", "image", "source",
                    "l2-category", "comment", "split")
_SCIENCEQA_COLUMNS = ("index", "image", "question", "hint", *_MCQ4, "E", "answer", "category", "split")


def _scienceqa(split: str) -> Callable[[random.Random, int, int], list[dict]]:
    return _plain_mcq_rows(
        SCIENCEQA_CATEGORIES, ("side", "background", "color", "count"),
        lambda kind, rng: rng.randint(2, _max_options(kind)),
        hint="The picture shows a few dots.", split=split, letters="ABCDE")


_SPECS = (
    TinySpec("MME", "ImageYORNDataset", MME_COLUMNS, _mme_rows, 2, "images per category (2 questions each)"),
    TinySpec("MMBench_DEV_EN", "ImageMCQDataset", _MMBENCH_COLUMNS, _mmbench_rows("en"), 6,
             "questions (each with one row per option rotation)"),
    TinySpec("MMBench_DEV_CN", "ImageMCQDataset", _MMBENCH_COLUMNS, _mmbench_rows("cn"), 6,
             "questions (each with one row per option rotation)"),
    TinySpec("SEEDBench2_Plus", "ImageMCQDataset", ("index", "image", "question", *_MCQ4, "answer", "category"),
             _plain_mcq_rows(SEEDBENCH2_PLUS_CATEGORIES, ("color", "count", "word", "sum"),
                             lambda kind, rng: 4, hint=None, split=None, letters="ABCD"),
             6, "questions"),
    TinySpec("OCRBench", "OCRBench", ("index", "image", "question", "answer", "category"), _ocrbench_rows, 1,
             "questions per category"),
    TinySpec("MathVista_MINI", "MathVista",
             ("index", "image", "question", "answer", "question_type", "answer_type", "choices",
              "answer_option", "task", "skills"),
             _mathvista_rows, 5, "questions"),
    TinySpec("MathVision_MINI", "MathVision", ("index", "image", "question", "answer", "choices", "category", "level"),
             _mathvision_rows, 4, "questions"),
    TinySpec("MIA-Bench", "MIABench",
             ("index", "image", "question", "num_of_component", "components", "component_weight", "component_type"),
             _miabench_rows, 4, "instructions"),
    TinySpec("ScienceQA_VAL", "ImageMCQDataset", _SCIENCEQA_COLUMNS, _scienceqa("val"), 6, "questions"),
    TinySpec("ScienceQA_TEST", "ImageMCQDataset", _SCIENCEQA_COLUMNS, _scienceqa("test"), 6, "questions"),
    TinySpec("POPE", "ImageYORNDataset", ("index", "image", "question", "answer", "category"), _pope_rows, 3,
             "images (4 questions each)"),
    TinySpec("HallusionBench", "ImageYORNDataset",
             ("index", "image", "question", "answer", "category", "l2-category"), _hallusionbench_rows, 2,
             "sets (2 figures x 2 questions each)"),
)
# tiny name -> spec, in the paper's order
TINY_DATASETS: dict[str, TinySpec] = {spec.tiny: spec for spec in _SPECS}


def _spec(name: str) -> TinySpec:
    spec = TINY_DATASETS.get(name) or TINY_DATASETS.get(name + TINY_SUFFIX)
    if spec is None:
        raise KeyError(f"no tiny dataset {name!r}; known: {', '.join(TINY_DATASETS)}")
    return spec


def write_tiny(
    name: str, root: Path, n: int | None = None, seed: int = 0, image_size: int | tuple[int, int] = 112
) -> Path:
    """Write ``<root>/<REAL_NAME>_tiny.tsv`` and return its path (``root`` plays ``$LMUData``).

    ``name`` is the tiny or the real name (``'POPE_tiny'`` or ``'POPE'``); ``n`` scales the size
    (its meaning per dataset is ``TINY_DATASETS[name].n_means``; default ``default_n``). Images are
    PNGs drawn with PIL, ``image_size`` a square's side or ``(width, height)`` (realistic sizes and
    aspect ratios for protocol tests); the file is a deterministic function of the
    arguments. vlmeval's decoded-image cache of that dataset (``<root>/images/<name>``) is removed,
    since vlmeval never rewrites a cached image and would pair new rows with old images.
    """
    spec = _spec(name)
    n = spec.default_n if n is None else n
    if n < 1:
        raise ValueError("n must be >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # MME keeps its historical random stream; the others are salted with the name, so that e.g.
    # ScienceQA_VAL_tiny and ScienceQA_TEST_tiny differ for the same seed.
    rng = random.Random(seed if spec.real == "MME" else f"{spec.real}:{seed}")
    rows = spec.rows(rng, n, image_size)
    path = root / f"{spec.tiny}.tsv"
    pd.DataFrame(rows, columns=list(spec.columns)).to_csv(path, sep="\t", index=False)
    stale = root / "images" / spec.tiny
    if stale.exists():
        shutil.rmtree(stale)
        logger.info("removed stale image cache %s", stale)
    logger.info("wrote %s (%d rows, n=%d %s, seed=%d)", path, len(rows), n, spec.n_means, seed)
    return path


def write_all_tiny(root: Path, seed: int = 0, image_size: int = 112) -> dict[str, Path]:
    """:func:`write_tiny` with the default size for every tiny dataset; ``{tiny name: path}``."""
    return {name: write_tiny(name, root, seed=seed, image_size=image_size) for name in TINY_DATASETS}


def write_mme_tiny(root: Path, n_per_category: int = 2, seed: int = 0, image_size: int = 112) -> Path:
    """Write ``<root>/MME_tiny.tsv`` (``root`` plays the role of ``$LMUData``) and return its path.

    Same structure as the real MME TSV: columns ``index, image, question, answer, category,
    image_path``; all 14 categories; ``n_per_category`` images per category, each with two
    questions, one answered "Yes" and one "No" (so the answers are exactly balanced); the first
    row of a pair holds the base64 PNG, the second row holds the first row's index in ``image``.
    Deterministic for a given ``seed``.
    """
    return write_tiny(MME_TINY, root, n=n_per_category, seed=seed, image_size=image_size)


# ---------------------------------------------------------------------------------------------
# Registration with vlmeval
# ---------------------------------------------------------------------------------------------

_TINY_CLASSES: dict[str, type] = {}


@contextlib.contextmanager
def _mia_bench_images_from(tiny_class: type, tiny: str):
    """MIABench.evaluate looks images up in ``MIABench('MIA-Bench').data`` (miabench.py:143), the
    real dataset under a hard-coded name; while it runs for the tiny set, make that call build the
    tiny dataset instead (a fresh instance: inference drops the ``image`` column of the one it used)."""
    import vlmeval.dataset.miabench as miabench

    real_class = miabench.MIABench
    miabench.MIABench = lambda *args, **kwargs: tiny_class(tiny)
    try:
        yield
    finally:
        miabench.MIABench = real_class


def _make_tiny_class(tiny: str, base: type) -> type:
    """A subclass of ``base`` that knows only ``tiny`` (no URL, no md5: it reads
    ``$LMUData/<tiny>.tsv``) and, for the tiny copies of the paper's datasets, logs the judge note."""
    real = TINY_DATASETS[tiny].real if tiny in TINY_DATASETS else tiny

    def evaluate(owner, eval_file, **judge_kwargs):
        note = judge_note(tiny, judge_kwargs.get("model"))
        if note is not None:
            logger.log(*note)
        parent = super(cls, owner).evaluate
        if real == "MIA-Bench":
            with _mia_bench_images_from(cls, tiny):
                return parent(eval_file, **judge_kwargs)
        return parent(eval_file, **judge_kwargs)

    # OCRBench, MathVista, MathVision and MIABench define evaluate as a classmethod: keep the kind.
    if isinstance(inspect.getattr_static(base, "evaluate"), classmethod):
        evaluate = classmethod(evaluate)
    cls = type(f"{base.__name__}_{tiny.replace('-', '_')}", (base,), {
        "__module__": __name__,
        "__doc__": f"{tiny}: synthetic {real} data in the real format, scored by {base.__name__}.evaluate.",
        "DATASET_URL": {tiny: ""},
        "DATASET_MD5": {},
        "evaluate": evaluate,
    })
    return cls


def register_tiny_datasets() -> list[str]:
    """Register every ``<REAL_NAME>_tiny`` with vlmeval (idempotent; imports vlmeval); returns the names.

    After this, ``build_dataset('POPE_tiny')`` / ``vlmeval.run.main()`` with ``--data POPE_tiny``
    read ``$LMUData/POPE_tiny.tsv`` without md5 check or download and score it like ``POPE``.
    Call it in every process that runs ``vlmeval.run.main()`` (under torchrun: in the launcher
    script, which every rank executes).
    """
    return register_local_datasets({tiny: spec.vlmeval_class for tiny, spec in TINY_DATASETS.items()})


def register_local_datasets(classes: dict[str, str]) -> list[str]:
    """Register datasets read from ``$LMUData/<name>.tsv`` with vlmeval (idempotent), each scored by
    the vlmeval class named in ``classes`` (``{name: class name}``, e.g. ``"ImageMCQDataset"``)."""
    from utils import ensure_torchvision

    ensure_torchvision()
    import vlmeval.dataset as vdataset

    for name, class_name in classes.items():
        cls = _TINY_CLASSES.get(name)
        if cls is None:
            cls = _TINY_CLASSES[name] = _make_tiny_class(name, getattr(vdataset, class_name))
        if cls not in vdataset.DATASET_CLASSES:
            vdataset.DATASET_CLASSES.append(cls)
        if name not in vdataset.SUPPORTED_DATASETS:
            vdataset.SUPPORTED_DATASETS.append(name)
    logger.debug("registered %s", ", ".join(classes))
    return list(classes)
