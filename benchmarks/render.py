"""Render a pytest-benchmark JSON of the fastssl suite as a markdown summary (and PNG plots).

    python benchmarks/render.py RESULTS.json [-o SUMMARY.md] [--plots DIR]

Per loss and shape, one line per implementation: median time of one forward + backward, the
speed-up against the eager reference, the compiled reference and lightly (their median divided
by this row's), the fraction of the roofline floor reached (floor / median) and the peak memory.
Rows that did not run are listed with their reason. ``--plots`` draws time and memory against
the batch size for NT-Xent and against d for Barlow Twins wherever the results hold several
sizes (matplotlib, Agg backend). Only the standard library is needed without ``--plots``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

IMPL_ORDER = ("reference", "reference-compiled", "lightly", "fastssl-torch", "fastssl-triton")
LOSS_ORDER = ("ntxent", "barlow_twins", "vicreg", "swav", "sinkhorn", "dino", "wmse")
LOSS_TITLES = {
    "ntxent": "NT-Xent (SimCLR)",
    "barlow_twins": "Barlow Twins",
    "vicreg": "VICReg",
    "swav": "SwAV (two crops, Sinkhorn + swapped prediction)",
    "sinkhorn": "Sinkhorn-Knopp codes (forward only)",
    "dino": "DINO (2 teacher views)",
    "wmse": "W-MSE (Cholesky, two views)",
}
BASELINES = (("reference", "vs reference"), ("reference-compiled", "vs compiled"), ("lightly", "vs lightly"))
COLUMNS = ("impl", "median (ms)") + tuple(label for _, label in BASELINES) + ("% of floor", "peak mem (MB)", "rounds")

GroupKey = Tuple[str, Tuple[Tuple[str, int], ...], str]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def rows(results: dict) -> List[dict]:
    """One flat dict per measured or skipped row: loss, impl, dtype, shape (ordered items),
    median_ms, peak_mem_mb, floor_ms, flops, min_bytes, rounds, skipped (reason or None)."""
    out = []
    for bench in results.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "loss" not in info:
            continue  # not a row of this suite
        stats = bench.get("stats", {})
        out.append(
            {
                "loss": info["loss"],
                "impl": info["impl"],
                "dtype": info["dtype"],
                "shape": tuple(info["shape"].items()),
                "median_ms": 1e3 * stats["median"] if "median" in stats else None,
                "peak_mem_mb": info.get("peak_mem_mb"),
                "floor_ms": info.get("floor_ms"),
                "flops": info.get("flops"),
                "min_bytes": info.get("min_bytes"),
                "rounds": stats.get("rounds"),
                "skipped": None,
            }
        )
    for skip in results.get("skipped", []):
        out.append(
            {
                "loss": skip["loss"],
                "impl": skip["impl"],
                "dtype": skip["dtype"],
                "shape": tuple(skip["shape"].items()),
                "median_ms": None,
                "peak_mem_mb": None,
                "floor_ms": None,
                "flops": None,
                "min_bytes": None,
                "rounds": None,
                "skipped": skip["reason"],
            }
        )
    return out


def _order(value: str, order: Sequence[str]) -> Tuple[int, str]:
    return (order.index(value) if value in order else len(order), value)


def grouped(all_rows: Iterable[dict]) -> "OrderedDict[GroupKey, List[dict]]":
    """Rows grouped by (loss, shape, dtype), losses in suite order, shapes by size, impls in
    :data:`IMPL_ORDER`."""
    groups: Dict[GroupKey, List[dict]] = {}
    for row in all_rows:
        groups.setdefault((row["loss"], row["shape"], row["dtype"]), []).append(row)

    def key(k: GroupKey):
        loss, shape, dtype = k
        return (_order(loss, LOSS_ORDER), tuple(v for _, v in shape), dtype)

    return OrderedDict(
        (k, sorted(groups[k], key=lambda r: _order(r["impl"], IMPL_ORDER))) for k in sorted(groups, key=key)
    )


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "—"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.4f}"


def _fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.2f}×" if x < 100 else f"{x:.0f}×"


def _fmt_percent(x: Optional[float]) -> str:
    if x is None:
        return "—"
    return f"{x:.1f} %" if x >= 1 else f"{x:.2g} %"


def _fmt_mb(mb: Optional[float]) -> str:
    if mb is None:
        return "—"
    return f"{mb:.1f}" if mb >= 1 else f"{mb:.3f}"


def _fmt_si(value: Optional[float], unit: str) -> str:
    if value is None:
        return "?"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def table_lines(group: List[dict]) -> List[str]:
    """The markdown table of one (loss, shape, dtype) group."""
    medians = {r["impl"]: r["median_ms"] for r in group if r["median_ms"] is not None}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in group:
        if r["skipped"] is not None:
            reason = r["skipped"].replace("|", "\\|").replace("\n", " ")
            cells = [r["impl"], f"not run: {reason}"] + [""] * (len(COLUMNS) - 2)
        else:
            median = r["median_ms"]
            ratios = [
                _fmt_ratio(medians[base] / median) if base in medians and median else "—" for base, _ in BASELINES
            ]
            floor = r["floor_ms"]
            percent = 100.0 * floor / median if floor is not None and median else None
            cells = [r["impl"], _fmt_ms(median), *ratios, _fmt_percent(percent), _fmt_mb(r["peak_mem_mb"]),
                     str(r["rounds"] if r["rounds"] is not None else "—")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _machine_lines(info: dict) -> List[str]:
    cpu = info.get("cpu") or {}
    if info.get("gpu"):
        device = f"GPU: {info['gpu']}"
    else:
        brand = cpu.get("brand_raw") or info.get("processor") or "CPU"
        device = f"CPU: {brand}"
    threads = info.get("torch_threads")
    cores = info.get("cpu_count") or cpu.get("count")
    if cores or threads:
        device += f" ({cores} cores, {threads} torch threads)"
    rates = info.get("rates") or {}
    matmul = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in sorted((rates.get("matmul_tflops") or {}).items()))
    copy = ", ".join(f"{k} {v:.3g} GB/s" for k, v in sorted((rates.get("copy_gbps") or {}).items()))
    versions = " / ".join(str(info.get(k)) for k in ("torch", "triton", "lightly"))
    lines = [
        "| | |",
        "|---|---|",
        f"| device | {device} |",
        f"| commit | `{info.get('commit')}` |",
        f"| torch / triton / lightly | {versions} |",
        f"| date | {info.get('date')} |",
        f"| matmul rate (measured) | {matmul or '—'} |",
        f"| copy bandwidth (measured, read + write) | {copy or '—'} |",
    ]
    load = info.get("load_average")
    if load:
        lines.append(f"| load average (1 min) at start / end | {' / '.join(f'{x:.2f}' for x in load)} |")
    return lines


def render_markdown(results: dict, plots: Sequence[Tuple[str, str]] = ()) -> str:
    """The summary: machine header, then per loss and shape one table (see module docstring).
    ``plots`` are (title, path relative to the summary) pairs to embed at the end."""
    info = results.get("machine_info", {})
    title = info.get("gpu") or "CPU"
    out = [f"# fastssl benchmarks — {title}", ""]
    out += _machine_lines(info)
    out += [
        "",
        "Forward + backward of each loss on fresh random inputs (Sinkhorn: forward only). "
        "*median*: median over the rounds; *vs X*: X's median / this row's (above 1 = faster than X); "
        "*% of floor*: roofline floor / median; *peak mem*: tensor memory allocated during one call "
        "beyond the inputs (see `benchmarks/README.md`).",
    ]
    current_loss = None
    for (loss, shape, dtype), group in grouped(rows(results)).items():
        if loss != current_loss:
            out += ["", f"## {LOSS_TITLES.get(loss, loss)}"]
            current_loss = loss
        label = ", ".join(f"{k} = {v}" for k, v in shape)
        measured = next((r for r in group if r["floor_ms"] is not None), None)
        out += ["", f"### {label} · {dtype}", ""]
        if measured is not None:
            out += [
                f"Roofline floor {_fmt_ms(measured['floor_ms'])} ms "
                f"({_fmt_si(measured['flops'], 'FLOP')}, {_fmt_si(measured['min_bytes'], 'B')}).",
                "",
            ]
        out += table_lines(group)
    if plots:
        out += ["", "## Plots", ""]
        for plot_title, path in plots:
            out += [f"![{plot_title}]({path})", ""]
    return "\n".join(out).rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _series(group_rows: List[dict], x_of) -> Dict[str, List[Tuple[float, float, Optional[float]]]]:
    series: Dict[str, List[Tuple[float, float, Optional[float]]]] = {}
    for r in group_rows:
        if r["median_ms"] is None:
            continue
        series.setdefault(r["impl"], []).append((x_of(r), r["median_ms"], r["peak_mem_mb"]))
    return {impl: sorted(points) for impl, points in series.items()}


def plot_specs(all_rows: List[dict]) -> List[Tuple[str, str, str, List[dict], object]]:
    """(file stem, title, x label, rows, x function) for every sweep with at least two sizes:
    NT-Xent against 2N per (d, dtype), Barlow Twins against d per (N, dtype)."""
    specs = []
    measured = [r for r in all_rows if r["median_ms"] is not None]
    for d, dtype in sorted({(dict(r["shape"])["d"], r["dtype"]) for r in measured if r["loss"] == "ntxent"}):
        sel = [r for r in measured if r["loss"] == "ntxent" and r["dtype"] == dtype and dict(r["shape"])["d"] == d]
        if len({dict(r["shape"])["n"] for r in sel}) >= 2:
            specs.append((f"ntxent_d{d}_{dtype}", f"NT-Xent, d = {d}, {dtype}", "2N (samples of both views)", sel,
                          lambda r: 2 * dict(r["shape"])["n"]))
    for n, dtype in sorted({(dict(r["shape"])["n"], r["dtype"]) for r in measured if r["loss"] == "barlow_twins"}):
        sel = [r for r in measured if r["loss"] == "barlow_twins" and r["dtype"] == dtype and dict(r["shape"])["n"] == n]
        if len({dict(r["shape"])["d"] for r in sel}) >= 2:
            specs.append((f"barlow_twins_n{n}_{dtype}", f"Barlow Twins, N = {n}, {dtype}", "d (features)", sel,
                          lambda r: dict(r["shape"])["d"]))
    return specs


def draw_plots(results: dict, out_dir: str) -> List[Tuple[str, str]]:
    """Write one PNG per sweep (time with the roofline floor, and peak memory, side by side,
    log-log); returns (title, path) pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for stem, title, xlabel, sel, x_of in plot_specs(rows(results)):
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl, points in sorted(_series(sel, x_of).items(), key=lambda kv: _order(kv[0], IMPL_ORDER)):
            xs = [p[0] for p in points]
            ax_time.plot(xs, [p[1] for p in points], marker="o", label=impl)
            mem = [(p[0], p[2]) for p in points if p[2] is not None and p[2] > 0]
            if mem:
                ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl)
        floors = sorted({(x_of(r), r["floor_ms"]) for r in sel if r["floor_ms"] is not None})
        if floors:
            ax_time.plot([f[0] for f in floors], [f[1] for f in floors], "k--", label="roofline floor")
        for ax, ylabel in ((ax_time, "median time (ms)"), (ax_mem, "peak memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append((title, path))
    return written


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="pytest-benchmark JSON (--benchmark-json) of the fastssl suite")
    parser.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    parser.add_argument("--plots", metavar="DIR", help="also draw PNG plots into DIR (needs matplotlib)")
    args = parser.parse_args(argv)
    results = load(args.results)
    plots: List[Tuple[str, str]] = []
    if args.plots:
        drawn = draw_plots(results, args.plots)
        base = os.path.dirname(os.path.abspath(args.output)) if args.output else os.getcwd()
        plots = [(title, os.path.relpath(path, base)) for title, path in drawn]
    text = render_markdown(results, plots)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
