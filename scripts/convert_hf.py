#!/usr/bin/env python
"""Convert Hugging Face GPT-2 weights into a jpatch model folder.

    python scripts/convert_hf.py gpt2 weights/gpt2
    python scripts/convert_hf.py ./my-hf-checkpoint weights/mine --dtype bfloat16 --overwrite

SRC is a folder with config.json and model.safetensors / pytorch_model.bin /
flax_model.msgpack, or a Hugging Face Hub id (downloaded when online).
Load the result with `jpatch.model.checkpoint.load("weights/gpt2")` (or `load("gpt2")`).
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Hugging Face checkpoint folder or Hub id (e.g. gpt2, gpt2-xl, distilgpt2)")
    parser.add_argument("out", help="output folder (config.json + orbax checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored dtype")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)

    from jpatch.model.convert import convert_hf

    try:
        out = convert_hf(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (OSError, ValueError, KeyError, ImportError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # KeyError's str() adds quotes
        print(f"convert_hf: error: {message}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
