"""Convert an official Swin detection / segmentation checkpoint to mmdet 3 /
mmseg 1 keys.

    python tools/convert_checkpoint.py OFFICIAL.pth OUT.pth \
        [--model cascade_mask_rcnn_swin_s] [--check CONFIG] [--force]

OFFICIAL.pth: a checkpoint of SwinTransformer/Swin-Transformer-Object-
Detection (Mask R-CNN Swin-T/S, Cascade Mask R-CNN Swin-T/S/B; mmdet 2.11
layout) or of SwinTransformer/Swin-Transformer-Semantic-Segmentation
(UperNet Swin-T/S/B; mmseg 0.x layout).  OUT.pth is written atomically as
``{'state_dict': ..., 'meta': {...}}``; its sha256 is printed and written to
``OUT.pth.sha256``.  ``--model`` refuses a checkpoint of another model;
``--check CONFIG`` then loads OUT.pth strictly into the config's model.
Errors: one line on stderr, exit code 2.  The key map is documented in
dfq_dense/zoo/convert.py.
"""
import argparse
import os.path as osp
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PROG = 'convert_checkpoint'


def parse_args(argv=None):
    from dfq_dense.zoo.convert import KNOWN_MODELS
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Convert an official Swin detection / segmentation '
        'checkpoint to the mmdet 3 / mmseg 1 layout')
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='converted checkpoint to write (.pth)')
    parser.add_argument('--model', choices=list(KNOWN_MODELS),
                        help='refuse a checkpoint of any other model')
    parser.add_argument('--check', metavar='CONFIG',
                        help='load the result strictly into the model of '
                        'this config')
    parser.add_argument('--force', action='store_true',
                        help='overwrite an existing DST (never SRC)')
    return parser.parse_args(argv)


def run(args):
    from dfq_dense.zoo.convert import check_against_config, convert_file
    result = convert_file(args.src, args.dst, model=args.model,
                          force=args.force)
    name = result['model'] or f'{result["arch"]} (unnamed size)'
    print(f'{name}: {args.src} -> {args.dst} '
          f'({result["target_layout"]})')
    print(f'sha256 {result["sha256"]}  (written to {args.dst}.sha256)')
    if args.check:
        model = check_against_config(args.dst, args.check)
        print(f'strict load into the {model} of {args.check}: ok')
    return result


def main(argv=None):
    import warnings
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated',
                            category=UserWarning)
    args = parse_args(argv)
    from dfq_dense.engine.dfq_config import DFQConfigError
    from dfq_dense.engine.runner import DFQInputError
    from dfq_dense.utils.checkpoint import (CheckpointMismatchError,
                                            CheckpointReadError,
                                            UnsafeCheckpointError)
    from dfq_dense.zoo.convert import ConversionError
    known = (ConversionError, CheckpointReadError, CheckpointMismatchError,
             UnsafeCheckpointError, DFQInputError, DFQConfigError, OSError)
    try:
        run(args)
    except known as err:
        line = ' '.join(str(err).split()) or type(err).__name__
        if isinstance(err, ConversionError):
            line = f'{args.src}: {line}'
        print(f'{PROG}: error: {line}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
