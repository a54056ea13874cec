"""The spike report: what a user reads before deploying a glufx model, from saved statistics only.

`glufx.report.write_report(directory)` reads what `glufx.save` wrote (the plan, the calibration
statistics of every observation, the tokenizer if saved, evaluation results if `glufx eval --out`
put them there) and writes `report.md` with PNG figures beside it; nothing runs the model. The figures
answer, in order: where are the spikes (score per layer and input), what do they look like along a
sequence (the paper's figure: token-wise absmax with the spike tokens named), are they token spikes or
channel outliers (per-channel absmax of the worst inputs), and what glufx did about each (the plan per
module, the QFeP prefix and its effect). `summary(directory)` is the same content as plain text.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .plan import Plan
from .stats import Statistics

REPORT_FILE, EVAL_FILE = "report.md", "glufx_eval.json"
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def _layer(fqn: str) -> Optional[int]:
    m = _LAYER.search(fqn)
    return int(m.group(1)) if m else None


def _input_label(fqns: list[str]) -> str:
    """q_proj/k_proj/v_proj -> 'q/k/v_proj'-like short label of a sibling group's shared input."""
    names = [f.rsplit(".", 1)[-1] for f in fqns]
    if all(n.endswith("_proj") for n in names):
        return "/".join(n.removesuffix("_proj") for n in names)
    return "/".join(names)


class Saved:
    """What a report reads from a glufx.save directory."""

    def __init__(self, directory: str | Path):
        from .deploy.serialize import PLAN_FILE, load_observations

        self.dir = Path(directory)
        if not (self.dir / PLAN_FILE).exists():
            raise FileNotFoundError(f"glufx report: {self.dir} has no {PLAN_FILE}; point it at a directory written by "
                                    "glufx.save or `glufx quantize --out DIR`")
        self.plan = Plan.load(self.dir / PLAN_FILE)
        try:
            self.stats = Statistics.load(self.dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"glufx report: {self.dir} holds a plan but no calibration statistics; save the "
                                    "model with this glufx (glufx.save writes them)") from e
        self.observations = load_observations(self.dir)
        self.eval = json.loads((self.dir / EVAL_FILE).read_text()) if (self.dir / EVAL_FILE).exists() else None
        self.tokenizer = None
        if (self.dir / "tokenizer_config.json").exists():
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(self.dir)
            except (OSError, ValueError):
                self.tokenizer = None  # ids are shown instead of text

    def token(self, tid: int) -> str:
        if tid < 0:
            return "?"
        if self.tokenizer is None:
            return f"#{tid}"
        return repr(self.tokenizer.decode([tid]))[1:-1].replace(" ", "␣") or f"#{tid}"

    @property
    def first(self) -> Statistics:
        """The plain model's statistics (before any transform or prefix), or the final ones if not saved."""
        return self.observations[0] if self.observations else self.stats


def grid(stats: Statistics) -> tuple[list[int], list[str], dict[tuple[int, str], float]]:
    """(layers, input labels, (layer, label) -> spike score) over every observed linear input."""
    cells, labels, layers = {}, [], set()
    for st in stats.inputs:
        layer = _layer(st.fqns[0])
        if layer is None:
            continue
        lab = _input_label(st.fqns)
        if lab not in labels:
            labels.append(lab)
        layers.add(layer)
        cells[(layer, lab)] = st.score
    return sorted(layers), labels, cells


def ranked_inputs(stats: Statistics, top: int) -> list:
    return sorted(stats.inputs, key=lambda st: -st.score)[:top]


def figures(saved: Saved, out: Path, top: int = 4) -> dict[str, str]:
    """Write the PNG figures into `out`; returns {name: file name}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError('glufx report: figures need matplotlib: pip install "glufx[report]"') from e
    import numpy as np

    files = {}
    stats = saved.first
    layers, labels, cells = grid(stats)
    if layers:
        m = np.full((len(layers), len(labels)), np.nan)
        for (layer, lab), v in cells.items():
            m[layers.index(layer), labels.index(lab)] = v
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(labels), 1.2 + 0.32 * len(layers)))
        im = ax.imshow(m, aspect="auto", cmap="magma", norm=matplotlib.colors.LogNorm(vmin=1, vmax=max(np.nanmax(m), 2)))
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("linear input")
        ax.set_ylabel("layer")
        for (layer, lab), v in cells.items():
            ax.text(labels.index(lab), layers.index(layer), f"{v:.0f}" if v >= 10 else f"{v:.1f}", ha="center",
                    va="center", fontsize=7, color="white" if v < np.nanmax(m) / 3 else "black")
        fig.colorbar(im, ax=ax, label="spike score (max / median)")
        ax.set_title("Where the activation spikes are (FP model)")
        files["heatmap"] = _save(plt, fig, out, "spike_heatmap.png")

    worst = [st for st in ranked_inputs(stats, top) if st.trace]
    if worst:
        fig, axes = plt.subplots(len(worst), 1, figsize=(10, 2.2 * len(worst)), squeeze=False)
        for ax, st in zip(axes[:, 0], worst):
            a = np.asarray(st.trace)
            ax.plot(a, lw=0.8)
            ax.set_yscale("log")
            ax.axhline(float(np.median(a)), color="grey", lw=0.6, ls="--")
            # peaks numbered on the curve and named in a box: neighbouring peaks (BOS and the token after
            # it) would print their names over each other
            peaks = np.argsort(-a)[:3]
            ax.plot(peaks, a[peaks], "o", ms=3, color="crimson")
            names = []
            for rank, pos in enumerate(peaks, 1):
                tid = st.trace_tokens[pos] if pos < len(st.trace_tokens) else -1
                ax.annotate(str(rank), (pos, a[pos]), fontsize=7, color="crimson", xytext=(3, 1),
                            textcoords="offset points")
                names.append(f"{rank}: {saved.token(tid)} @{pos} ({a[pos]:.3g})")
            ax.text(0.995, 0.96, "\n".join(names), transform=ax.transAxes, ha="right", va="top", fontsize=7,
                    color="crimson", bbox=dict(facecolor="white", edgecolor="none", alpha=0.85))
            ax.set_title(f"{_title(st)} (score {st.score:.1f})", fontsize=9)
            ax.set_ylabel("token absmax")
        axes[-1, 0].set_xlabel("position in the first calibration sequence")
        files["tokens"] = _save(plt, fig, out, "spike_tokens.png")

    chans = [st for st in ranked_inputs(stats, top) if st.channel_absmax is not None]
    if chans:
        fig, axes = plt.subplots(len(chans), 1, figsize=(10, 2.0 * len(chans)), squeeze=False)
        for ax, st in zip(axes[:, 0], chans):
            c = st.channel_absmax.numpy()
            ax.bar(np.arange(len(c)), c, width=1.0)
            ax.set_yscale("log")
            med = float(np.median(c))
            ax.set_title(f"{_title(st)}: channel absmax, max/median {c.max() / max(med, 1e-12):.0f}x over channels "
                         f"vs {st.score:.0f}x over tokens", fontsize=9)
            ax.set_ylabel("absmax")
        axes[-1, 0].set_xlabel("input channel")
        files["channels"] = _save(plt, fig, out, "channel_outliers.png")
    return files


def _title(st) -> str:
    return f"{_input_label(st.fqns)} of {st.fqns[0].rsplit('.', 1)[0]}"


def _save(plt, fig, out: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _rows(saved: Saved) -> list[tuple]:
    plan = saved.plan
    out = []
    for m in plan.ranked():
        if m.role in ("head", "router"):
            continue
        gran = m.granularity or "-"
        transform = m.decisions.get("transform", {}).get("kind", "-")
        rot = "hadamard/" + str(m.rotation["block"]) if m.rotation else "-"
        scale = f"{m.x_scale:.4g}" if m.x_scale else "-"
        out.append((m.fqn, m.role, f"{m.score:.1f}", m.action, gran, scale, transform, rot, m.reason))
    return out


def _qfep_lines(saved: Saved) -> list[str]:
    plan = saved.plan
    q = plan.qfep or plan.calibration.get("qfep_declined")
    if not q:
        return ["No QFeP prefix (the recipe did not use one)."]
    toks = " ".join(f"`{saved.token(t)}`" for t in q["token_ids"])
    lines = [f"Prefix ({q.get('method')}): {toks} (ids {q['token_ids']}), searched on `{q.get('target')}`."]
    if plan.qfep is None:
        lines.append(f"Declined: {q.get('why')}")
    if "fp_kl" in q:
        lines.append(f"Its own effect on the FP model: KL {q['fp_kl']:.4f} per token on held-out text (bound "
                     f"{q.get('max_fp_kl')}).")
    # the prefix's own effect: the last observation without it against the first with it (the recipe's
    # transforms, observed before, move the scores too)
    target = q.get("target")
    without = [o for o in saved.observations if not o.meta.get("qfep_active")]
    with_prefix = [o for o in saved.observations if o.meta.get("qfep_active")]
    before = without[-1].by_fqn().get(target) if without else None
    after = with_prefix[0].by_fqn().get(target) if with_prefix else None
    if plan.qfep is not None and before is not None and after is not None:
        lines.append(f"Spike score of `{target}`: {before.score:.1f} without the prefix, {after.score:.1f} with it "
                     f"(max token absmax {max(before.seq_max):.3g} -> {max(after.seq_max):.3g}).")
    return lines


def write_report(directory: str | Path, out: Optional[str | Path] = None, top: int = 4) -> Path:
    """report.md (+ PNG figures) for a glufx.save directory; returns the report's path."""
    saved = Saved(directory)
    out = Path(out or saved.dir)
    out.mkdir(parents=True, exist_ok=True)
    files = figures(saved, out, top)
    plan = saved.plan
    md = [f"# glufx report: {saved.dir.name}", "", *summary_lines(saved), ""]
    if "heatmap" in files:
        md += ["## Where the spikes are", "", f"![spike scores]({files['heatmap']})", ""]
    if "tokens" in files:
        md += ["## The spikes along a sequence", "",
               "Token-wise absmax of the most spiky inputs over the first calibration sequence (log scale; the "
               "dashed line is the median, the three largest tokens are named).", "", f"![spike tokens]({files['tokens']})", ""]
    if "channels" in files:
        md += ["## Token spikes or channel outliers", "",
               "Per-channel absmax of the same inputs: a few tall channels on every token are channel outliers "
               "(what equivalence scaling and rotation fix); a high spike score with a flat channel profile is a "
               "token spike (what QFeM and QFeP address).", "", f"![channel outliers]({files['channels']})", ""]
    md += ["## QFeP", "", *_qfep_lines(saved), ""]
    md += ["## What the plan decided, per module", "",
           "| module | role | score | action | activations | static scale | transform | rotation | why |",
           "|---|---|---|---|---|---|---|---|---|"]
    md += ["| " + " | ".join(r) + " |" for r in _rows(saved)]
    if plan.transforms:
        kinds = defaultdict(int)
        for t in plan.transforms:
            kinds[t["kind"]] += 1
        md += ["", "Equivalence transforms (each checked to leave the FP model's outputs unchanged): " +
               ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))]
    if saved.eval:
        from .eval.harness import markdown_table

        md += ["", "## Evaluation", "", markdown_table(saved.eval["results"])]
    path = out / REPORT_FILE
    path.write_text("\n".join(md) + "\n")
    return path


def summary_lines(saved: Saved, top: int = 8) -> list[str]:
    plan = saved.plan
    lines = [f"- decoder-linear parameters in INT8: {100 * plan.int8_param_share():.1f} % "
             f"({len(plan.quantized())} INT8 modules, {len(plan.kept_fp())} kept in FP)"]
    grans = defaultdict(int)
    for m in plan.modules.values():
        if m.action == "int8":
            grans[m.granularity] += 1
    lines.append("- activations: " + ", ".join(f"{n} {g}" for g, n in sorted(grans.items())))
    lines.append(f"- calibration: {plan.calibration.get('sequences')} sequences, {plan.calibration.get('tokens')} "
                 f"tokens, {plan.calibration.get('seconds', 0):.0f} s")
    lines.append("- most spiky inputs (score = mean over sequences of max / median token absmax):")
    by_fqn = saved.stats.by_fqn()
    for st in ranked_inputs(saved.first, top):
        fin = by_fqn.get(st.fqns[0])
        distinct = {}
        for t in st.top_tokens():
            distinct.setdefault(t["token_id"], f"{saved.token(t['token_id'])}@{t['position']} ({t['value']:.3g})")
        tops = ", ".join(list(distinct.values())[:3])
        decided = plan.modules[st.fqns[0]]
        lines.append(f"  - {', '.join(st.fqns)}: {st.score:.1f}"
                     + (f" (after glufx's transforms: {fin.score:.1f})" if fin is not None and fin is not st else "")
                     + f"; top tokens {tops}; {decided.action} {decided.granularity or ''} ({decided.reason})")
    return lines


def summary(directory: str | Path) -> str:
    """The report's findings as plain text, for a terminal."""
    saved = Saved(directory)
    return "\n".join([f"glufx report: {saved.dir}", *summary_lines(saved), "QFeP: " + " ".join(_qfep_lines(saved))])
