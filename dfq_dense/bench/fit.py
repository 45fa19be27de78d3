"""Section ``fit``: the methods at their configured batch at 800x1333.

One row per method x backbone: one iteration of the package's own
synthesis at the batch size of the method's config fragment
(``configs/_base_/methods/``: PSAQ-ViT, V2 and SPDFQ 8 images, MimiQ 16)
with the memory options that the fragment's comment gives for 16 GB
(:data:`FIT_OPTIONS`: ``with_cp=True`` and a ``micro_batch_size``), its
wall time split by the synthesis loop's own phases (augment, forward,
loss, backward, step: ``PixelSynthesizer.phase_timer``) and its peak
memory, measured as in the ``synthesis`` section (a fresh process per row
on the CPU; the allocator's peak on CUDA).  PSAQ-ViT V2's row is the sample
step of its adapter (``PSAQViTV2Rounds``, one iteration on a batch, with
the fake-quantized student, which is what needs the memory); its time
includes the adapter's no-grad selection and discrepancy passes over the
batch, reported apart (``other``).

Where the ``synthesis`` section times the iteration of a whole batch in one
forward, split into each loss with its own backward, this section runs the
code a user runs, with the options a 16 GB machine needs: it shows that
the configured batch fits and what it costs.  With ``micro_batch_size=m``
the iteration is ``batch / m`` forwards and backwards of ``m`` images each,
so each loss's share of it is the share measured at batch ``m``.

    OMP_NUM_THREADS=2 python tools/benchmark.py fit \\
        --out results/benchmarks/fit.json
"""
import gc
import time

import torch

from .common import IsolatedError, run_isolated, trim_heap
from .synthesis import (BACKBONES, GB, METHODS, WARM_SIZE, _backbone,
                        _memory_now, _peak, _reset_peak, parse_size)

NAME = 'fit'
HELP = ('one iteration of each method at its configured batch at 800x1333 '
        'with the memory options for 16 GB: time by phase and peak memory')
DEFAULT_OUT = 'fit.json'

#: What the fragments' comments give for 800x1333 in 16 GB: the options of
#: the object that runs the iteration (V2: its adapter's sample step).
FIT_OPTIONS = {
    'psaq_vit': dict(with_cp=True, micro_batch_size=4),
    'psaq_vit_v2': dict(with_cp=True, micro_batch_size=2),
    'mimiq': dict(with_cp=True, micro_batch_size=4),
    'spdfq': dict(with_cp=True, micro_batch_size=4),
}
#: Every method at the configured batch in under this (the target).
TARGET = dict(size=[800, 1333], max_bytes=16 * GB)
PHASES = ('augment', 'forward', 'loss', 'backward', 'step', 'other')


def add_arguments(p):
    p.add_argument('--methods', nargs='+', choices=list(METHODS),
                   default=None, help='default: all')
    p.add_argument('--backbones', nargs='+', default=None,
                   help=f'{", ".join(BACKBONES)} or a config path '
                   '(default: swin_s)')
    p.add_argument('--size', default='800x1333', help='HxW')
    p.add_argument('--isolate', choices=('auto', 'process', 'none'),
                   default='auto', help='a fresh process per row (auto: on '
                   'the CPU, where the peak RSS needs it)')
    p.add_argument('--seed', type=int, default=0)


def _fragment(method):
    """The method fragment's object that runs the iteration, as a config
    dict (V2: its adapter)."""
    import os.path as osp

    from mmengine.config import Config

    from .common import REPO
    from .synthesis_methods import ADAPTER_METHODS, METHOD_CONFIGS
    cfg = Config.fromfile(osp.join(REPO, METHOD_CONFIGS[method]))
    key = 'dfq_adapter' if method in ADAPTER_METHODS else 'dfq_synthesizer'
    return cfg.to_dict()[key]


class _PhaseTimer:
    """``PixelSynthesizer.phase_timer``: seconds and calls per phase."""

    def __init__(self):
        self.times, self.calls = {}, {}

    def __call__(self, name):
        import contextlib

        @contextlib.contextmanager
        def timed():
            t = time.perf_counter()
            try:
                yield
            finally:
                self.times[name] = self.times.get(name, 0.) + \
                    time.perf_counter() - t
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed()


def _iteration(method, frag, parts, batch, hw, device, seed):
    """Build the method's object from ``frag`` and run one iteration on a
    batch of ``batch`` images of ``hw``; returns the phase timer."""
    from ..registry import ADAPTERS, MODELS, build
    timer = _PhaseTimer()
    g = torch.Generator().manual_seed(seed)
    if method == 'psaq_vit_v2':
        adapter = build(ADAPTERS, dict(frag, batch_size=batch,
                                       sample_iters=1, progress=False))
        teacher, student = torch.nn.Module(), torch.nn.Module()
        teacher.backbone, student.backbone = parts['backbone'], \
            parts['student']
        inner = adapter._sample_iter

        def sample_iter(*args, **kwargs):  # the iteration, apart
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                timer.times['iteration'] = time.perf_counter() - t
        adapter._sample_iter = sample_iter
        adapter.mean, adapter.std = parts['mean'].cpu(), parts['std'].cpu()
        pool = torch.randn((batch, 3) + tuple(hw), generator=g)
        t = time.perf_counter()
        adapter.sample_step(teacher, student, pool, 0, g)
        total = time.perf_counter() - t
        timer.times['other'] = total - timer.times['iteration']
        return timer
    synth = build(MODELS, dict(frag, num_images=batch, batch_size=batch,
                               iterations=1, progress=False))
    synth.phase_timer = timer
    synth.mean, synth.std = parts['mean'].cpu(), parts['std'].cpu()
    t = time.perf_counter()
    synth.synthesize_batch(parts['backbone'], batch, tuple(hw), device, g)
    timer.times['iteration'] = time.perf_counter() - t
    return timer


def run_row(spec):
    """One row (``spec``: method, config, size, batch, options, device,
    seed, threads); returns its result."""
    from .synthesis_methods import build_parts
    if spec.get('threads'):
        torch.set_num_threads(int(spec['threads']))
    device = torch.device(spec['device'])
    start = time.perf_counter()
    parts = build_parts(spec['config'], spec['seed'], device,
                        student=spec['method'] == 'psaq_vit_v2')
    frag = dict(_fragment(spec['method']), **spec['options'])
    # one small iteration first (pages in the libraries' code)
    _iteration(spec['method'], frag, parts, 1, WARM_SIZE, device,
               spec['seed'])
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    else:
        trim_heap()
    baseline, _ = _memory_now(device)
    _reset_peak(device)
    timer = _iteration(spec['method'], frag, parts, spec['batch'],
                       spec['size'], device, spec['seed'])
    peak = _peak(device) - baseline
    times = dict(timer.times)
    iteration = times.pop('iteration')
    if 'other' not in times:
        times['other'] = iteration - sum(times.values())
    return dict(status='ok', iteration_s=iteration, phases=times,
                phase_calls=dict(timer.calls), peak_bytes=peak,
                per_image_s=iteration / spec['batch'],
                seconds=time.perf_counter() - start,
                settings={k: v for k, v in frag.items()
                          if isinstance(v, (int, float, str, bool, list,
                                            tuple, type(None)))})


def run(args, device, checkpoint=None):
    dev = 'cuda' if str(device).startswith('cuda') else 'cpu'
    isolate = args.isolate
    if isolate == 'auto':
        isolate = 'none' if dev == 'cuda' else 'process'
    methods = args.methods or list(METHODS)
    backbones = args.backbones or ['swin_s']
    hw = parse_size(args.size)
    start = time.time()
    rows = []

    def result():
        return dict(
            description='one iteration of each method at its configured '
            'batch with the memory options for 16 GB (FIT_OPTIONS): wall '
            'time by phase of the synthesis loop and peak memory; '
            'iteration_s, phases and per_image_s are of the whole call, '
            'which makes phase_calls["step"] steps (PSAQ-ViT: one per '
            'round; per_iteration() divides)',
            size=hw, seed=args.seed, isolation=isolate,
            target=dict(TARGET, max_bytes=int(TARGET['max_bytes'])),
            options={m: FIT_OPTIONS[m] for m in methods}, rows=list(rows),
            complete=len(rows) == len(methods) * len(backbones),
            wall_seconds=time.time() - start)

    for bb in backbones:
        key, name, config = _backbone(bb)
        for m in methods:
            frag = _fragment(m)
            spec = dict(method=m, method_name=METHODS[m], backbone=key,
                        backbone_name=name, config=config, size=hw,
                        batch=int(frag['batch_size']),
                        options=FIT_OPTIONS[m], device=str(device),
                        seed=args.seed, threads=args.threads)
            tag = f'[fit] {spec["method_name"]} {name} batch {spec["batch"]}'
            print(f'{tag} ...', flush=True)
            try:
                res = run_isolated(run_row, spec) if isolate == 'process' \
                    else run_row(spec)
            except IsolatedError as err:
                res = dict(status='error',
                           reason=str(err).splitlines()[0][:300])
            row = dict(spec, **res)
            rows.append(row)
            if res['status'] == 'ok':
                print(f'{tag}: {res["iteration_s"]:.1f} s, peak '
                      f'{res["peak_bytes"] / GB:.1f} GB', flush=True)
            else:
                print(f'{tag}: {res["reason"]}', flush=True)
            if checkpoint is not None:
                checkpoint(result())
    return result()


def per_iteration(row):
    """``(seconds, phases)`` of one iteration of a row: a run of the
    synthesizer with ``iterations=1`` makes one step per round (PSAQ-ViT:
    2 rounds), so the measured time is divided by the steps taken (V2's
    sample step: one)."""
    steps = max(1, int((row.get('phase_calls') or {}).get('step', 1)))
    return row['iteration_s'] / steps, {
        k: v / steps for k, v in row['phases'].items()}


def markdown(result):
    from .common import describe_environment, markdown_table
    env = result.get('environment')
    head = describe_environment(env) + '; ' if env else ''
    lines = [f'{head}one iteration per row (PSAQ-ViT: one per round, '
             'the mean of its two shown), a fresh process per row '
             f'(isolation: {result["isolation"]}); the run took '
             f'{result["wall_seconds"] / 60:.0f} min.', '']
    table = []
    limit = result['target']['max_bytes']
    for r in result['rows']:
        opts = ', '.join(f'{k}={v}' for k, v in r['options'].items())
        if r['status'] != 'ok':
            table.append([r['method_name'], r['backbone_name'],
                          str(r['batch']), opts, r['reason']] +
                         ['-'] * (len(PHASES) + 3))
            continue
        it, ph = per_iteration(r)
        table.append(
            [r['method_name'], r['backbone_name'], str(r['batch']), opts,
             f'{it:.1f}'] +
            [f'{ph[p]:.1f}' if p in ph else '-' for p in PHASES] +
            [f'{it / r["batch"]:.2f}', f'{r["peak_bytes"] / GB:.1f}',
             'yes' if r['peak_bytes'] <= limit else 'no'])
    lines.append(markdown_table(
        ['method', 'backbone', 'batch', 'options', 'iteration s'] +
        [f'{p} s' for p in PHASES] +
        ['s / image', 'peak GB', f'<= {limit / GB:.0f} GB'], table))
    return '\n'.join(lines)
