"""Evaluate LLaVA-NeXT (LLaVA-1.6) with visual-token pruning through VLMEvalKit.

    export KEEP_RATIO=0.111 PRUNE_METHOD_PRE_LLM=divprune_pre_llm
    python run_llava_next.py --model llava_next_vicuna_7b --data MME --verbose

Takes VLMEvalKit's flags (``--model``, ``--data``, ``--work-dir``, ``--judge``, ``--verbose``,
``--reuse``, ...) plus ``--model-path DIR`` (a local checkpoint for the named model),
``--max-new-tokens N``, ``--device`` and ``--dtype {auto,fp32,bf16,fp16}``. ``--model`` takes a
name of ``custom_llava_next.CHECKPOINTS`` or a checkpoint folder. The pruning configuration comes
from the environment (see ``utils.py``); how LLaVA-NeXT's base image, crops and newline tokens are
pruned: ``docs/llava_next.md``.
"""

import custom_llava_next
import vlm_adapter

if __name__ == "__main__":
    vlm_adapter.main(custom_llava_next)
