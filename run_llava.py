"""Evaluate LLaVA-1.5 with visual-token pruning through VLMEvalKit.

    export KEEP_RATIO=0.111 PRUNE_METHOD_PRE_LLM=divprune_pre_llm
    python run_llava.py --model llava_v1.5_7b --data MME --verbose

Takes VLMEvalKit's flags (``--model``, ``--data``, ``--work-dir``, ``--judge``, ``--verbose``,
``--reuse``, ...) plus ``--model-path DIR`` (a local checkpoint for the named model),
``--max-new-tokens N``, ``--device`` and ``--dtype {auto,fp32,bf16,fp16}``. ``--model`` takes a
name of ``custom_llava.CHECKPOINTS`` or a checkpoint folder. The pruning configuration comes from
the environment (see ``utils.py``).
"""

import custom_llava
import vlm_adapter

if __name__ == "__main__":
    vlm_adapter.main(custom_llava)
