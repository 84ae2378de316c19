"""Evaluate InternVL3 (HF-native ``-hf`` checkpoints) with visual-token pruning through VLMEvalKit.

    export KEEP_RATIO=0.111 PRUNE_METHOD_PRE_LLM=divprune_pre_llm
    python run_internvl3.py --model InternVL3-8B --data MME --verbose

Takes VLMEvalKit's flags (``--model``, ``--data``, ``--work-dir``, ``--judge``, ``--verbose``,
``--reuse``, ...) plus ``--model-path DIR`` (a local checkpoint for the named model),
``--max-new-tokens N``, ``--device`` and ``--dtype {auto,fp32,bf16,fp16}``. ``--model`` takes a
name of ``custom_internvl.CHECKPOINTS`` or a checkpoint folder. The pruning configuration comes
from the environment (see ``utils.py``); the budget is per image, over all its tiles.
"""

import custom_internvl
import vlm_adapter

if __name__ == "__main__":
    vlm_adapter.main(custom_internvl)
