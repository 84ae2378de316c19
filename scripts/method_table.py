"""Print the README's method table from the registry's metadata (so the two cannot drift).

    python -m scripts.method_table            # print
    python -m scripts.method_table --write    # rewrite the table between the README markers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import methods  # noqa: E402

BEGIN, END = "<!-- method-table:begin -->", "<!-- method-table:end -->"


def table() -> str:
    rows = [
        "| method | stage | inputs | hyper-parameters (defaults) | source / paper | families | vs. UniPruneBench's port |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in sorted(methods.all_methods().items(), key=lambda kv: (kv[1].stage, kv[0])):
        if m.family_needs is None:
            inputs = ", ".join(["features", *m.needs])
        else:  # computed per family
            inputs = "; ".join(f"{f}: " + ", ".join(["features", *n]) for f, n in m.family_needs.items())
        params = ", ".join(f"{k}={v!r}" for k, v in m.params.items()) or "-"
        source = f"[{m.source}](https://github.com/{m.source}) / [paper]({m.paper})"
        families = ", ".join(m.families) if m.families else "all"
        stage = m.stage
        if m.schedule is not None:  # a hybrid: several events from one name
            stage += " (several layers" + (" + KV-cache trim" if m.trim_cache else "") + ")"
            if m.pre_stage:
                stage = "pre_llm + " + stage.replace("several layers", "middle layer" if m.default_layer == methods.MIDDLE_LAYER else "several layers")
        if isinstance(m.vit_merge, methods.ViTLayerMerge):
            stage = f"ViT merge (every layer to the feature layer) + {stage}"
        elif m.vit_merge is not None:
            stage = f"ViT merge (layer {m.vit_merge.layer}) + {stage}"
        rows.append(f"| `{name}` | {stage} | {inputs} | {params} | {source} | {families} | {m.deviation or '-'} |")
    return "\n".join(rows)


def readme_with_table(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    args = parser.parse_args()
    if args.write:
        readme = ROOT / "README.md"
        readme.write_text(readme_with_table(readme.read_text()))
    else:
        print(table())


if __name__ == "__main__":
    main()
