"""``python -m fastssl.train.experiments collapse``: the collapse experiments of the source papers.

Each experiment trains two or three variants of one method -- same data, seed and budget --
and checks a claim of the literature about what happens without a collapse-avoiding
ingredient, from the logged collapse metrics:

=============  ==========================================================================
simsiam        with vs. without the predictor, and without the stop-gradient (Chen & He
               2021, Fig. 2 and the predictor table): std of the normalized output -> 0
vicreg         full vs. without variance vs. without covariance (Bardes et al. 2022,
               ablations): total vs. dimensional collapse
dino           with vs. without centering (Caron et al. 2021; Jha et al., App. B.2): the
               center-vector norm rises without it
byol           high vs. low EMA momentum (Grill et al. 2020; Jha et al., Sec. 3.5, Fig. 7):
               low momentum raises the center vector and lowers kNN accuracy
center         Jha et al.'s center-penalty objective vs. plain invariance (Sec. 3.1): the
               penalty keeps the center vector small, invariance alone collapses
=============  ==========================================================================

It writes ``REPORT.md`` (a table per experiment, the claim, and whether these numbers support
it, decided by the rule printed beside it), one PNG per experiment (the collapse metric over
epochs for every variant on the same axes, the untrained value marked, and kNN accuracy) and
``results.json``, into ``--output-dir`` (default ``docs/collapse``). The runs themselves go to
``--runs-dir``; with ``--reuse`` finished runs there are read instead of retrained::

    python -m fastssl.train.experiments collapse                      # all five, the recipes' budgets
    python -m fastssl.train.experiments collapse --only dino,byol --budget cpu   # minutes, 16-px images
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Data and schedule of each budget (flags of python -m fastssl.train, common to every run).
BUDGETS: Dict[str, List[str]] = {
    # What fits a loaded 2-core CPU: 16-pixel shapes, a narrower CNN, 120 steps: about a
    # minute per run.
    "cpu": ["--num-train", "1000", "--num-test", "500", "--image-size", "16", "--width", "8", "--epochs", "8",
            "--batch-size", "64", "--probe-steps", "100"],
    # The driver's defaults (4000 images; each method's own epochs): the budget at which every
    # method's recipe learns, so that removing an ingredient is compared with a working run.
    "default": [],
    # For the tests: seconds.
    "tiny": ["--num-train", "48", "--num-test", "24", "--image-size", "16", "--width", "4", "--batch-size", "16",
             "--epochs", "2", "--probe-steps", "5"],
}
METRIC_LABELS = {
    "std_of_l2_normalized": "std of normalized embeddings",
    "entropy_rank": "entropy rank",
    "stable_rank": "stable rank",
    "center_vector_norm": "center-vector norm",
    "knn_top1": "kNN top-1",
}


@dataclass
class Variant:
    name: str  # short label, also the run directory's suffix
    label: str  # legend text
    flags: List[str] = field(default_factory=list)


@dataclass
class Condition:
    """``metric(subject) < factor * metric(other) + offset`` (or ``>``), on the final records;
    ``other=None`` compares with the constant ``offset``."""

    subject: str  # variant name
    metric: str
    relation: str  # "<" or ">"
    other: Optional[str] = None
    factor: float = 1.0
    offset: float = 0.0

    def evaluate(self, finals: Dict[str, Dict[str, Any]]) -> Tuple[bool, float, float]:
        left = _final(finals, self.subject, self.metric)
        right = self.offset if self.other is None else self.factor * _final(finals, self.other, self.metric) + self.offset
        ok = left < right if self.relation == "<" else left > right
        return bool(ok), left, right  # a NaN (missing metric) fails either relation

    def describe(self, labels: Dict[str, str]) -> str:
        name = METRIC_LABELS.get(self.metric, self.metric)
        if self.other is None:
            bound = f"{self.offset:g}"
        else:
            bound = ("" if self.factor == 1 else f"{self.factor:g} x ") + f"that of '{labels[self.other]}'"
            bound += f" + {self.offset:g}" if self.offset else ""
        return f"{name} of '{labels[self.subject]}' {self.relation} {bound}"


@dataclass
class Claim:
    """What the literature says (with the citation) and how the final numbers decide it: every
    group of ``conditions`` must hold, a group holding when any of its conditions does."""

    text: str
    conditions: List[Tuple[Condition, ...]]

    def rule(self, labels: Dict[str, str]) -> str:
        groups = [" or ".join(c.describe(labels) for c in group) for group in self.conditions]
        return ", and ".join(f"({g})" if len(group) > 1 else g for g, group in zip(groups, self.conditions))

    def check(self, finals: Dict[str, Dict[str, Any]], labels: Dict[str, str]) -> Tuple[bool, List[str]]:
        """(supported, one line per condition with its numbers)."""
        supported, lines = True, []
        for group in self.conditions:
            group_ok = False
            for condition in group:
                ok, left, right = condition.evaluate(finals)
                group_ok |= ok
                lines.append(f"{condition.describe(labels)}: {left:.4g} {condition.relation} {right:.4g} -- "
                             + ("holds" if ok else "does not hold"))
            supported &= group_ok
        return supported, lines


@dataclass
class Experiment:
    name: str
    title: str
    method: str
    variants: List[Variant]
    metrics: Tuple[str, ...]  # the collapse metric(s) plotted, first one primary
    claims: List[Claim]
    note: str = ""


def _final(finals: Dict[str, Dict[str, Any]], variant: str, key: str) -> float:
    value = finals[variant].get(key)
    return float("nan") if value is None else float(value)


EXPERIMENTS: List[Experiment] = [
    Experiment(
        "simsiam", "SimSiam: predictor and stop-gradient", "simsiam",
        [Variant("full", "SimSiam"), Variant("no-predictor", "without predictor", ["--no-predictor"]),
         Variant("no-stop-gradient", "without stop-gradient", ["--no-stop-gradient"])],
        ("std_of_l2_normalized", "entropy_rank"),
        [
            Claim("Without the stop-gradient SimSiam collapses: the std of the l2-normalized output "
                  "goes to 0 and kNN accuracy drops to chance (Chen & He 2021, Fig. 2).",
                  [(Condition("no-stop-gradient", "std_of_l2_normalized", "<", "full", 0.5),
                    Condition("no-stop-gradient", "entropy_rank", "<", "full", 0.5)),
                   (Condition("no-stop-gradient", "knn_top1", "<", "full"),)]),
            Claim("Without the predictor SimSiam collapses (Chen & He 2021, predictor table: 0.1 % accuracy).",
                  [(Condition("no-predictor", "std_of_l2_normalized", "<", "full", 0.5),
                    Condition("no-predictor", "entropy_rank", "<", "full", 0.5)),
                   (Condition("no-predictor", "knn_top1", "<", "full"),)]),
        ],
        "SimSiam's projector ends in a BatchNorm, which keeps every output coordinate spread over the "
        "batch: a collapse can then only be dimensional (the entropy rank shows it) unless the "
        "BatchNorm is bypassed.",
    ),
    Experiment(
        "vicreg", "VICReg: variance and covariance terms", "vicreg",
        [Variant("full", "VICReg"), Variant("no-variance", "without variance (mu = 0)", ["--loss-arg", "mu_param=0"]),
         Variant("no-covariance", "without covariance (nu = 0)", ["--loss-arg", "nu_param=0"])],
        ("std_of_l2_normalized", "entropy_rank"),
        [
            Claim("Without the variance term the embeddings collapse to a point (total collapse; Bardes et al. 2022, ablations).",
                  [(Condition("no-variance", "std_of_l2_normalized", "<", "full", 0.5),),
                   (Condition("no-variance", "center_vector_norm", ">", offset=0.8),)]),
            Claim("Without the covariance term the embeddings keep their spread but fall into few dimensions "
                  "(dimensional collapse; Bardes et al. 2022, ablations).",
                  [(Condition("no-covariance", "entropy_rank", "<", "full", 0.5),),
                   (Condition("no-covariance", "std_of_l2_normalized", ">", "full", 0.5),)]),
        ],
    ),
    Experiment(
        "dino", "DINO: centering of the teacher", "dino",
        [Variant("full", "DINO"), Variant("no-centering", "without centering", ["--no-centering"])],
        ("center_vector_norm",),
        [
            Claim("Without centering DINO collapses: the center-vector norm of the outputs rises and stays "
                  "well above DINO's (Caron et al. 2021; Jha et al., App. B.2).",
                  [(Condition("no-centering", "center_vector_norm", ">", "full", offset=0.1),)]),
        ],
    ),
    Experiment(
        "byol", "BYOL: EMA momentum of the target", "byol",
        [Variant("high-ema", "EMA momentum 0.99", ["--ema-momentum", "0.99"]),
         Variant("low-ema", "EMA momentum 0 (target = online)", ["--ema-momentum", "0"])],
        ("center_vector_norm",),
        [
            Claim("A lower EMA momentum raises the center-vector norm and lowers kNN accuracy "
                  "(Jha et al., Sec. 3.5, Fig. 7; Grill et al. 2020 on the momentum).",
                  [(Condition("low-ema", "center_vector_norm", ">", "high-ema", offset=0.05),),
                   (Condition("low-ema", "knn_top1", "<", "high-ema"),)]),
        ],
        "The momentum follows BYOL's cosine schedule from the base value to 1, so the low-momentum "
        "target is the online network itself at the start and an ever slower average later. The "
        "driver's BYOL projector ends in a BatchNorm (it centres the embeddings of an untrained "
        "network, whose ReLU features all point one way; docs/training.md): that BatchNorm holds "
        "the center vector of both runs small, so at this budget the momentum can show only in "
        "kNN accuracy and rank, not in the center-vector norm Jha et al. track.",
    ),
    Experiment(
        "center", "Jha et al.'s center penalty vs. plain invariance", "center_penalty",
        [Variant("penalty", "invariance + center penalty (lambda = -1)"),
         Variant("invariance", "invariance only (lambda = 0)", ["--loss-arg", "lambda_param=0"])],
        ("center_vector_norm",),
        [
            Claim("Invariance alone collapses (center-vector norm -> 1); penalizing the center vector's "
                  "magnitude avoids it (Jha et al., Sec. 3.1, eq. 32).",
                  [(Condition("invariance", "center_vector_norm", ">", offset=0.8),),
                   (Condition("penalty", "center_vector_norm", "<", offset=0.5),)]),
        ],
    ),
]


def _run_dir(runs_dir: str, exp: Experiment, variant: Variant) -> str:
    return os.path.join(runs_dir, f"{exp.name}-{variant.name}")


def _read_records(run_dir: str) -> List[Dict[str, Any]]:
    from fastssl.train.loop import read_metrics

    return read_metrics(run_dir)


def run_experiment(exp: Experiment, budget: Sequence[str], runs_dir: str, common: Sequence[str], reuse: bool, log=print) -> Dict[str, List[Dict[str, Any]]]:
    """Train every variant (or read it with ``reuse``); returns records by variant name."""
    from fastssl.train.cli import main as train_main

    out: Dict[str, List[Dict[str, Any]]] = {}
    for variant in exp.variants:
        run_dir = _run_dir(runs_dir, exp, variant)
        if reuse and os.path.isfile(os.path.join(run_dir, "summary.json")):
            log(f"[{exp.name}] {variant.label}: reusing {run_dir}")
        else:
            argv = ["--method", exp.method, "--output-dir", run_dir, "--no-plots", "--no-tensorboard", "--progress", "none"]
            argv += list(budget) + list(common) + variant.flags
            log(f"[{exp.name}] {variant.label}: python -m fastssl.train {' '.join(argv)}")
            t0 = time.perf_counter()
            code = train_main(argv)
            if code != 0:
                raise RuntimeError(f"run {run_dir} failed (exit status {code})")
            log(f"[{exp.name}] {variant.label}: {time.perf_counter() - t0:.0f} s")
        out[variant.name] = _read_records(run_dir)
    return out


def _figure(exp: Experiment, records: Dict[str, List[Dict[str, Any]]], path: str) -> None:
    from fastssl.train.plots import _integer_epochs, _pyplot

    plt = _pyplot()
    if plt is None:
        return
    keys = list(exp.metrics) + ["knn_top1"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2))
    colors = ["tab:blue", "tab:red", "tab:green"]
    for ax, key in zip(axes, keys):
        untrained = None
        for color, variant in zip(colors, exp.variants):
            rs = [r for r in records[variant.name] if r.get(key) is not None]
            ax.plot([r["epoch"] for r in rs], [r[key] for r in rs], "o-", ms=3, color=color, label=variant.label)
            if rs and rs[0]["epoch"] == 0:
                untrained = rs[0][key]
        if untrained is not None:
            ax.axhline(untrained, color="gray", ls="--", lw=1, label=f"untrained ({untrained:.3g})")
        ax.set_title(METRIC_LABELS.get(key, key), fontsize=9)
        _integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(exp.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _report_section(exp: Experiment, records: Dict[str, List[Dict[str, Any]]], figure: Optional[str]) -> Tuple[str, List[Dict[str, Any]]]:
    finals = {v.name: records[v.name][-1] for v in exp.variants}
    first = records[exp.variants[0].name][0]
    lines = [f"## {exp.title}", ""]
    cols = ("knn_top1", "linear_probe_top1", "std_of_l2_normalized", "entropy_rank", "stable_rank", "center_vector_norm")
    lines.append("run | epochs | loss | kNN top-1 | linear probe | std of ẑ | entropy rank | stable rank | center-vector norm")
    lines.append("---|---|---|---|---|---|---|---|---")
    lines.append("untrained | 0 | – | " + " | ".join(_fmt(first.get(c), ".4f" if c == "std_of_l2_normalized" else ".3f") for c in cols))
    for v in exp.variants:
        r = finals[v.name]
        flags = f" (`{' '.join(v.flags)}`)" if v.flags else ""
        lines.append(f"{v.label}{flags} | {r['epoch']} | {_fmt(r.get('loss'), '.4g')} | "
                     + " | ".join(_fmt(r.get(c), ".4f" if c == "std_of_l2_normalized" else ".3f") for c in cols))
    lines.append("")
    labels = {v.name: v.label for v in exp.variants}
    verdicts = []
    for claim in exp.claims:
        ok, evidence = claim.check(finals, labels)
        rule = claim.rule(labels)
        verdicts.append({"experiment": exp.name, "claim": claim.text, "rule": rule, "supported": ok, "evidence": evidence})
        lines.append(f"* **Claim.** {claim.text}  ")
        lines.append(f"  **Rule** (final epoch). {rule}.  ")
        lines.append(f"  **This run: {'supported' if ok else 'NOT supported'}.** "
                     + "; ".join(evidence) + ".")
    # A comparison means little when the reference run itself did not learn: say so.
    reference = exp.variants[0]
    knn_start, knn_end = first.get("knn_top1"), finals[reference.name].get("knn_top1")
    if knn_start is not None and knn_end is not None:
        learned = knn_end >= knn_start + 0.05
        lines.append(f"* {reference.label} itself: kNN {knn_start:.3f} untrained -> {knn_end:.3f} "
                     + ("(it learned: the variants are compared with a working run)." if learned else
                        "(it did not learn at this budget: the comparison says little about the claim)."))
    if exp.note:
        lines += ["", exp.note]
    if figure:
        lines += ["", f"![{exp.title}]({os.path.basename(figure)})"]
    lines.append("")
    return "\n".join(lines), verdicts


def collapse(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastssl.train.experiments collapse", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help=f"comma-separated subset of {', '.join(e.name for e in EXPERIMENTS)}")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="default",
                   help="data and schedule of every run: default (each method's recipe, where the claims show), "
                   "cpu (16-px images, minutes) or tiny (tests)")
    p.add_argument("--output-dir", default=os.path.join("docs", "collapse"), help="report and figures (default docs/collapse)")
    p.add_argument("--runs-dir", default=os.path.join("runs", "collapse"), help="the training runs (default runs/collapse)")
    p.add_argument("--reuse", action="store_true", help="read finished runs in --runs-dir instead of training them again")
    p.add_argument("--threads", type=int, help="CPU threads of every run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    chosen = EXPERIMENTS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in {e.name for e in EXPERIMENTS}]
        if unknown:
            print(f"{p.prog}: error: unknown experiment(s) {unknown}; choose from {[e.name for e in EXPERIMENTS]}", file=sys.stderr)
            return 2
        chosen = [e for e in EXPERIMENTS if e.name in names]
    common = ["--seed", str(args.seed)] + (["--threads", str(args.threads)] if args.threads else [])
    os.makedirs(args.output_dir, exist_ok=True)
    sections, verdicts, results = [], [], {}
    t0 = time.perf_counter()
    for exp in chosen:
        records = run_experiment(exp, BUDGETS[args.budget], args.runs_dir, common, args.reuse)
        figure = os.path.join(args.output_dir, f"{exp.name}.png")
        _figure(exp, records, figure)
        text, v = _report_section(exp, records, figure if os.path.isfile(figure) else None)
        sections.append(text)
        verdicts += v
        results[exp.name] = {name: rs for name, rs in records.items()}
    budget_text = " ".join(BUDGETS[args.budget]) or "(the driver's defaults)"
    header = [
        "# Collapse experiments",
        "",
        f"Generated by `python -m fastssl.train.experiments collapse --budget {args.budget}"
        + (f" --only {args.only}" if args.only else "") + "`.",
        f"Every run: shapes data set, seed {args.seed}, tiny CNN, the method's default recipe, `{budget_text}`; "
        "the variants of an experiment differ only by the flags shown. Metrics on the held-out images after the "
        "last epoch: kNN top-1 on backbone features (chance 0.10), and on the embeddings the loss sees: std of the "
        "l2-normalized embeddings (0 = collapse, about 1/sqrt(d) when spread), entropy and stable rank, "
        "center-vector norm (1 = every embedding points the same way).",
        "",
        "claim | verdict",
        "---|---",
    ]
    header += [f"{v['experiment']}: {v['claim']} | {'supported' if v['supported'] else 'NOT supported'}" for v in verdicts]
    report = "\n".join(header) + "\n\n" + "\n".join(sections)
    with open(os.path.join(args.output_dir, "REPORT.md"), "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"budget": args.budget, "verdicts": verdicts, "records": results}, f, indent=1)
        f.write("\n")
    for v in verdicts:
        print(f"{'supported    ' if v['supported'] else 'NOT supported'}  {v['experiment']}: {v['claim'][:90]}")
    print(f"report: {os.path.join(args.output_dir, 'REPORT.md')} ({time.perf_counter() - t0:.0f} s)")
    return 0


COMMANDS = {"collapse": collapse}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m fastssl.train.experiments collapse [--only NAMES] [--budget cpu|default|tiny] "
              "[--output-dir DIR] [--runs-dir DIR] [--reuse] [--threads N]", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
