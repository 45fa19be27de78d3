"""Train one of the two demo models with mmdet's / mmseg's own Runner.

    python tools/train_demo.py det            # Mask R-CNN, full schedule
    python tools/train_demo.py seg            # UperNet, full schedule
    python tools/train_demo.py cls            # timm Swin classifier
    python tools/train_demo.py det --quick    # a few iterations on 8 images

The full run exports the weights (fp16, weights only) to
``dfq_dense/demo/checkpoints/<name>.pth``, evaluates them in full precision
through Runner.test (the classifier: through its own weights loading, as
tools/dfq_test.py loads it) and records sha256, command and metrics in
``dfq_dense/demo/checkpoints/manifest.json``.
"""
import argparse
import json
import os
import os.path as osp
import shlex
import sys
import tempfile
import time

import torch
from mmengine.config import DictAction

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('task', choices=['det', 'seg', 'cls'])
    parser.add_argument('--iters', type=int, help='override max_iters')
    parser.add_argument('--work-dir', help='training work dir')
    parser.add_argument('--quick', action='store_true',
                        help='3 iterations on a tiny generated dataset; '
                        'exports into the work dir only')
    parser.add_argument('--out', help='exported checkpoint path')
    parser.add_argument('--lr', type=float, help='override the base lr')
    parser.add_argument(
        '--skip-train', action='store_true',
        help='reuse the work dir\'s iter_N.pth of a finished run: only '
        'export, evaluate and record it')
    parser.add_argument(
        '--load-from', help='start from the weights of an earlier run\'s '
        'iter_N.pth (a second training stage; fresh optimizer and schedule)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings (key=value)')
    return parser.parse_args()


def export_weights(src, dst, meta, prefix=None):
    """Weights-only fp16 copy of an mmengine checkpoint, written atomically.

    ``prefix`` (``'backbone.'`` for the classifier): keep only the keys under
    it, without it, i.e. the timm model's own state dict, which
    ``TimmClassifier`` loads like any timm weights file.
    """
    from dfq_dense.utils.checkpoint import safe_torch_load
    state = safe_torch_load(src)['state_dict']
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items()
                 if k.startswith(prefix)}
    state = {k: v.half() if v.is_floating_point() else v
             for k, v in state.items()}
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=osp.dirname(osp.abspath(dst)),
                               suffix='.tmp')
    os.close(fd)
    try:
        torch.save(dict(state_dict=state, meta=meta), tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


def main():
    args = parse_args()
    sys.path.insert(0, ROOT)
    from mmengine.runner import Runner

    from dfq_dense.demo import (DEMO_MODELS, MANIFEST, demo_checkpoint,
                                ensure_demo_data, load_manifest,
                                set_demo_data_root, sha256sum)
    from dfq_dense.engine.runner import build_test_runner, load_config
    from dfq_dense.utils.fileio import write_json_atomic

    name = next(n for n, (t, _) in DEMO_MODELS.items() if t == args.task)
    config = osp.join(ROOT, DEMO_MODELS[name][1])
    cfg = load_config(config, args.cfg_options)
    cfg.work_dir = args.work_dir or osp.join(ROOT, 'work_dirs', 'train_' + name)
    cfg.randomness = dict(seed=0)
    if args.task == 'cls':
        # Trained from timm's own init; the weights file is what this
        # script writes.
        cfg.model.pretrained = False
        cfg.model.checkpoint = None
    iters = args.iters
    if args.quick:
        iters = iters or 3
        # The classifier's val folder needs every class: the first 8 val
        # scenes hold all eight (the scenes are a function of the seed).
        set_demo_data_root(cfg, osp.join(cfg.work_dir, 'data'),
                           splits=dict(train=8,
                                       val=8 if args.task == 'cls' else 4))
        cfg.default_hooks.logger.interval = 1
    if iters:
        cfg.train_cfg.max_iters = iters
        cfg.train_cfg.val_interval = iters + 1
        cfg.default_hooks.checkpoint.interval = iters
        warmup, main_sched = cfg.param_scheduler
        warmup.end = min(warmup.end, max(1, iters // 10))
        main_sched.begin = warmup.end
        main_sched.end = iters
    if args.lr:
        cfg.optim_wrapper.optimizer.lr = args.lr
    command = 'python tools/train_demo.py ' + ' '.join(
        shlex.quote(a) for a in sys.argv[1:] if a != '--skip-train')
    if args.load_from:
        cfg.load_from = args.load_from
        # Record the whole recipe: the stage this one starts from, then this.
        prev = osp.join(osp.dirname(args.load_from), 'train_command.txt')
        if osp.isfile(prev):
            with open(prev) as f:
                command = f.read().strip() + ' && ' + command
    ensure_demo_data(cfg)
    train_s = None
    if not args.skip_train:
        os.makedirs(cfg.work_dir, exist_ok=True)
        with open(osp.join(cfg.work_dir, 'train_command.txt'), 'w') as f:
            f.write(command + '\n')
        start = time.time()
        runner = Runner.from_cfg(cfg)
        runner.train()
        train_s = round(time.time() - start)
    last = osp.join(cfg.work_dir, f'iter_{cfg.train_cfg.max_iters}.pth')

    out = args.out or (osp.join(cfg.work_dir, f'{name}.pth') if args.quick
                       else demo_checkpoint(name))
    export_weights(last, out, meta=dict(
        config=DEMO_MODELS[name][1], iters=cfg.train_cfg.max_iters,
        command=command), prefix='backbone.' if args.task == 'cls' else None)

    test_runner = build_test_runner(cfg, checkpoint=out,
                                    work_dir=osp.join(cfg.work_dir, 'fp_test'))
    metrics = test_runner.test()
    metrics = {k: float(v) for k, v in metrics.items()}
    print(json.dumps(dict(checkpoint=out, metrics=metrics), indent=2))
    if not args.quick and args.out is None:
        manifest = load_manifest()
        manifest[name] = dict(
            config=DEMO_MODELS[name][1], checkpoint=osp.relpath(out, ROOT),
            sha256=sha256sum(out), command=command,
            iters=cfg.train_cfg.max_iters, train_seconds=train_s,
            torch=torch.__version__, fp_metrics=metrics)
        write_json_atomic(MANIFEST, manifest, sort_keys=True)


if __name__ == '__main__':
    main()
