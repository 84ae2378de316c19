"""FitPrune's calibration script: the original's FLOPs model and an end-to-end run."""

from __future__ import annotations

from scripts.fitprune_calibrate import main, visual_flops
from utils import PruneConfig


def test_flops_model_is_the_originals_for_llama_7b():
    # The original's calculate_origin_flops(), written out: (576*4096*4096*3 + 576*576*4096 +
    # 576*4096*576 + 576*4096*4096) + 4096*11008*576*3, times 32 layers.
    original = ((576 * 4096 * 4096 * 3 + 576 * 576 * 4096 + 576 * 4096 * 576 + 576 * 4096 * 4096) + (4096 * 11008 * 576 * 3)) * 32
    assert visual_flops(576, 4096, 11008) * 32 == original


def test_calibration_produces_a_runnable_schedule(tmp_path):
    from synthetic import tiny_checkpoints
    from synthetic import tiny_data

    ckpt = tiny_checkpoints.save_tiny_qwen(tmp_path / "ckpt")
    tsv = tiny_data.write_mme_tiny(tmp_path, n_per_category=1)
    final = {}
    for reduction in (0.3, 0.8):
        specs = main(["--family", "qwen2_5_vl", "--model", str(ckpt), "--data", str(tsv), "--limit", "2",
                      "--reduction", str(reduction), "--width", "0.1"])
        cfg = PruneConfig.from_env({"INTRA_LLM_LAYER_SPECS": specs})  # a schedule that runs
        assert all(s.method == "fitprune_intra_llm" and 1 <= s.layer < 4 for s in cfg.intra)
        ratios = [s.ratio for s in cfg.intra]
        assert ratios == sorted(ratios, reverse=True)
        final[reduction] = ratios[-1]
    assert final[0.8] < final[0.3] < 1.0  # a larger FLOPs cut deletes more tokens
