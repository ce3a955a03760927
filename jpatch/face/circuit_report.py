"""`jpatch circuit`: an IOI-style circuit analysis written as a Markdown report.

Path patching (noising, logit difference) from every head to the logits (name movers), to the
top heads' queries (S-inhibition) and to those heads' values (induction / duplicate-token heads),
as in Wang et al. 2022; ACDC (KL); EAP and EAP-IG edge scores; the faithfulness of ACDC's
circuit and of EAP's and EAP-IG's top edges at the same size, the overlap (precision / recall)
of those top edges with ACDC's circuit, and wall times.
"""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from jpatch.files import atomic

KIND = "circuit"


def add_arguments(parser):
    parser.add_argument("--model", default="toy", help="a folder or a name under weights/ (default: toy)")
    parser.add_argument("--task", default="ioi", help="ioi | factual | greater-than | a .jsonl file")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threshold", type=float, default=0.01, help="ACDC's threshold on the KL increase")
    parser.add_argument("--top", type=int, default=3, help="heads carried to the next path-patching round")
    parser.add_argument("--ig-steps", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    from jpatch.face.view_cli import add_html_flag

    add_html_flag(parser)


MIN_EFFECT = 1e-3  # a head whose path-patched value moves less than this from 1 is not carried on


def _top_heads(values, k, exclude=(), min_effect=0.0):
    """Up to k heads whose path-patched value is furthest from the unpatched 1, as (layer, head)."""
    effect = np.abs(1.0 - np.nan_to_num(np.asarray(values), nan=1.0))
    for l, h in exclude:
        effect[l, h] = -1
    order = np.argsort(-effect.ravel(), kind="stable")[:k]
    return [tuple(int(i) for i in np.unravel_index(o, effect.shape)) for o in order if effect.ravel()[o] > min_effect]


def _head_table(values, k=8):
    if values is None:
        return ["Skipped: no head of the previous round moved the metric by more than "
                f"{MIN_EFFECT:g}."]
    lines = ["| head | value | effect (1 - value) |", "| --- | --- | --- |"]
    for l, h in _top_heads(values, k):
        lines.append(f"| {l}.{h} | {values[l, h]:+.3f} | {1 - values[l, h]:+.3f} |")
    return lines


def _top_edges(edges, k):
    """Mask of the k valid edges with the largest |score|."""
    flat = np.where(edges.valid, np.abs(edges.totals()), -np.inf).ravel()
    mask = np.zeros(flat.shape, bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(edges.valid.shape) & edges.valid


def analyse(model, clean, corrupted, metric, *, threshold=0.01, top=3, ig_steps=5):
    """Every figure of the report as a dict (and the ACDC `Circuit` under "circuit")."""
    from jpatch.methods import circuits
    from jpatch.methods.edges import edge_attribution

    times, out = {}, {}

    def timed(name, fn):
        t = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - t
        return result

    to_logits = timed("path patching: heads -> logits",
                      lambda: circuits.path_patch(model, clean, corrupted, "heads", "logits", metric))
    # Each round's receivers are the previous round's heads that matter (none: the round is skipped).
    movers = _top_heads(to_logits, top, min_effect=MIN_EFFECT)
    to_queries = None if not movers else timed("path patching: heads -> name movers' queries", lambda: (
        circuits.path_patch(model, clean, corrupted, "heads", [f"a{l}.h{h}<q>" for l, h in movers], metric)))
    inhibitors = [] if to_queries is None else _top_heads(to_queries, top, movers, MIN_EFFECT)
    to_values = None if not inhibitors else timed("path patching: heads -> S-inhibition values", lambda: (
        circuits.path_patch(model, clean, corrupted, "heads", [f"a{l}.h{h}<v>" for l, h in inhibitors], metric)))
    duplicates = [] if to_values is None else _top_heads(to_values, top, movers + inhibitors, MIN_EFFECT)
    out.update(to_logits=to_logits, to_queries=to_queries, to_values=to_values, movers=movers,
               inhibitors=inhibitors, duplicates=duplicates)

    circuit = timed("ACDC", lambda: circuits.acdc(model, clean, corrupted, threshold=threshold))
    eap = timed("EAP", lambda: edge_attribution(model, clean, corrupted, metric, direction="noise"))
    eap_ig = timed(f"EAP-IG ({ig_steps} steps)", lambda: edge_attribution(
        model, clean, corrupted, metric, method="eap-ig-inputs", steps=ig_steps, direction="noise"))
    size = int(circuit.keep.sum())
    masks = {"ACDC": circuit.keep}
    if size:
        masks.update({"EAP top edges": _top_edges(eap, size), "EAP-IG top edges": _top_edges(eap_ig, size)})
    faith = {name: timed(f"faithfulness: {name}", lambda m=m: circuits.faithfulness(
        model, clean, corrupted, m, metric)) for name, m in masks.items()}
    overlap = {}
    for name in ("EAP top edges", "EAP-IG top edges"):
        if name in masks:
            hit = int((masks[name] & circuit.keep).sum())
            overlap[name] = {"precision": hit / max(int(masks[name].sum()), 1), "recall": hit / size}
    out.update(circuit=circuit, faithfulness=faith, overlap=overlap, times=times)
    return out


def write_report(path, figures, header):
    fmt = lambda heads: ", ".join(f"{l}.{h}" for l, h in heads) or "none"
    lines = [f"# Circuit report: {header}", "",
             "Path patching is exact (Wang et al.'s two passes), noising: each sender head's corrupted output "
             "reaches only the receivers, every other head frozen clean, MLPs recomputed. Values are the "
             "normalized logit difference (1 = clean, 0 = corrupted); a head matters where it is far from 1.", "",
             "## Path patching: heads -> logits (name movers)", "", *_head_table(figures["to_logits"]), "",
             f"Carried on (up to {len(figures['movers'])}, effect > {MIN_EFFECT:g}): {fmt(figures['movers'])}.", "",
             "## Path patching: heads -> those heads' queries (S-inhibition)", "", *_head_table(figures["to_queries"]),
             "", f"Carried on (name movers excluded): {fmt(figures['inhibitors'])}.", "",
             "## Path patching: heads -> the S-inhibition heads' values (induction / duplicate-token)", "",
             *_head_table(figures["to_values"]), "",
             f"Found (earlier classes excluded): {fmt(figures['duplicates'])}.", ""]
    circuit = figures["circuit"]
    lines += ["## ACDC", "", f"Threshold {circuit.threshold:g} on KL(clean || patched): "
              f"{int(circuit.keep.sum())} of {int(circuit.valid.sum())} edges kept; {circuit.n_tested} sequential "
              f"forwards replaced by {circuit.n_forwards} batched ones in {circuit.n_calls} compiled calls.", "",
              "![ACDC circuit](circuit.png)", "", "Edges in `circuit.json`.", "",
              "## Faithfulness at matched size", "",
              "Every edge outside the circuit takes the corrupted run's value; faithfulness = (circuit - empty) / "
              "(full - empty) of the mean logit difference.", "",
              "| circuit | edges | faithfulness | logit diff (circuit) | full | empty |", "| --- | --- | --- | --- | --- | --- |"]
    for name, f in figures["faithfulness"].items():
        lines.append(f"| {name} | {f.n_edges} | {f.faithfulness:.3f} | {f.circuit:+.3f} | {f.full:+.3f} | "
                     f"{f.empty:+.3f} |")
    lines += ["", "## Overlap with ACDC's circuit", "", "| edges | precision | recall |", "| --- | --- | --- |"]
    for name, o in figures["overlap"].items():
        lines.append(f"| {name} | {o['precision']:.2f} | {o['recall']:.2f} |")
    lines += ["", "## Wall times", "", "| step | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {s:.2f} |" for name, s in figures["times"].items()]
    Path(path).write_text("\n".join(lines) + "\n")


def _ioi_one_length(n_prompts, seed, model):
    """IOI prompts (held-out names and templates) of one token length: the length most held-out
    templates share (ties: the shorter); the names still sit at different positions. In the
    model's tokenizer (`jpatch.face.cli.task_text`)."""
    from jpatch.data.tasks import ioi
    from jpatch.face import cli

    tokenizer, bos = cli.task_text(model)
    lengths = ioi.template_lengths("test", bos, tokenizer)
    length = min(lengths, key=lambda n: (-len(lengths[n]), n))
    try:
        return ioi.ioi_task(n_prompts, seed=seed, split="test", length=length, tokenizer=tokenizer, bos=bos)
    except ValueError as e:
        raise cli.Fail(str(e)) from None


def main(args):
    from jpatch.face import cli
    from jpatch.files.atomic import atomic_dir

    cli.check_at_least(1, n_prompts=args.n_prompts, top=args.top, ig_steps=args.ig_steps)
    cli.check_finite(0, threshold=args.threshold)  # ACDC's threshold on a KL increase
    cli.check_out(args.out, args.overwrite, KIND)
    model = cli.load_model(args.model)
    # Circuits need prompts of one length: for IOI, the held-out templates of the most common length.
    task = _ioi_one_length(args.n_prompts, args.seed, model) if args.task == "ioi" else cli.load_task(
        args.task, args.n_prompts, args.seed, model)
    if task.attention_mask is not None:
        raise cli.Fail(f"jpatch circuit: the {args.task} prompts have different lengths; circuits need prompts "
                       "of one length (choose --n-prompts or a task of equal-length prompts)")
    metric = cli.make_metric(task, "logit-diff")
    figures = analyse(model, task.clean_tokens, task.corrupted_tokens, metric, threshold=args.threshold,
                      top=args.top, ig_steps=args.ig_steps)
    with atomic_dir(Path(args.out), args.overwrite, kind=KIND) as tmp:
        figures["circuit"].to_json(tmp / "circuit.json")
        import matplotlib.pyplot as plt

        plt.close(figures["circuit"].plot(tmp / "circuit.png"))
        write_report(tmp / "report.md", figures, f"{args.model}, {args.task}, {len(task.clean_tokens)} prompts")
        summary = {k: None if figures[k] is None else np.asarray(figures[k]).tolist()
                   for k in ("to_logits", "to_queries", "to_values")}
        summary.update({k: figures[k] for k in ("movers", "inhibitors", "duplicates", "times", "overlap")})
        summary["faithfulness"] = {k: dataclasses.asdict(v) for k, v in figures["faithfulness"].items()}
        (tmp / "figures.json").write_text(json.dumps(atomic.to_json(summary), indent=1))
        if args.html:  # the view of this folder, inside it (listed by its marker)
            from jpatch.face.view_cli import REPORT_HTML, write_view

            write_view(tmp, tmp / REPORT_HTML, title=f"jpatch circuit: {args.model}, {args.task}",
                       name=Path(args.out).name)
    print(f"wrote {Path(args.out) / 'report.md'}")
