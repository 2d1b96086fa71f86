"""Convert VideoCrafter2's official checkpoint (AILab-CVC/VideoCrafter's model.ckpt) into diffusers'
and transformers' folder layout, once: the videocrafter2 backend then loads it with from_pretrained
(and converts on first use when this was not run). A finished output folder is left as it is.

    python convert_videocrafter2.py --checkpoint VideoCrafter/VideoCrafter2 --output_dir weights/videocrafter2
    python convert_videocrafter2.py --checkpoint /path/to/model.ckpt --output_dir weights/videocrafter2

The checkpoint is read with torch.load(weights_only=True): a file that needs unpickling is refused.
"""

import argparse

import common
import stage
from backends import videocrafter2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="VideoCrafter/VideoCrafter2", help="hub repo id holding model.ckpt, or its path")
    p.add_argument("--output_dir", default="weights/videocrafter2")
    p.add_argument("--tokenizer", default=videocrafter2.TOKENIZER,
                   help="a CLIP BPE tokenizer (hub id or folder) with OpenCLIP's vocabulary")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--revision", default=None)
    args = p.parse_args(argv)
    args.build_tiny = False
    return args


def main(args):
    stage.check_models(args, videocrafter2.sources(args.checkpoint, args.tokenizer, args.revision, where="--checkpoint"))
    out = videocrafter2.convert(args.checkpoint, args.output_dir, args.tokenizer, cache_dir=args.cache_dir,
                                revision=args.revision)
    print(f"VideoCrafter2 in diffusers' layout: {out}")


if __name__ == "__main__":
    common.run_main(main, parse_args)
