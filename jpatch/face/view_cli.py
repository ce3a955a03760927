"""`jpatch view DIR --out report.html`: every saved result in a folder as one self-contained HTML file
(no network: script, style and data inlined), and the `--html` option of demo, sweep, paper, circuit
and bulk, which writes the same view as report.html into their output folder.

The file is written whole or not at all (`jpatch.files.atomic.atomic_write`). It may replace only
a view jpatch wrote (its generator tag), and never goes inside the folder it shows: a jpatch output
folder holds only the files its marker lists.
"""

from pathlib import Path

from jpatch.face import view
from jpatch.files import atomic, html_view, safety

REPORT_HTML = "report.html"  # --html's file in an output folder
ATTENTION_PROMPTS = 8


def add_arguments(parser):
    parser.add_argument("folder", help="a folder of jpatch results (searched recursively)")
    parser.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier view written by jpatch")
    parser.add_argument("--attention-prompts", type=int, default=ATTENTION_PROMPTS,
                        help="attention patterns of this many prompts (0: none; needs the model)")


def add_html_flag(parser):
    parser.add_argument("--html", action="store_true",
                        help=f"also write {REPORT_HTML}: an interactive view of the results (see `jpatch view`)")


def check_out(out, folder, overwrite):
    """Refuse an --out that is not a new .html file (or, with overwrite, an earlier jpatch view),
    that lies inside the results folder, or that cannot be written."""
    out, folder = Path(out).expanduser(), Path(folder).expanduser()
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"--out {out}: name an .html file")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise FileExistsError(f"--out {out} is a link or not a file; name a new .html file")
    if folder.resolve() in out.resolve().parents:
        raise FileExistsError(f"--out {out} is inside {folder}, whose files jpatch keeps as written; "
                              "write it elsewhere")
    if out.exists():
        if not html_view.is_view_file(out):
            raise FileExistsError(f"{out} exists and is not a view jpatch wrote; choose another name")
        if not overwrite:
            raise FileExistsError(f"{out} holds an earlier jpatch view; pass --overwrite to replace it")
    safety.check_writable(out.parent, "the HTML file's folder")
    return out


def write_view(folder, out, *, title=None, attention_prompts=ATTENTION_PROMPTS, name=None):
    """Render every result under `folder` into the HTML file `out` (atomically); returns its size in
    bytes. name: the folder's label (its final name, for an output folder still being built)."""
    panels = view.folder_view(folder, attention_prompts=attention_prompts, name=name)
    text = html_view.page(panels, title or f"jpatch results: {Path(folder).resolve().name}").encode()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write(out, lambda f: f.write(text))
    return len(text)


def html_extra(args, title):
    """write_sweeps' `extra` for --html: the view of the output folder being built, inside it."""
    if not getattr(args, "html", False):
        return None
    return lambda folder: write_view(folder, Path(folder) / REPORT_HTML, title=title, name=Path(args.out).name)


def one_line(error):
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(args):
    from jpatch.face.cli import Fail, check_at_least

    check_at_least(0, attention_prompts=args.attention_prompts)
    try:
        out = check_out(args.out, args.folder, args.overwrite)
        size = write_view(args.folder, out, attention_prompts=args.attention_prompts)
    except (ValueError, OSError) as e:
        raise Fail(f"jpatch view: {one_line(e)}") from None
    print(f"wrote {out} ({size / 1e6:.2f} MB)")
    return 0
