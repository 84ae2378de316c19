"""scripts/bench_speed.py: the FLOPs prediction on hand-computed cases, and the structure of what a
``--quick`` run writes (JSON, Markdown, the generated docs sections)."""

import json

import torch

from scripts import bench_speed as bs
from synthetic import tiny_models as tm


def test_decoder_layer_flops_by_hand():
    # hidden 64, 4 heads of 16 (GQA: 2 KV heads), MLP 128, 10 tokens:
    #   q, o: 2 * 10 * 64 * 64 each = 81920; k, v: 2 * 10 * 64 * 32 each = 40960   -> 245760
    #   causal attention: 10 * 11 / 2 = 55 pairs, x 4 heads x 16, x 2 (scores, sum) x 2  -> 14080
    #   gated MLP: 2 * 10 * 3 * 64 * 128                                              -> 491520
    assert bs.decoder_layer_flops(10, 64, 4, 2, 16, 128) == 245760 + 14080 + 491520
    # 3 tokens: 73728 + 4 * 6 * 64 + 147456
    assert bs.decoder_layer_flops(3, 64, 4, 2, 16, 128) == 73728 + 1536 + 147456


def test_prefill_flops_of_a_tiny_llava_by_hand():
    cfg = tm.tiny_llava_config(layers=3)
    inputs = tm.llava_inputs()  # one 56-px image: 16 patches + [CLS]
    flops = bs.prefill_flops("llava", cfg, inputs, [10, 10, 3])  # a cut to 3 tokens at layer 2
    # CLIP: patch embedding 2 * 16 * (3 * 14 * 14) * 32 = 602112; per layer on 17 tokens (width 32,
    # MLP 64): projections 2 * 17 * 4 * 32 * 32 = 139264, attention 2 * 2 * 17 * 17 * 32 = 36992,
    # MLP 2 * 17 * 2 * 32 * 64 = 139264; two layers.
    assert flops["vision"] == 602112 + 2 * (139264 + 36992 + 139264)
    # Projector 32 -> 64 -> 64 on the 16 patch tokens.
    assert flops["projector"] == 2 * 16 * (32 * 64 + 64 * 64)
    assert flops["llm"] == 2 * 751360 + 222720
    assert flops["lm_head"] == 2 * 64 * tm.VOCAB
    assert flops["total"] == flops["vision"] + flops["projector"] + flops["llm"] + flops["lm_head"]


def test_quick_run_writes_the_tables(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = bs.main([
            "--quick", "--families", "llava", "--methods", "random_pre_llm,fastv_intra_llm,sparsevlm",
            "--repeats", "1", "--decode-steps", "1", "--threads", "1", "--out", str(tmp_path),
        ])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "bench_speed.json").read_text())
    assert saved["meta"]["quick"] and saved["meta"]["ratios"] == [0.111]
    (model,) = saved["models"]
    main, deep = model["builds"]  # SparseVLM prunes at layer 15: a deeper build of its own
    assert main["layers"] == 3 and deep["layers"] > 15
    v = main["vanilla"]
    assert v["prefill_ms"]["median"] > 0 and v["patched_off_ms"]["runs"] and v["ops"] > 0
    assert v["kv_cache_bytes"] > 0 and v["decode_ms"]["median"] > 0
    rows = {r["method"]: r for r in main["rows"]}
    assert set(rows) == {"random_pre_llm", "fastv_intra_llm"}
    assert [r["method"] for r in deep["rows"]] == ["sparsevlm"] and "error" not in deep["rows"][0]
    # 16 visual tokens at 0.111 keep 2: before layer 0 (pre-LLM) or at layer 2 (FastV).
    assert rows["random_pre_llm"]["visual_per_layer"] == [2, 2, 2]
    assert rows["fastv_intra_llm"]["visual_per_layer"] == [16, 16, 2]
    n_text = main["n_prompt"] - 16
    for r in rows.values():
        assert "error" not in r, r
        seq = [n_text + k for k in r["visual_per_layer"]]
        cfg = tm.tiny_llava_config(layers=3)
        tc = cfg.text_config
        assert r["flops"]["llm"] == sum(bs.decoder_layer_flops(n, 64, 4, tc.num_key_value_heads, 16, 128) for n in seq)
        assert r["predicted_speedup"] == v["flops"]["total"] / r["flops"]["total"]
        assert r["method_calls"] == 1 and r["method_ops"] > 0 and r["method_ms"]["median"] > 0
        assert isinstance(r["engine_syncs"], int) and isinstance(r["misses"], list)
        assert r["kv_cache_bytes"] < v["kv_cache_bytes"]
    md = (tmp_path / "bench_speed.md").read_text()
    assert "| method | kept | prefill ms | speed-up | predicted |" in md
    for name in ("random_pre_llm", "fastv_intra_llm", "sparsevlm"):
        assert f"| `{name}` | 0.111 |" in md
    assert "Tiny widths (--quick)" in md
    assert "`random_pre_llm`" in bs.summary_table(result)


def test_generated_sections_replace_only_their_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{bs.DOCS_BEGIN}\nold\n{bs.DOCS_END}\noutro\n")
    bs.replace_between(page, bs.DOCS_BEGIN, bs.DOCS_END, "new table")
    assert page.read_text() == f"intro\n{bs.DOCS_BEGIN}\nnew table\n{bs.DOCS_END}\noutro\n"


def test_reports_regenerate_from_the_saved_json(tmp_path):
    threads = torch.get_num_threads()
    try:
        bs.main(["--quick", "--families", "llava", "--methods", "random_pre_llm", "--repeats", "1",
                 "--decode-steps", "1", "--threads", "1", "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    bs.main(["--from-json", str(tmp_path / "run" / "bench_speed.json"), "--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "bench_speed.md").read_text() == (tmp_path / "run" / "bench_speed.md").read_text()
    assert "**Targets:**" in (tmp_path / "again" / "bench_speed.md").read_text()
