"""A report as a list of blocks (headings, paragraphs, lists, tables, figures, code), rendered to markdown
and to a self-contained HTML page (figures embedded), so the two never disagree.
"""

from __future__ import annotations

import base64
import html
import os

import numpy as np
from etils import epath


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


def ci_text(values, signed: bool = False) -> str:
    """(estimate, lower, upper) as "0.812 [0.780, 0.840]" ("+0.012 [-0.010, +0.034]" when signed); n/a for NaN."""
    estimate, lower, upper = (float(v) for v in values)
    if not np.isfinite(estimate):
        return "n/a"
    f = "+.3f" if signed else ".3f"
    bounds = f"[{lower:{f}}, {upper:{f}}]" if np.isfinite(lower) and np.isfinite(upper) else "[n/a]"
    return f"{estimate:{f}} {bounds}"
