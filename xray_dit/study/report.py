"""Phase 9: `report.md` and a self-contained `report.html` (figures embedded), written as a results section.

The report is built once as a list of blocks (headings, paragraphs, tables, figures) and rendered to
both formats, so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import json
import os

import jax
import numpy as np
from etils import epath

from xray_dit.study import analysis, privacy_report
from xray_dit.study.context import StudyContext, phase_seconds


class Report:
    def __init__(self, root: epath.Path):
        self.root = root
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]):
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list]):
        self.blocks.append(("table", header, [[_cell(c) for c in row] for row in rows]))

    def figure(self, path: str | None, caption: str):
        if path and epath.Path(path).exists():
            self.blocks.append(("img", str(path), caption))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                out.append("#" * block[1] + " " + block[2])
            elif kind == "p":
                out.append(block[1])
            elif kind == "ul":
                out.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "table":
                lines = ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
                lines += ["| " + " | ".join(row) + " |" for row in block[2]]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{block[2]}]({os.path.relpath(block[1], self.root)})\n\n*{block[2]}*")
            elif kind == "code":
                out.append("```\n" + block[1] + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                body.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(epath.Path(block[1]).read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block[2])}">'
                            f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
            elif kind == "code":
                body.append(f"<pre>{html.escape(block[1])}</pre>")
        style = ("body{font-family:sans-serif;max-width:980px;margin:2em auto;line-height:1.45;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                 "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}"
                 "figcaption{font-size:.9em;color:#555}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.3f}"
    return str(value)


def _inline(text: str) -> str:
    escaped = html.escape(text)
    parts = escaped.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def _ci(values) -> str:
    estimate, lower, upper = values
    return f"{estimate:.3f} [{lower:.3f}, {upper:.3f}]"


def write_report(context: StudyContext) -> dict:
    config, r = context.config, context.results
    target = config.data.target_class
    report = Report(context.workdir)
    compare, filt, priv = r["07_compare"], r["05_filter"], r["08_privacy"]
    baseline_row = compare["arms"][analysis.BASELINE]

    report.h(1, f"Does DiT-generated {target} data help the classifier, and is it safe to share?")
    report.p(f"Dataset **{config.data.name}/{config.data.builder_config}** ({config.data.image_size} px), "
             f"target (minority) class **{target}**, classifier seeds {list(config.study.seeds)}. "
             f"Test set: {compare['test_images']} images of {compare['test_patients']} patients, "
             f"{compare['test_positives']} positive for {target}.")
    report.h(2, "Answer")
    report.bullets(compare["statements"] + [privacy_report.headline(priv, filt, config)])
    ctr = priv.get("ctr_oracle")
    if ctr and ctr["measurable"] == 0:
        report.p(f"Label fidelity by the phantom's CTR oracle: **none** of the {ctr['generated']} generated images "
                 "has a measurable thorax, so none counts as an enlarged heart (target ≥ 80 %: NOT met).")
    elif ctr:
        ok = ctr["fraction_ctr_above_0.5"] >= 0.8
        report.p(f"Label fidelity by the phantom's CTR oracle: **{100 * ctr['fraction_ctr_above_0.5']:.1f} %** of "
                 f"the {ctr['measurable']} measurable generated {target} images have CTR > 0.5 "
                 f"(target ≥ 80 %: {'met' if ok else 'NOT met'}; "
                 f"{100 * ctr['fraction_of_all_generated_ctr_above_0.5']:.1f} % of all {ctr['generated']} generated); "
                 f"mean CTR synthetic {ctr['synthetic_ctr_mean']:.3f} vs real {ctr['real_minority_ctr_mean']:.3f}.")
    base_auc = baseline_row["target_ensemble_auc_ci"][0]
    if config.data.name == "cxr_phantom":
        in_range = 0.70 <= base_auc <= 0.92
        report.p(f"Baseline {target} test AUC {base_auc:.3f} (intended range for the phantom study 0.70–0.92: "
                 f"{'met' if in_range else 'NOT met'}).")

    report.h(2, "Classifier performance per arm (test split)")
    header = ["arm", f"{target} AUC, seed ensemble [95% CI]", "mean ± sd over seeds", "Δ vs real only [95% CI]",
              "DeLong p", "significant"]
    rows = []
    for arm, row in compare["arms"].items():
        mean, sd = row["per_class_mean_sd"][target]
        vs = row.get("vs_baseline")
        rows.append([arm, _ci(row["target_ensemble_auc_ci"]), f"{mean:.3f} ± {sd:.3f}",
                     _ci(vs["auc_difference_ci"]) if vs else "—", f"{vs['delong_p']:.3g}" if vs else "—",
                     ("yes" if vs["significant"] else "no") if vs else "—"])
    report.table(header, rows)
    names = list(config.data.labels)
    report.table(["arm"] + [f"{c} (mean ± sd)" for c in names],
                 [[arm] + [f"{row['per_class_mean_sd'][c][0]:.3f} ± {row['per_class_mean_sd'][c][1]:.3f}" for c in names]
                  for arm, row in compare["arms"].items()])
    report.figure(compare["figures"]["auc_ci"], f"{target} AUC per arm with patient-level bootstrap 95% CI")
    report.figure(compare["figures"]["roc"], f"{target} ROC curves per arm (seed-ensemble scores)")
    for arm, path in compare["figures"]["confusion"].items():
        source = compare["arms"][arm]["threshold_source"]
        report.figure(path, f"Confusion matrix, {arm} (threshold {compare['arms'][arm]['threshold']:.3f} from {source})")

    report.h(2, "Synthetic images and the filters")
    report.figure(priv["figures"]["grid"], "Real training images of the target class (top row) and synthetic ones")
    report.p(f"{filt['generated']} images generated, **{filt['accepted']} accepted** by all four filters. "
             "Each criterion on its own:")
    report.table(["filter", "passed", "rejected", "threshold"],
                 [[name, c["passed"], c["rejected"], _threshold_text(name, filt["thresholds"], target)]
                  for name, c in filt["criteria"].items()])
    for name, path in filt["reject_examples"].items():
        report.figure(path, f"Examples rejected by the {name} filter")

    report.blocks += privacy_report.report_section(priv, filt, config)

    report.h(2, "Phases, timings and configuration")
    seconds = phase_seconds(context.workdir)
    report.table(["phase", "wall time (s)"], [[p, f"{s:.1f}"] for p, s in seconds.items()] +
                 [["total (phases 1–8)", f"{sum(seconds.values()):.1f}"]])
    report.p(f"Devices: {jax.device_count()} × {jax.devices()[0].platform}.")
    report.h(2, "Limitations")
    report.bullets(_limitations(config, compare))
    report.h(3, "Configuration")
    report.code(json.dumps(config.to_dict(), indent=1, default=str))

    md_path, html_path = context.workdir / "report.md", context.workdir / "report.html"
    if jax.process_index() == 0:
        md_path.write_text(report.markdown())
        html_path.write_text(report.html(f"xray-dit study: {target}"))
    return {"markdown": str(md_path), "html": str(html_path)}


def _threshold_text(name: str, thresholds: dict, target: str) -> str:
    return {"label fidelity": f"p({target}) ≥ {thresholds['fidelity_probability']:.2f}",
            "realism": f"k-NN cosine distance ≤ {thresholds['realism_knn']:.4f}",
            "privacy": f"pixel > {thresholds['privacy_pixel']:.4f} and feature > {thresholds['privacy_feature']:.4f}",
            "duplicates": f"pixel correlation ≤ {thresholds['duplicate_correlation']:.2f}"}[name]


def _limitations(config, compare) -> list[str]:
    items = [
        f"One dataset ({config.data.name}) and one split; {len(config.study.seeds)} classifier seeds per arm — "
        "seed-to-seed spread is reported but a few seeds estimate it poorly.",
        f"The test set holds {compare['test_positives']} {config.data.target_class} positives; the confidence "
        "intervals reflect that and a small difference cannot be detected.",
        "DeLong's test treats test images as independent; with several images per patient the patient-level "
        "bootstrap interval of the difference is the more honest one, and both are shown.",
        "Synthetic images carry only the generated label; other findings in them count as negative.",
        "Synthetic images pass through the VAE decoder and are smoother than real images; a classifier can tell "
        "the two apart, so part of any effect may come from this domain gap rather than from the anatomy.",
        "Privacy is judged by nearest-neighbour distances in pixel and classifier-feature space; a memorised "
        "patient could be disguised in ways these distances miss.",
    ]
    if config.data.name == "cxr_phantom":
        items.insert(0, "The data are procedural phantoms, not radiographs: the result shows the pipeline works "
                        "and how the statistics read, not that DiT augmentation helps on real X-rays.")
    return items
