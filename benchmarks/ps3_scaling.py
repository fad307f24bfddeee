"""PS3 vs a plain ViT as the maximum resolution grows: forward FLOPs (counted) and CPU time, one backbone.

Run:  .venv/bin/python benchmarks/ps3_scaling.py --write-docs

One small random-weight SigLIP vision tower (default width 64, 4 layers, 2 heads, MLP 256, patch 14,
position table for 378 px, so the low-res grid is 27x27 as in the paper) is encoded two ways at each
maximum resolution R in 378, 756, 1512, 3780:

* PS3 (``training.ps3.vision.PS3VisionModel``) with the paper's scale list up to R (378+756,
  378+756+1512, 378+756+1512+3780) and a fixed budget of 2560 high-res patches, split across the
  high-res scales by pixel share (1512: [512, 2048]; 3780: [85, 341, 2134]), bottom-up selection, one
  round. At 378 there is no high-res scale (the config needs one), so PS3 is its low-res pass alone plus
  the attention pool: the same ViT on the same 729 tokens.
* the plain ViT (transformers ``SiglipVisionModel``, SDPA attention, ``interpolate_pos_encoding=True``,
  the very same weights) on every patch at R: (R/14)^2 tokens.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` for one forward at batch 1 (matmuls,
convolutions and attention, two FLOPs per multiply-add; elementwise work, norms and resizes are not
counted). The counter has no formula for the CPU SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``),
so one is supplied here. Times are the median wall time (and this process's CPU time) of a few
forwards after that counted forward and one more warm-up, PS3 and ViT runs alternating, under
``torch.set_num_threads``; a configuration whose counted forward takes longer than ``--long-run-s``
gets no further warm-up and only ``--slow-repeats`` more runs, the counted one included in its median.
The machine may be shared: other load is measured from /proc/stat and reported next to the times, each
resolution waits (up to ``--quiet-wait-s``) for a quiet machine, and fast timings disturbed by other
load are retaken (up to ``--retries`` times).

A second table applies an analytic FLOP model, checked against the counter on the small backbone, to the
paper's SigLIP-SO400M shapes (width 1152, MLP 4304, 27 layers, conv branch 512 wide with 3 blocks): at
width 64 attention is a much larger share of the work than at width 1152, so the small backbone
overstates the plain ViT's growth.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import machine_description, replace_doc_section
from ps3_engine.training.ps3.config import PS3ModelConfig
from ps3_engine.training.ps3.selection import split_budget
from ps3_engine.training.ps3.vision import PS3VisionModel

logger = logging.getLogger("benchmarks.ps3_scaling")

PAPER_SCALES = (378, 756, 1512, 3780)
LOW_RES = 378
PATCH = 14
DOC_TITLE = "PS3 vs plain ViT scaling (benchmarks/ps3_scaling.py)"
aten = torch.ops.aten


@dataclass(frozen=True)
class Backbone:
    width: int
    mlp: int
    layers: int
    heads: int
    conv_hidden: int
    conv_blocks: int = 3
    num_select_layers: int = 4


SO400M = Backbone(width=1152, mlp=4304, layers=27, heads=16, conv_hidden=512, conv_blocks=3)


@dataclass
class Measurement:
    tokens: int
    flops: int
    attention_flops: int
    wall_s: list[float]
    cpu_s: list[float]  # this process's CPU time (all threads) per timed forward
    other_cores: float  # average cores other processes kept busy during the timed forwards
    counted_run_timed: bool  # the forward was slow: the counted run is one of the timed runs
    retimed: int = 0  # how often the timed runs were thrown away and taken again because of other load

    @property
    def median_wall_s(self) -> float:
        return statistics.median(self.wall_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)


# ---- FLOP counting and timing -------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``Q K^T`` and ``P V`` of the CPU flash-attention kernel, 2 FLOPs per multiply-add."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


CPU_SDPA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, from /proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def background_load(seconds: float = 2.0) -> float:
    """Busy cores of the whole machine while this process sleeps."""
    before = machine_busy_s()
    time.sleep(seconds)
    return (machine_busy_s() - before) / seconds


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3) -> float:
    """Sleep (up to ``max_wait_s``) until other processes keep fewer than ``threshold`` cores busy."""
    deadline = time.perf_counter() + max_wait_s
    load = background_load()
    while load >= threshold and time.perf_counter() < deadline:
        load = background_load()
    return load


class _Clock:
    """Wall time, this process's CPU time and the machine's busy time over a block."""

    def __enter__(self) -> _Clock:
        self._wall, self._cpu, self._busy = time.perf_counter(), time.process_time(), machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu
        self.other_s = max(0.0, machine_busy_s() - self._busy - self.cpu_s)


def measure(
    forwards: dict[str, Callable[[], int]],
    repeats: int,
    long_run_s: float,
    slow_repeats: int,
    retries: int = 0,
    quiet_wait_s: float = 0.0,
) -> dict[str, Measurement]:
    """FLOPs and times of each forward; the timed runs of the forwards alternate, so load hits them alike.

    Each forward first runs once under the FLOP counter (a warm-up) and once more untimed, then
    ``repeats`` timed runs. A forward slower than ``long_run_s`` gets no second warm-up and only
    ``slow_repeats`` more runs, and its counted run is one of the timings (the counter's per-op overhead
    is negligible next to it, and a warm-up matters little at that length). When no forward is slow and
    other processes kept 0.3 cores or more busy meanwhile, the timed runs are taken again after waiting
    (up to ``quiet_wait_s``) for a quiet machine, at most ``retries`` times.
    """
    counted, clocks, wanted = {}, {}, {}
    for name, forward in forwards.items():
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter, _Clock() as first:
            tokens = forward()
        counts = counter.get_flop_counts()["Global"]
        attention = sum(v for k, v in counts.items() if "attention" in str(k))
        slow = first.wall_s >= long_run_s
        counted[name] = (tokens, counter.get_total_flops(), attention, slow)
        clocks[name] = [first] if slow else []
        wanted[name] = slow_repeats + 1 if slow else repeats
    for name, forward in forwards.items():
        if not counted[name][3]:
            forward()  # a second warm-up outside the counter's dispatch mode
    retimed = 0
    while True:
        while any(len(clocks[name]) < wanted[name] for name in forwards):
            for name, forward in forwards.items():
                if len(clocks[name]) < wanted[name]:
                    with _Clock() as clock:
                        forward()
                    clocks[name].append(clock)
        busy = sum(c.other_s for runs in clocks.values() for c in runs)
        wall = sum(c.wall_s for runs in clocks.values() for c in runs)
        if retimed >= retries or any(c[3] for c in counted.values()) or busy < 0.3 * wall:
            break
        retimed += 1
        logger.info(
            "other load %.1f cores during the timed runs: timing again (%d of %d)", busy / wall, retimed, retries
        )
        wait_for_quiet(quiet_wait_s)
        clocks = {name: [] for name in forwards}
    result = {}
    for name, (tokens, flops, attention, slow) in counted.items():
        runs = clocks[name]
        wall = sum(c.wall_s for c in runs)
        result[name] = Measurement(
            tokens=tokens,
            flops=flops,
            attention_flops=attention,
            wall_s=[c.wall_s for c in runs],
            cpu_s=[c.cpu_s for c in runs],
            other_cores=sum(c.other_s for c in runs) / wall if wall else 0.0,
            counted_run_timed=slow,
            retimed=retimed,
        )
    return result


# ---- models -------------------------------------------------------------------------------------
def vision_kwargs(b: Backbone) -> dict:
    return {
        "hidden_size": b.width,
        "intermediate_size": b.mlp,
        "num_hidden_layers": b.layers,
        "num_attention_heads": b.heads,
        "image_size": LOW_RES,
        "patch_size": PATCH,
    }


def select_layers(num_layers: int, count: int) -> list[int]:
    """``count`` layer indices spread from the first to the last (paper: 0, 9, 18, 26 of 27)."""
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


def scales_for(resolution: int) -> list[int]:
    """The paper's scale list up to ``resolution`` (at least one high-res scale, see the module doc)."""
    top = max(resolution, PAPER_SCALES[1])
    return [s for s in PAPER_SCALES if s < top] + [top]


def ps3_config(b: Backbone, resolution: int, budget: int) -> PS3ModelConfig:
    text = {
        "vocab_size": 512,
        "hidden_size": b.width,
        "intermediate_size": b.mlp,
        "num_hidden_layers": 1,
        "num_attention_heads": b.heads,
        "max_position_embeddings": 16,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    return PS3ModelConfig(
        vision=vision_kwargs(b),
        text=text,
        scales=scales_for(resolution),
        patch_size=PATCH,
        select_layers=select_layers(b.layers, b.num_select_layers),
        max_select=budget,
        conv_hidden=b.conv_hidden,
        conv_blocks=b.conv_blocks,
        embed_dim=b.width,
    )


def build_vit(b: Backbone) -> torch.nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(**vision_kwargs(b), attn_implementation="sdpa")
    torch.manual_seed(0)
    return SiglipVisionModel(config).eval().requires_grad_(False)


def ps3_forward(model: PS3VisionModel, images: torch.Tensor, low_res_only: bool) -> Callable[[], int]:
    def run() -> int:
        with torch.no_grad():
            if low_res_only:
                low = model.forward_low_res(images)
                model.pool(low.tokens)
                return low.tokens.shape[1]
            out = model(images)
            return out.low_res_tokens.shape[1] + out.high_res_tokens.shape[1]

    return run


def vit_forward(vit: torch.nn.Module, images: torch.Tensor) -> Callable[[], int]:
    def run() -> int:
        with torch.no_grad():
            return vit(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state.shape[1]

    return run


# ---- analytic FLOP model (checked against the counter, then applied to SO400M) ------------------
def _block(b: Backbone, queries: int, keys: int) -> int:
    """One pre-norm block: q/k/v/o and MLP on the queries' own tokens, attention over ``keys`` tokens."""
    return 2 * queries * (4 * b.width**2 + 2 * b.width * b.mlp) + 4 * queries * keys * b.width


def _pool(b: Backbone, tokens: int) -> int:
    """SigLIP attention-pool head: k/v projections of all tokens, one query, MLP on one token."""
    return 4 * tokens * b.width**2 + 4 * b.width**2 + 4 * tokens * b.width + 4 * b.width * b.mlp


def _patch_embed(b: Backbone, tokens: int) -> int:
    return 2 * tokens * 3 * PATCH * PATCH * b.width


def vit_flops(b: Backbone, resolution: int) -> int:
    tokens = (resolution // PATCH) ** 2
    return _patch_embed(b, tokens) + b.layers * _block(b, tokens, tokens) + _pool(b, tokens)


def ps3_flops(b: Backbone, resolution: int, budget: int) -> int:
    low = (LOW_RES // PATCH) ** 2
    total = vit_flops(b, LOW_RES)
    if resolution == LOW_RES:
        return total
    scales = scales_for(resolution)
    highres = scales[1:]
    selected = min(budget, sum((s // PATCH) ** 2 for s in highres))
    # selection MLP on the concatenated low-res features, one map per high-res scale
    concat = b.width * b.num_select_layers
    total += 2 * low * (concat * concat + concat * b.width * len(highres))
    # shallow conv branch at the third scale (or the largest): stem, ConvNeXt blocks, 1x1 out conv
    conv_in = scales[2] if len(scales) > 2 else scales[-1]
    cells, c = (conv_in // (2 * PATCH)) ** 2, b.conv_hidden
    total += 2 * cells * 3 * (2 * PATCH) ** 2 * c
    total += b.conv_blocks * 2 * cells * (49 * c + 8 * c * c) + 2 * cells * c * c
    total += 2 * b.width * c * len(highres)  # prompt_proj_for_highres
    # selected patches through the ViT, attending to themselves and the low-res K/V
    total += _patch_embed(b, selected) + b.layers * _block(b, selected, selected + low)
    return total + _pool(b, low) + _pool(b, selected)


# ---- report -------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _runs(m: Measurement) -> str:
    text = f"{len(m.wall_s)} (counted run included)" if m.counted_run_timed else str(len(m.wall_s))
    return text + (f", retaken {m.retimed}x" if m.retimed else "")


def flops_table(rows: list[tuple[int, Measurement, Measurement]], budget: int) -> str:
    low = (LOW_RES // PATCH) ** 2
    lines = [
        "| max res R | PS3 scales | PS3 high-res split | tokens PS3 (low-res + selected) | tokens ViT (all) | "
        "GFLOPs PS3 | GFLOPs ViT | FLOPs ViT / PS3 | attention share of ViT FLOPs |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for resolution, p, v in rows:
        if resolution == LOW_RES:
            scales, split = "378 (low-res pass only)", "-"
        else:
            scales = "+".join(map(str, scales_for(resolution)))
            split = "/".join(map(str, split_budget(budget, scales_for(resolution)[1:])))
        lines.append(
            f"| {resolution} | {scales} | {split} | {low} + {p.tokens - low} = {p.tokens} | {v.tokens} | "
            f"{p.flops / 1e9:.3f} | {v.flops / 1e9:.3f} | **{_ratio(v.flops, p.flops)}** | "
            f"{v.attention_flops / v.flops:.0%} |"
        )
    return "\n".join(lines)


def time_table(rows: list[tuple[int, Measurement, Measurement]]) -> str:
    lines = [
        "| max res R | wall s PS3 (min-max) | wall s ViT (min-max) | wall ViT / PS3 | process CPU s PS3 | "
        "process CPU s ViT | CPU ViT / PS3 | timed runs PS3 / ViT | other load (cores) PS3 / ViT |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for resolution, p, v in rows:
        lines.append(
            f"| {resolution} | {_spread(p.wall_s)} | {_spread(v.wall_s)} | "
            f"**{_ratio(v.median_wall_s, p.median_wall_s)}** | {p.median_cpu_s:.3f} | {v.median_cpu_s:.3f} | "
            f"{_ratio(v.median_cpu_s, p.median_cpu_s)} | {_runs(p)} / {_runs(v)} | "
            f"{p.other_cores:.1f} / {v.other_cores:.1f} |"
        )
    return "\n".join(lines)


def growth_table(rows: list[tuple[int, Measurement, Measurement]]) -> str:
    by_res = {r: (p, v) for r, p, v in rows}
    end = max(by_res)
    lines = [
        "| from -> to | tokens PS3 | tokens ViT | FLOPs PS3 | FLOPs ViT | wall s PS3 | wall s ViT |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for start in (LOW_RES, PAPER_SCALES[1]):
        if start in by_res and end > start:
            (p0, v0), (p1, v1) = by_res[start], by_res[end]
            lines.append(
                f"| {start} -> {end} | {_ratio(p1.tokens, p0.tokens)} | {_ratio(v1.tokens, v0.tokens)} | "
                f"{_ratio(p1.flops, p0.flops)} | {_ratio(v1.flops, v0.flops)} | "
                f"{_ratio(p1.median_wall_s, p0.median_wall_s)} | {_ratio(v1.median_wall_s, v0.median_wall_s)} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def so400m_table(resolutions: list[int], budget: int) -> str:
    lines = [
        "| max res R | GFLOPs PS3 | GFLOPs ViT | FLOPs ViT / PS3 | attention share of ViT FLOPs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for resolution in resolutions:
        p, v = ps3_flops(SO400M, resolution, budget), vit_flops(SO400M, resolution)
        tokens = (resolution // PATCH) ** 2
        attention = SO400M.layers * 4 * tokens * tokens * SO400M.width
        lines.append(f"| {resolution} | {p / 1e9:,.0f} | {v / 1e9:,.0f} | **{_ratio(v, p)}** | {attention / v:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=list(PAPER_SCALES))
    parser.add_argument("--budget", type=int, default=2560, help="high-res patches PS3 selects (one round)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--mlp", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--conv-hidden", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="timed forwards after the counted one and a warm-up")
    parser.add_argument(
        "--long-run-s", type=float, default=20.0, help="a counted forward slower than this is a slow one"
    )
    parser.add_argument("--slow-repeats", type=int, default=2, help="timed forwards after a slow counted one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retries", type=int, default=3, help="retake fast timings disturbed by other load")
    parser.add_argument(
        "--quiet-wait-s", type=float, default=45.0, help="per resolution, wait up to this long for a quiet machine"
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resolutions = sorted(set(args.resolutions))
    if any(r < LOW_RES or r % PATCH for r in resolutions):
        raise SystemExit(f"resolutions must be multiples of {PATCH} and >= {LOW_RES}, got {resolutions}")
    torch.set_num_threads(args.threads)
    backbone = Backbone(args.width, args.mlp, args.layers, args.heads, args.conv_hidden)
    vit = build_vit(backbone)
    load = background_load()
    began_all = time.perf_counter()

    rows: list[tuple[int, Measurement, Measurement]] = []
    worst_analytic = 0.0
    for resolution in resolutions:
        cfg = ps3_config(backbone, resolution, args.budget)
        torch.manual_seed(1)
        ps3 = PS3VisionModel(cfg, vit, text_dim=backbone.width).eval().requires_grad_(False)
        torch.manual_seed(2)
        images = torch.randn(1, 3, resolution, resolution)
        quiet = wait_for_quiet(args.quiet_wait_s)
        if quiet >= 0.3:
            logger.warning("R=%d: other processes keep %.1f cores busy; timings will be high", resolution, quiet)
        forwards = {"PS3": ps3_forward(ps3, images, resolution == LOW_RES), "ViT": vit_forward(vit, images)}
        measured = measure(forwards, args.repeats, args.long_run_s, args.slow_repeats, args.retries, args.quiet_wait_s)
        for name, m in measured.items():
            logger.info(
                "R=%d %s: %d tokens, %.3f GFLOPs, wall s %s, CPU s %s, %.1f other cores",
                resolution,
                name,
                m.tokens,
                m.flops / 1e9,
                " ".join(f"{t:.3f}" for t in m.wall_s),
                " ".join(f"{t:.3f}" for t in m.cpu_s),
                m.other_cores,
            )
        ps3_m, vit_m = measured["PS3"], measured["ViT"]
        if vit_m.attention_flops == 0:
            raise SystemExit("the FLOP counter saw no attention op: the SDPA kernel in use has no formula here")
        for name, counted, analytic in (
            ("PS3", ps3_m.flops, ps3_flops(backbone, resolution, args.budget)),
            ("ViT", vit_m.flops, vit_flops(backbone, resolution)),
        ):
            worst_analytic = max(worst_analytic, abs(counted - analytic) / counted)
            if abs(counted - analytic) > 0.01 * counted:
                logger.warning("R=%d %s: analytic FLOPs %d differ from counted %d", resolution, name, analytic, counted)
        rows.append((resolution, ps3_m, vit_m))
    total_s = time.perf_counter() - began_all

    flops, times, growth = flops_table(rows, args.budget), time_table(rows), growth_table(rows)
    so400m = so400m_table(resolutions, args.budget)
    print("\n\n".join(t for t in (flops, times, growth, so400m) if t))
    logger.info(
        "all measurements took %.0f s; analytic FLOP model within %.2f%% of the counter", total_s, 100 * worst_analytic
    )
    if args.write_docs:
        body = doc_body(args, rows, load, total_s, worst_analytic, (flops, times, growth, so400m))
        replace_doc_section(Path("docs/benchmarks.md"), DOC_TITLE, body)


def doc_body(
    args: argparse.Namespace,
    rows: list[tuple[int, Measurement, Measurement]],
    load: float,
    total_s: float,
    worst_analytic: float,
    tables: tuple[str, str, str, str],
) -> str:
    flops, times, growth, so400m = tables
    by_res = {r: (p, v) for r, p, v in rows}
    low = (LOW_RES // PATCH) ** 2
    command = ".venv/bin/python benchmarks/ps3_scaling.py --write-docs"
    defaults = {
        "resolutions": list(PAPER_SCALES),
        "budget": 2560,
        "width": 64,
        "mlp": 256,
        "layers": 4,
        "heads": 2,
        "conv_hidden": 32,
        "repeats": 9,
        "long_run_s": 20.0,
        "slow_repeats": 2,
        "threads": 2,
        "retries": 3,
        "quiet_wait_s": 45.0,
    }
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default:
            shown = " ".join(map(str, value)) if isinstance(value, list) else f"{value:g}"
            command += f" --{key.replace('_', '-')} {shown}"
    reading = [
        "Reading: with the token budget fixed, PS3's FLOPs stay almost flat once a high-res scale exists "
        "(the extra work at larger R is the conv branch, which runs at 1512 from R=1512 up, and a wider "
        "selection head), while the plain ViT's FLOPs follow its token count and, through attention, the "
        "square of it."
    ]
    if PAPER_SCALES[1] in by_res:
        p, v = by_res[PAPER_SCALES[1]]
        if v.flops <= p.flops:
            reading.append(
                f"At 756 PS3 is not cheaper: its {p.tokens - low} selected patches are "
                f"{(p.tokens - low) / v.tokens:.0%} of the ViT's {v.tokens}, and it adds the low-res pass "
                "and the selection branch."
            )
    if LOW_RES in by_res:
        p, v = by_res[LOW_RES]
        reading.append(
            f"At 378 both sides do the same computation, so the {_ratio(v.median_wall_s, p.median_wall_s)} "
            "wall ratio there is no PS3 effect but the two code paths' overheads (transformers wrapper vs "
            "`block_forward`) plus noise from other load, a yardstick for the other time ratios."
        )
    top = max(by_res)
    if PAPER_SCALES[1] in by_res and top > PAPER_SCALES[1]:
        (p0, _), (p1, _) = by_res[PAPER_SCALES[1]], by_res[top]
        reading.append(
            f"From 756 to {top} PS3's wall time grows {_ratio(p1.median_wall_s, p0.median_wall_s)} against "
            f"{_ratio(p1.flops, p0.flops)} for its FLOPs: it also does work the counter does not see and that "
            "grows with the input (bicubic resizes of the R x R image to every scale, the unfold of each "
            "scale's whole patch grid before the selected patches are gathered)."
        )
    loaded = []
    for resolution, p, v in rows:
        sides = [name for name, m in (("PS3", p), ("ViT", v)) if m.other_cores >= 0.5]
        if sides:
            loaded.append(f"{resolution} {' and '.join(sides)}")
    if loaded:
        reading.append(
            f"Other processes kept half a core or more busy during some timed runs (rows {', '.join(loaded)}); "
            f"with {args.threads} threads on {os.cpu_count()} cores such load can slow a forward by a few "
            "times, so those times are high and their ratios less reliable than the FLOP counts, which do "
            "not depend on load."
        )
    reading.append(
        "The paper's '79x less cost than SigLIP at 4K' is a pre-training cost (forward and backward, both "
        "towers, its batch sizes), not this encoder-forward ratio."
    )
    return "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"{machine_description()} Background load before the run: {load:.1f} busy cores. "
            f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} threads.",
            "",
            f"One random-weight SigLIP vision tower (width {args.width}, MLP {args.mlp}, {args.layers} layers, "
            f"{args.heads} heads, patch 14, position table for 378 px so the low-res grid is 27x27) encodes one "
            "random image at batch 1 two ways at each maximum resolution R: PS3 (`PS3VisionModel`, the paper's "
            f"scale list up to R, a fixed budget of {args.budget} high-res patches in one round split by pixel "
            f"share, bottom-up selection, conv branch {args.conv_hidden} wide with 3 ConvNeXt blocks) and the "
            "plain ViT (`SiglipVisionModel`, SDPA, `interpolate_pos_encoding=True`, the same weights) on every "
            "patch at R. At 378 PS3 has no high-res scale and is its low-res pass plus the pool, the same "
            "computation as the ViT. GFLOPs: `FlopCounterMode` over one forward (matmuls, convolutions and "
            "attention, 2 FLOPs per multiply-add; the counter lacks a formula for the CPU SDPA kernel, so the "
            "script adds one). Times: median (and range) over the timed forwards after the counted one and "
            "one more warm-up, PS3 and ViT runs alternating so that load from other processes hits both "
            f"alike; a forward slower than {args.long_run_s:g} s gets no second warm-up and "
            f"{args.slow_repeats} more runs, its counted run included in the median. Before each resolution "
            f"the script waits up to {args.quiet_wait_s:g} s for the rest of the machine to go quiet (< 0.3 "
            f"busy cores), and fast timings disturbed by other load are retaken (at most {args.retries} times, "
            "shown in the runs column). Process CPU s is this process's CPU time over all its threads; other "
            "load is what the rest of the machine kept busy meanwhile (/proc/stat). Ratios are ViT / PS3. "
            f"All measurements took {total_s:.0f} s.",
            "",
            flops,
            "",
            times,
            "",
            *([f"Growth factors:\n\n{growth}", ""] if growth else []),
            "The same shapes through the script's analytic FLOP model (within "
            f"{worst_analytic:.2%} of the counter on every row above) with the paper's SigLIP-SO400M shapes "
            "(width 1152, MLP 4304, 27 layers, 16 heads, conv branch 512 wide with 3 blocks): at width 1152 "
            "the per-token matmuls weigh far more against attention than at width 64, so the plain ViT grows "
            "less steeply than on the small backbone.",
            "",
            so400m,
            "",
            " ".join(reading),
        ]
    )


if __name__ == "__main__":
    main()
