"""The proxy benchmark's synthetic visual task suite: seeded PIL scenes and five question types.

A scene is a 224x224 image on an 8x8 grid of 28-px cells: one cell = one visual token in all three
proxy families (Qwen2.5-VL: 14-px patches merged 2x2; InternVL3: 14-px patches pixel-shuffled
2x2; LLaVA-1.5: 28-px patches). Every object sits in one cell, so the per-token auxiliary labels
used in training (:func:`token_labels`) are exact. To keep the suite from flattering any one
selection rule the scenes are cluttered: a textured background, distractor shapes and
look-alike glyphs (O/I/Z/S/B/G next to the digit), and object colours shared across shapes.

Question types mirror the paper's ability dimensions, each written as a VLMEvalKit dataset in a
real format and scored by VLMEvalKit's own code:

========== ========================================== ============== ==============================
type       question                                   dataset        scored like
========== ========================================== ============== ==============================
global     background colour (6 options)              Proxy_MCQ      MMBench-style MCQ, exact match
attribute  colour of the square (6 options)           Proxy_MCQ      (per ``category``)
counting   number of circles (0-3)                    Proxy_MCQ
existence  "Is there a triangle?" yes/no              Proxy_POPE     POPE (per ``category``)
text       the digit drawn in one cell                Proxy_OCRBench OCRBench (substring match)
========== ========================================== ============== ==============================

Everything is a deterministic function of the seed (``random.Random``/``numpy`` generators seeded
per scene; the font is Pillow's embedded one, identical on every machine).
"""

from __future__ import annotations

import base64
import io
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

IMAGE_PX = 224
GRID = 8  # cells a side
CELL = IMAGE_PX // GRID  # 28 px: one visual token

BACKGROUNDS = {
    "white": (245, 245, 245), "gray": (150, 150, 150), "black": (20, 20, 20),
    "beige": (225, 205, 160), "pink": (240, 180, 200), "cyan": (120, 210, 220),
}
COLORS = {
    "red": (215, 35, 35), "green": (35, 160, 55), "blue": (35, 70, 215),
    "yellow": (240, 210, 25), "purple": (140, 50, 180), "orange": (245, 125, 20),
}
SHAPES = ("square", "circle", "triangle", "diamond", "cross", "bar")  # the first three are asked about
DIGITS = "0123456789"
LOOKALIKES = "OIZSBGTA"  # distractor letters that resemble digits
SHAPE_CLASSES = ("none", *SHAPES, "digit", "letter")
GLYPH_CLASSES = ("none", *DIGITS, *LOOKALIKES)
COLOR_CLASSES = ("none", *COLORS)
TYPES = ("global", "attribute", "counting", "existence", "text")

# The datasets, by VLMEvalKit name -> (VLMEvalKit class, question types, category of each type).
DATASETS = {
    "Proxy_MCQ": ("ImageMCQDataset", ("global", "attribute", "counting")),
    "Proxy_POPE": ("ImageYORNDataset", ("existence",)),
    "Proxy_OCRBench": ("OCRBench", ("text",)),
}
# The category column of each type (OCRBench scores only its own ten category names).
CATEGORY = {
    "global": "global", "attribute": "attribute", "counting": "counting",
    "existence": "existence", "text": "Digit String Recognition",
}
YES_NO_SUFFIX = " Please answer yes or no."
MCQ_OPTIONS = "ABCDEF"


@dataclass(frozen=True)
class Obj:
    kind: str  # a SHAPES entry, "digit" or "letter"
    color: str
    cell: tuple[int, int]  # (row, col)
    glyph: str = ""


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]
    seed: int

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.objects)

    def first(self, kind: str) -> Obj:
        return next(o for o in self.objects if o.kind == kind)


def random_scene(seed: int, clutter: tuple[int, int] = (3, 7), letters: tuple[int, int] = (2, 4)) -> Scene:
    """A scene: exactly one square and one digit, 0-3 circles, a triangle half of the time, plus
    ``clutter`` other shapes (diamond/cross/bar) and ``letters`` look-alike glyphs, each in its own
    cell; object colours drawn from :data:`COLORS` with repetition (shared colours)."""
    rng = random.Random(seed)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], GRID * GRID)
    color = lambda: rng.choice(list(COLORS))  # noqa: E731
    objs = [Obj("square", color(), cells.pop()), Obj("digit", color(), cells.pop(), rng.choice(DIGITS))]
    objs += [Obj("circle", color(), cells.pop()) for _ in range(rng.randint(0, 3))]
    if rng.random() < 0.5:
        objs.append(Obj("triangle", color(), cells.pop()))
    objs += [Obj(rng.choice(SHAPES[3:]), color(), cells.pop()) for _ in range(rng.randint(*clutter))]
    objs += [Obj("letter", color(), cells.pop(), rng.choice(LOOKALIKES)) for _ in range(rng.randint(*letters))]
    return Scene(rng.choice(list(BACKGROUNDS)), tuple(objs), seed)


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int = 24) -> ImageFont.FreeTypeFont:
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)  # Pillow's embedded font
    return _FONT_CACHE[size]


def render(scene: Scene) -> Image.Image:
    """The scene as a 224x224 RGB image (textured background: +-12 uniform noise per pixel)."""
    noise = np.random.default_rng(scene.seed).integers(-12, 13, size=(IMAGE_PX, IMAGE_PX, 1))
    base = np.clip(np.array(BACKGROUNDS[scene.background])[None, None] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        y0, x0 = o.cell[0] * CELL, o.cell[1] * CELL
        m, fill = 4, COLORS[o.color]
        box = (x0 + m, y0 + m, x0 + CELL - m - 1, y0 + CELL - m - 1)
        mid_x, mid_y = x0 + CELL // 2, y0 + CELL // 2
        if o.kind == "square":
            draw.rectangle(box, fill=fill)
        elif o.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif o.kind == "triangle":
            draw.polygon([(mid_x, y0 + m), (x0 + m, y0 + CELL - m - 1), (x0 + CELL - m - 1, y0 + CELL - m - 1)], fill=fill)
        elif o.kind == "diamond":
            draw.polygon([(mid_x, y0 + m), (x0 + CELL - m - 1, mid_y), (mid_x, y0 + CELL - m - 1), (x0 + m, mid_y)], fill=fill)
        elif o.kind == "cross":
            draw.rectangle((mid_x - 3, y0 + m, mid_x + 3, y0 + CELL - m - 1), fill=fill)
            draw.rectangle((x0 + m, mid_y - 3, x0 + CELL - m - 1, mid_y + 3), fill=fill)
        elif o.kind == "bar":
            draw.rectangle((x0 + m, mid_y - 4, x0 + CELL - m - 1, mid_y + 4), fill=fill)
        else:  # digit / letter, bold (stroke) and centred in its cell
            draw.text((mid_x, mid_y), o.glyph, fill=fill, font=_font(), anchor="mm", stroke_width=1, stroke_fill=fill)
    return img


def as_evaluated(img: Image.Image) -> Image.Image:
    """``img`` as the model sees it through VLMEvalKit: the TSV's PNG is dumped to a ``.jpg`` file
    with PIL's defaults (``decode_base64_to_image_file``: JPEG, quality 75) and read back. Training
    and the training script's held-out check use this, so they match the evaluation path."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def token_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Per visual token (row-major over the 8x8 grid): the index into :data:`SHAPE_CLASSES`,
    :data:`COLOR_CLASSES`, :data:`GLYPH_CLASSES` of what is in its cell, and the background colour
    (the training script's dense auxiliary targets)."""
    shape = np.zeros(GRID * GRID, dtype=np.int64)
    color = np.zeros_like(shape)
    glyph = np.zeros_like(shape)
    for o in scene.objects:
        i = o.cell[0] * GRID + o.cell[1]
        shape[i] = SHAPE_CLASSES.index(o.kind)
        color[i] = COLOR_CLASSES.index(o.color)
        glyph[i] = GLYPH_CLASSES.index(o.glyph) if o.glyph else 0
    background = np.full_like(shape, list(BACKGROUNDS).index(scene.background))
    return {"shape": shape, "color": color, "glyph": glyph, "background": background}


# ---------------------------------------------------------------------------------------------
# Questions, and the prompts VLMEvalKit builds from them
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    type: str
    question: str  # the TSV's question column
    answer: str  # the TSV's answer column (a letter, Yes/No, or the digit)
    options: tuple[str, ...] = ()  # MCQ options, in A-D order

    def prompt(self) -> str:
        """The text VLMEvalKit's ``build_prompt`` of this question's dataset produces (a test checks
        it against vlmeval's own output)."""
        if not self.options:
            return self.question
        opts = "".join(f"{k}. {v}\n" for k, v in zip(MCQ_OPTIONS, self.options))
        return f"Question: {self.question}\nOptions:\n{opts}Please select the correct answer from the options above. \n"

    @property
    def target(self) -> str:
        """What the model is trained to answer (for OCRBench the digit itself)."""
        return self.answer


def _mcq(type_: str, question: str, correct: str, options: list[str]) -> Question:
    return Question(type_, question, MCQ_OPTIONS[options.index(correct)], tuple(options))


def questions(scene: Scene) -> dict[str, Question]:
    """The five questions of a scene, by type. Multiple-choice options list every candidate in a
    fixed order (six colours, or 0-3), so the letter is a function of the visual fact alone: the
    proxy measures what the visual tokens carry, not in-context option matching, which a 3-layer
    decoder learns far more slowly than the visual facts (measured: letters still at chance at step
    600 of a batch-16 run with shuffled 4-option lists, while the per-token visual targets were learnt)."""
    return {
        "global": _mcq("global", "What is the background colour of the image?", scene.background, list(BACKGROUNDS)),
        "attribute": _mcq("attribute", "What colour is the square?", scene.first("square").color, list(COLORS)),
        "counting": _mcq("counting", "How many circles are there in the image?", str(scene.count("circle")),
                         ["0", "1", "2", "3"]),
        "existence": Question("existence", "Is there a triangle in the image?" + YES_NO_SUFFIX,
                              "Yes" if scene.count("triangle") else "No"),
        "text": Question("text", "What is the digit in the image?", scene.first("digit").glyph),
    }


def vocabulary() -> list[str]:
    """Every word the proxy prompts and answers use (the trained tokenizer's word list), plus the
    words of the three families' chat templates; deterministic order."""
    words: set[str] = set()
    for seed in range(200):
        for q in questions(random_scene(seed)).values():
            words.update(_words(q.prompt()))
            words.update(_words(q.target))
    words.update(BACKGROUNDS, COLORS, DIGITS, MCQ_OPTIONS, ["Yes", "No"])
    words.update(["system", "user", "assistant", "USER", "ASSISTANT", ":"])
    return sorted(words)


def _words(text: str) -> list[str]:
    """Split as the proxy tokenizer's pre-tokenizer does (``tokenizers.pre_tokenizers.Whitespace``:
    runs of word characters, runs of other non-space characters)."""
    return re.findall(r"\w+|[^\w\s]+", text)


# ---------------------------------------------------------------------------------------------
# VLMEvalKit TSVs
# ---------------------------------------------------------------------------------------------

def _png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


EVAL_SEED_BASE = 10_000_000  # evaluation scenes use seeds from here on; training uses seeds below it


def eval_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` held-out scenes (seeds disjoint from any training run's)."""
    return [random_scene(EVAL_SEED_BASE + seed * 100_000 + i) for i in range(n)]


def write_datasets(root: Path, n: int = 60, seed: int = 0) -> dict[str, Path]:
    """Write ``Proxy_MCQ.tsv``, ``Proxy_POPE.tsv``, ``Proxy_OCRBench.tsv`` under ``root`` (the
    ``$LMUData`` folder) from ``n`` held-out scenes: every scene gives one question of each type
    (each image stored once per dataset; later rows point to it by index, as MME/MMBench do)."""
    if n < 1:
        raise ValueError(f"n={n}: write at least one scene")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {name: [] for name in DATASETS}
    for scene in eval_scenes(n, seed):
        image = _png_base64(render(scene))
        for name, (_, types) in DATASETS.items():
            first = None
            for t in types:
                q = questions(scene)[t]
                row = {"index": len(rows[name]), "image": image if first is None else str(first),
                       "question": q.question, "answer": q.answer, "category": CATEGORY[t]}
                if name == "Proxy_MCQ":
                    row.update({k: None for k in MCQ_OPTIONS})  # A-F columns; unused ones empty
                    row.update(zip(MCQ_OPTIONS, q.options))
                    row["l2-category"] = t
                if name == "Proxy_OCRBench":
                    row["answer"] = repr([q.answer])
                first = row["index"] if first is None else first
                rows[name].append(row)
    paths = {}
    for name, data in rows.items():
        paths[name] = root / f"{name}.tsv"
        pd.DataFrame(data).to_csv(paths[name], sep="\t", index=False)
        stale = root / "images" / name  # vlmeval never rewrites a cached image
        if stale.exists():
            shutil.rmtree(stale)
    logger.info("wrote the proxy suite (%d scenes, seed %d) under %s", n, seed, root)
    return paths


def register_datasets() -> list[str]:
    """Register the proxy datasets with vlmeval (idempotent): after this ``--data Proxy_MCQ`` reads
    ``$LMUData/Proxy_MCQ.tsv`` without md5 check or download."""
    from synthetic import tiny_data

    return tiny_data.register_local_datasets({name: cls for name, (cls, _) in DATASETS.items()})


def type_of_row(dataset: str, category: str) -> str:
    """The question type of a row of ``dataset`` with this ``category``."""
    if dataset not in DATASETS:
        raise KeyError(f"{dataset!r} is not a proxy dataset; known: {', '.join(DATASETS)}")
    for t in DATASETS[dataset][1]:
        if CATEGORY[t] == category:
            return t
    raise KeyError(f"{dataset} has no category {category!r}; its categories: "
                   f"{', '.join(CATEGORY[t] for t in DATASETS[dataset][1])}")
