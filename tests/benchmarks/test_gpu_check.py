"""``benchmarks/gpu_check.py --tiny`` runs every section's code on CPU, so the GPU check cannot rot."""

from __future__ import annotations

import json
import math

from benchmarks.gpu_check import main


def test_the_tiny_gpu_check_runs_every_section_and_writes_its_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert main(["--tiny", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["tiny"] is True and results["device"] == "cpu"
    ps3_1p5k, ps3_4k = results["ps3"]
    assert (ps3_1p5k["model"], ps3_4k["model"]) == ("PS3-1.5k", "PS3-4k")
    vit_small, vit_large = results["vit"]
    assert vit_large["tokens_per_image"] == 4 * vit_small["tokens_per_image"]
    for row in (ps3_1p5k, ps3_4k, vit_small, vit_large):
        assert row["seconds"] > 0 and math.isfinite(row["samples_per_s"])
    assert results["sam2"]["s_per_image"] > 0  # sam2 is installed in the test environment
    assert results["captioner"]["new_tokens"] == 4 and results["captioner"]["tokens_per_s"] > 0
    assert results["vllm"] == {"skipped": "vllm is not installed"} or "error" not in results["vllm"]
