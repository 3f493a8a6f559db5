"""Reports as documents: content built once as a list of blocks (heading, paragraph, list,
table, figure) and rendered twice, as Markdown (PNGs beside it) and as HTML with every image
inlined as a base64 data URI, so the HTML file opens in a browser offline and can be mailed
on its own. Used by the comparison report and the depth-analysis report."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "p" | "ul" | "table" | "fig"
    text: str = ""
    items: list | None = None  # ul: strings; table: rows
    header: list | None = None
    path: Path | None = None


def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|")


def render_markdown(blocks: list[Block], out_dir: Path) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}")
        elif b.kind == "h2":
            out.append(f"## {b.text}")
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "ul":
            out.append("\n".join(f"- {i}" for i in b.items))
        elif b.kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "|".join("---" if i == 0 else "---:" for i in range(len(b.header))) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in b.items]
            out.append("\n".join(lines))
        elif b.kind == "fig":
            rel = b.path.relative_to(out_dir) if b.path.is_relative_to(out_dir) else b.path
            out.append(f"![{rel.stem}]({rel.as_posix()})\n\n*{b.text}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem; margin: 2rem auto;
       padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #555; }
"""


def render_html(blocks: list[Block]) -> str:
    e = html.escape
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{e(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.items)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "fig":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.text)}</figcaption></figure>")
    title = next((b.text for b in blocks if b.kind == "h1"), "report")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def write_document(blocks: list[Block], out_dir: Path, stem: str = "report") -> tuple[Path, Path]:
    """Write OUT_DIR/STEM.md and the self-contained OUT_DIR/STEM.html; returns both paths."""
    md, page = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    md.write_text(render_markdown(blocks, out_dir), encoding="utf-8")
    page.write_text(render_html(blocks), encoding="utf-8")
    return md, page
