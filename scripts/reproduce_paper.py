#!/usr/bin/env python
"""Rerun Zhang & Nanda (ICLR 2024)'s comparisons on a model and write a Markdown report.

    python scripts/reproduce_paper.py --out results/paper-toy                 # the bundled toy model
    python scripts/reproduce_paper.py --model weights/gpt2 --out results/paper-gpt2 --n-prompts 100

On GPT-2 small / XL converted with scripts/convert_hf.py this is the paper's
reproduction. Writes OUT/report.md, its figures, results.npz and results.json;
refuses a non-empty OUT unless --overwrite.
"""

import argparse
import sys


def main(argv=None):
    from jpatch.face import report as paper
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    paper.add_arguments(parser)
    return paper.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
