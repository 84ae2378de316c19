"""Evaluate Qwen2.5-VL with visual-token pruning through VLMEvalKit.

    export KEEP_RATIO=0.111 PRUNE_METHOD_PRE_LLM=divprune_pre_llm
    python run_qwenvl2_5.py --model Qwen2.5-VL-7B-Instruct --data MME --verbose

Takes VLMEvalKit's flags (``--model``, ``--data``, ``--work-dir``, ``--judge``, ``--verbose``,
``--reuse``, ...) plus ``--model-path DIR`` (a local checkpoint for the named model),
``--max-new-tokens N``, ``--device`` and ``--dtype {auto,fp32,bf16,fp16}``. The pruning
configuration comes from the environment (see ``utils.py``).
"""

import custom_qwenvl
import vlm_adapter

if __name__ == "__main__":
    vlm_adapter.main(custom_qwenvl)
