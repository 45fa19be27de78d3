"""Section ``synthesis``: where the time of one synthesis iteration goes.

One row per method (PSAQ-ViT, the sample step of PSAQ-ViT V2, MimiQ,
SPDFQ) x backbone (the Swin-T / Swin-S backbones of the suite's configs,
random weights) x image size x batch: the median time of one synthesis
iteration split into the backbone forward (with the method's recorders
attached), each of the method's prior losses (forward and its own backward
to the tensors it reads), the backward to the pixels and the optimizer
step (see :mod:`~dfq_dense.bench.synthesis_methods`), each loss's share of
the iteration, and the peak memory of the iteration.

Measurement.  Per row: one warm-up, then ``--repeats`` rounds of the split
iteration and the plain one (the iteration as the synthesizer composes
it: one ``loss.backward()``), interleaved (the order alternates), each
round with the same random draws for both; reported are the medians, the
share of each term (median over the rounds of term / split iteration) and
the plain iteration beside the split one (what splitting costs).  Peak
memory: on CUDA ``torch.cuda.max_memory_allocated`` during the plain
iterations minus what is allocated once the model is built; on the CPU
every row runs in a fresh process and the peak is the process' peak RSS
during the plain iterations (``VmHWM``, reset before each) minus its RSS
once the model is built.

Rows that would not fit are not run: from a row already measured for the
same method and backbone (the same size with a smaller batch, else another
size scaled by the pixel count; else a one-iteration batch-1 probe), the
memory per image is extrapolated to the row's batch; above the limit
(``--memory-limit-gb``; default on CUDA 90% of the device, on the CPU the
smaller of 80% of the memory available at the start and half the
machine's) the row is reported ``skipped: needs ~N GB``.

Default set: on CUDA every method x Swin-T, Swin-S x 224x224, 512x512,
800x1333 x batch 1, 8, 5 repeats.  On the CPU, the rows of the target:
every method x Swin-T, Swin-S at 800x1333, batch 1 and 8, 3 repeats
after 1 warm-up (batch 8 is skipped for memory on a 24 GB machine: 2-10
GB per image); 12 min on 2 threads of an otherwise idle 2-core AMD EPYC
(a batch-1 row there: 3-17 s per iteration, 8 iterations), several times
that when other jobs load the cores::

    OMP_NUM_THREADS=2 python tools/benchmark.py synthesis \\
        --out results/benchmarks/synthesis.json
    python tools/benchmark.py synthesis --methods psaq_vit mimiq \\
        --backbones swin_t --sizes 512x512 --batches 1 --repeats 5
"""
import gc
import os.path as osp
import statistics
import time

from .common import (REPO, Clock, IsolatedError, available_bytes,
                     describe_environment, markdown_table, peak_rss_bytes,
                     reset_peak_rss, rss_bytes, rss_parts, run_isolated,
                     trim_heap)

NAME = 'synthesis'
HELP = ('one synthesis iteration per method x backbone x size x batch, '
        'split into forward, each prior loss, backward and step')
DEFAULT_OUT = 'synthesis.json'

METHODS = {
    'psaq_vit': 'PSAQ-ViT',
    'psaq_vit_v2': 'PSAQ-ViT V2 sample step',
    'mimiq': 'MimiQ',
    'spdfq': 'SPDFQ',
}
BACKBONES = {
    'swin_t': ('Swin-T', 'configs/mask_rcnn_swin_t_w8a8.py'),
    'swin_s': ('Swin-S', 'configs/mask_rcnn_swin_s_w8a8.py'),
    'upernet_swin_s': ('Swin-S (mmseg)', 'configs/upernet_swin_s_w8a8.py'),
    'demo': ('Swin demo', 'configs/demo/mask_rcnn_swin_demo_w8a8.py'),
}
DEFAULTS = {
    'cpu': dict(methods=list(METHODS), backbones=['swin_t', 'swin_s'],
                sizes=['800x1333'], batches=[1, 8], repeats=3),
    'cuda': dict(methods=list(METHODS), backbones=['swin_t', 'swin_s'],
                 sizes=['224x224', '512x512', '800x1333'], batches=[1, 8],
                 repeats=5),
}
#: Each prior loss at most this share of an iteration at this size.
TARGET = dict(size=[800, 1333], batches=[1, 8], max_loss_share=0.10)

LABELS = {
    'forward': 'forward', 'student_forward': 'student',
    'msr_crop_forward': 'crops', 'backward': 'backward',
    'msr_crop_backward': 'crops', 'step': 'step', 'pse': 'PSE',
    'entropy': 'PSE', 'tv': 'TV', 'head_similarity': 'inter-head SSIM',
    'pseudo_label': 'pseudo-label CE', 'apa': 'APA',
    'soft_label': 'soft-label CE', 'discrepancy': 'discrepancy',
}
GB = 2 ** 30
#: One iteration at this size runs before the memory baseline is taken.
WARM_SIZE = (64, 64)


def add_arguments(p):
    p.add_argument('--methods', nargs='+', choices=list(METHODS),
                   default=None, help='default: all')
    p.add_argument('--backbones', nargs='+', default=None,
                   help=f'{", ".join(BACKBONES)} or a config path '
                   '(default: swin_t swin_s)')
    p.add_argument('--sizes', nargs='+', default=None,
                   help='HxW each (default CPU: 800x1333; CUDA: 224x224 '
                   '512x512 800x1333)')
    p.add_argument('--batches', nargs='+', type=int, default=None,
                   help='default: 1 8')
    p.add_argument('--repeats', type=int, default=None,
                   help='timed rounds per row (default CPU 3, CUDA 5)')
    p.add_argument('--warmup', type=int, default=1,
                   help='untimed rounds per row first')
    p.add_argument('--memory-limit-gb', type=float, default=None,
                   help='skip rows whose extrapolated need is above '
                   '(default: see the module doc)')
    p.add_argument('--isolate', choices=('auto', 'process', 'none'),
                   default='auto', help='a fresh process per row (auto: on '
                   'the CPU, where the peak RSS needs it)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--resume', action='store_true',
                   help='keep the rows already measured in the output file '
                   '(same repeats, warm-up, seed and device); the file is '
                   'written after every row')


def parse_size(text):
    h, w = (int(v) for v in str(text).lower().split('x'))
    return [h, w]


def _backbone(key):
    if key in BACKBONES:
        return key, BACKBONES[key][0], BACKBONES[key][1]
    if osp.isfile(key) or osp.isfile(osp.join(REPO, key)):
        name = osp.splitext(osp.basename(key))[0]
        return name, name, osp.relpath(osp.abspath(
            key if osp.isfile(key) else osp.join(REPO, key)), REPO)
    raise ValueError(f'unknown backbone {key!r}: one of '
                     f'{", ".join(BACKBONES)} or a config file')


def plan(methods, backbones, sizes, batches):
    """Row specs, ordered backbone, method, size (pixels), batch."""
    rows = []
    sizes = sorted((parse_size(s) for s in sizes),
                   key=lambda hw: (hw[0] * hw[1], hw))
    for bb in backbones:
        key, name, config = _backbone(bb)
        for m in methods:
            for hw in sizes:
                for b in sorted(set(int(v) for v in batches)):
                    rows.append(dict(method=m, method_name=METHODS[m],
                                     backbone=key, backbone_name=name,
                                     config=config, size=hw, batch=b))
    return rows


# -------------------------------------------------------------- one row
def _memory_now(device):
    """``(baseline, total)``: on CUDA the bytes allocated (twice); on the
    CPU the anonymous RSS (what the peak is compared with) and the whole
    RSS."""
    import torch
    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)
        used = torch.cuda.memory_allocated(device)
        return used, used
    parts = rss_parts()
    total = rss_bytes()
    return parts.get('anon', total), total


def _reset_peak(device):
    import torch
    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def _peak(device):
    """On CUDA the allocator's peak; on the CPU the peak RSS less its
    file-backed part now (the code of the libraries, which the first
    iterations page in and which is no memory the batch needs)."""
    import torch
    if str(device).startswith('cuda'):
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    parts = rss_parts()
    return peak_rss_bytes() - parts.get('file', 0) - parts.get('shmem', 0)


_PARTS = {}  # in-process runs: the built model of the last config


def _parts(spec, device, cache):
    from .synthesis_methods import build_parts
    key = (spec['config'], spec['seed'], str(device))
    student = spec['method'] == 'psaq_vit_v2'
    if cache and key in _PARTS and (not student or
                                    'student' in _PARTS[key]):
        return _PARTS[key]
    _PARTS.clear()
    gc.collect()
    parts = build_parts(spec['config'], spec['seed'], device, student)
    if cache:
        _PARTS[key] = parts
    return parts


def run_row(spec):
    """Measure one row (``spec`` from :func:`plan` plus ``device``,
    ``repeats``, ``warmup``, ``seed``, ``threads``, ``probe``, ``cache``);
    returns the row's result (status ``ok``, or ``oom`` on CUDA)."""
    import torch

    from .synthesis_methods import ITERATIONS, method_settings
    if spec.get('threads'):
        torch.set_num_threads(int(spec['threads']))
    device = torch.device(spec['device'])
    cuda = device.type == 'cuda'
    start = time.perf_counter()
    parts = _parts(spec, device, spec.get('cache', False))
    settings = method_settings(spec['method'])
    # one small iteration first: it pages in the libraries' code and
    # builds their lazily made state, which is not memory of the batch
    warm = ITERATIONS[spec['method']](parts, settings, 1, WARM_SIZE, device,
                                      spec['seed'])
    warm.plain(torch.Generator().manual_seed(spec['seed']))
    warm.close()
    del warm
    build_s = time.perf_counter() - start
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    else:
        trim_heap()
    baseline, rss_after_build = _memory_now(device)
    peaks, split_runs, plain_runs = [], [], []
    it = None
    try:
        it = ITERATIONS[spec['method']](parts, settings, spec['batch'],
                                        spec['size'], device, spec['seed'])

        def plain(gen):
            _reset_peak(device)
            clock = Clock(device)
            clock.start()
            it.plain(gen)
            clock.mark('iteration')
            peaks.append(_peak(device) - baseline)
            return clock.total()

        def split(gen):
            clock = Clock(device)
            it.split(gen, clock)
            return dict(clock.times, iteration=clock.total())

        def gen(r):
            return torch.Generator().manual_seed(
                spec['seed'] * 1000003 + 7919 * (r + 1))

        if spec.get('probe'):
            plain(gen(-1))
        else:
            for w in range(spec['warmup']):
                split(gen(-1 - w))
                plain(gen(-1 - w))
            for r in range(spec['repeats']):
                # the same draws for both, the order alternating
                if r % 2 == 0:
                    split_runs.append(split(gen(r)))
                    plain_runs.append(plain(gen(r)))
                else:
                    plain_runs.append(plain(gen(r)))
                    split_runs.append(split(gen(r)))
    except torch.cuda.OutOfMemoryError as err:
        it = None
        gc.collect()
        torch.cuda.empty_cache()
        return dict(status='oom', reason=str(err).splitlines()[0][:200],
                    baseline_bytes=baseline)
    terms = [dict(name=n, kind=k, label=LABELS.get(n, n))
             for n, k in it.terms]
    it.close()
    it = None
    gc.collect()
    memory = dict(peak_bytes=max(peaks) if peaks else None,
                  baseline_bytes=baseline,
                  after_build_bytes=rss_after_build,
                  per_image_bytes=(max(peaks) / spec['batch']
                                   if peaks else None))
    row = dict(status='ok', terms=terms, settings=settings,
               build_seconds=build_s,
               seconds=time.perf_counter() - start,
               runs=dict(split=split_runs, plain=plain_runs),
               memory=memory)
    if not spec.get('probe'):
        row.update(summarize(terms, split_runs, plain_runs))
    return row


def summarize(terms, split_runs, plain_runs):
    """Medians, shares and the sum check of a row's runs."""
    names = [t['name'] for t in terms]
    med = {n: statistics.median(r.get(n, 0.) for r in split_runs)
           for n in names}
    whole = [r['iteration'] for r in split_runs]
    share = {n: statistics.median(r.get(n, 0.) / r['iteration']
                                  for r in split_runs) for n in names}
    losses = [t['name'] for t in terms if t['kind'] == 'loss']
    top = max(losses, key=lambda n: share[n]) if losses else None
    iteration = statistics.median(whole)
    plain = statistics.median(plain_runs)
    return dict(
        median_s=med, share=share, iteration_s=iteration,
        terms_sum_s=sum(med.values()),
        unattributed_s=statistics.median(
            r['iteration'] - sum(r.get(n, 0.) for n in names)
            for r in split_runs),
        plain_iteration_s=plain, split_over_plain=iteration / plain,
        loss_terms=losses, max_loss_term=top,
        max_loss_share=share[top] if top else None,
        meets_loss_target=all(share[n] <= TARGET['max_loss_share']
                              for n in losses))


# ------------------------------------------------------ memory estimates
def estimate_need(spec, done):
    """``dict(needs_bytes, per_image_bytes, from_row)`` for ``spec`` from
    the measured rows ``done`` of the same method and backbone, or None."""
    same = [r for r in done if r['method'] == spec['method'] and
            r['backbone'] == spec['backbone'] and
            (r.get('memory') or {}).get('peak_bytes') is not None]
    if not same:
        return None
    pixels = spec['size'][0] * spec['size'][1]
    at_size = [r for r in same if r['size'] == spec['size'] and
               r['batch'] <= spec['batch']]
    ref = max(at_size, key=lambda r: r['batch']) if at_size else max(
        same, key=lambda r: (r['size'][0] * r['size'][1], r['batch']))
    mem = ref['memory']
    per_image = mem['peak_bytes'] / ref['batch'] * pixels / (
        ref['size'][0] * ref['size'][1])
    return dict(needs_bytes=int(mem.get('after_build_bytes',
                                        mem['baseline_bytes']) +
                                spec['batch'] * per_image),
                per_image_bytes=int(per_image),
                from_row=dict(size=ref['size'], batch=ref['batch'],
                              probe=bool(ref.get('probe'))))


def default_limit(device):
    """Bytes a row may need (see the module doc) and how it was set."""
    import torch
    if str(device).startswith('cuda'):
        total = torch.cuda.get_device_properties(
            torch.device(device)).total_memory
        return int(0.9 * total), '90% of the GPU memory'
    avail, total = available_bytes()
    if avail is None:
        return None, 'no limit (no /proc/meminfo)'
    return int(min(0.8 * avail, 0.5 * total)), (
        'min(80% of the available memory at the start, half the machine)')


def _gb(nbytes):
    return f'{nbytes / GB:.1f} GB'


def skipped(spec, est, limit, why=None):
    reason = why or f'needs ~{_gb(est["needs_bytes"])} (limit {_gb(limit)})'
    return dict(spec, status='skipped', reason=f'skipped: {reason}',
                needs_bytes=est['needs_bytes'] if est else None,
                estimate=est)


# ------------------------------------------------------------- the run
def _same_row(a, b):
    return all(a.get(k) == b.get(k) for k in
               ('method', 'backbone', 'config', 'size', 'batch'))


def _memory_measure(cuda, isolate):
    if cuda:
        return ('torch.cuda.max_memory_allocated during the plain '
                'iterations minus the memory allocated once the model was '
                'built and one 64x64 iteration ran')
    return ('peak RSS of the plain iterations (VmHWM, reset before each) '
            'less the RSS once the model was built and one 64x64 iteration '
            'ran (its freed heap returned with malloc_trim), both without '
            "the file-backed pages (the libraries' code); CPU, " + (
                'every row in a fresh process' if isolate == 'process'
                else 'rows in one process: memory freed by earlier rows may '
                'be reused'))


def run(args, device, checkpoint=None, previous=None):
    """Measure the rows; ``checkpoint(result)`` is called after each row
    with the result so far (the harness writes it, so a long run that is
    stopped keeps its rows), and with ``--resume`` the measured rows of
    ``previous`` (the section in the output file, same repeats, warm-up,
    device and seed) are kept instead of measured again."""
    dev = 'cuda' if str(device).startswith('cuda') else 'cpu'
    defaults = DEFAULTS[dev]
    methods = args.methods or defaults['methods']
    backbones = args.backbones or defaults['backbones']
    sizes = args.sizes or defaults['sizes']
    batches = args.batches or defaults['batches']
    repeats = args.repeats if args.repeats is not None else \
        defaults['repeats']
    isolate = args.isolate
    if isolate == 'auto':
        isolate = 'none' if dev == 'cuda' else 'process'
    if args.memory_limit_gb is not None:
        limit, limit_how = int(args.memory_limit_gb * GB), \
            f'--memory-limit-gb {args.memory_limit_gb}'
    else:
        limit, limit_how = default_limit(device)
    specs = plan(methods, backbones, sizes, batches)
    common = dict(device=str(device), repeats=repeats, warmup=args.warmup,
                  seed=args.seed, threads=args.threads,
                  cache=isolate == 'none')
    reuse = []
    if getattr(args, 'resume', False) and previous and all(
            previous.get(k) == v for k, v in (
                ('repeats', repeats), ('warmup', args.warmup),
                ('seed', args.seed))) and \
            (previous.get('environment') or {}).get('device') == str(device):
        reuse = [r for r in previous.get('rows', []) if r['status'] == 'ok']
        penv = previous.get('environment') or {}
        for r in reuse:  # where a kept row was measured
            r.setdefault('measured_at', dict(
                commit=penv.get('git_commit'), dirty=penv.get('git_dirty'),
                time=penv.get('time')))
    start = time.time() - sum(r.get('seconds', 0.) for r in reuse)
    rows, measured = [], []

    def result():
        return dict(
            description='one synthesis iteration per method x backbone x '
            'size x batch: median seconds of each term (forward with the '
            'recorders, each prior loss with its own backward, backward to '
            'the pixels, optimizer step) of the split iteration, '
            'interleaved with the plain iteration (one backward), their '
            'shares, peak memory',
            methods=methods,
            backbones={b: _backbone(b)[2] for b in backbones},
            sizes=[parse_size(s) for s in sizes], batches=batches,
            repeats=repeats, warmup=args.warmup, seed=args.seed,
            isolation=isolate,
            memory_measure=_memory_measure(dev == 'cuda', isolate),
            memory_limit_bytes=limit, memory_limit=limit_how,
            target=TARGET, rows=list(rows),
            complete=len(rows) == len(specs),
            resumed=sum(any(_same_row(r, o) for o in reuse) for r in rows),
            resumed_from=sorted({(r.get('measured_at') or {}).get('commit')
                                 or '?' for r in rows if any(
                                     _same_row(r, o) for o in reuse)}),
            wall_seconds=time.time() - start,
            failed=sum(r['status'] == 'error' for r in rows))

    def execute(spec):
        full = dict(spec, **common)
        if isolate == 'process':
            return run_isolated(run_row, full)
        return run_row(full)

    def add(row, tag, measured_too=False):
        rows.append(row)
        if measured_too:
            measured.append(row)
        if row['status'] == 'ok':
            shares = ', '.join(
                f'{LABELS.get(n, n)} {100 * row["share"][n]:.1f}%'
                for n in row['loss_terms'])
            print(f'{tag}: iteration {row["iteration_s"]:.3f} s (plain '
                  f'{row["plain_iteration_s"]:.3f} s), {shares}, peak '
                  f'{row["memory"]["peak_bytes"] / 2**20:.0f} MB',
                  flush=True)
        else:
            print(f'{tag}: {row["reason"]}', flush=True)
        if checkpoint is not None:
            checkpoint(result())

    for spec in specs:
        tag = (f'[synthesis] {spec["method_name"]} {spec["backbone_name"]}'
               f' {spec["size"][0]}x{spec["size"][1]} batch '
               f'{spec["batch"]}')
        old = next((r for r in reuse if _same_row(r, spec)), None)
        if old is not None:
            add(old, tag + ' (resumed)', measured_too=True)
            continue
        est = estimate_need(spec, measured)
        if est is None and spec['batch'] > 1 and limit is not None:
            probe = dict(spec, batch=1, probe=True)
            print(f'{tag}: memory probe at batch 1', flush=True)
            try:
                res = execute(probe)
                if res['status'] == 'ok':
                    measured.append(dict(probe, **res))
            except IsolatedError as err:
                print(f'{tag}: probe failed: {str(err).splitlines()[0]}',
                      flush=True)
            est = estimate_need(spec, measured)
        if est is not None and limit is not None and \
                est['needs_bytes'] > limit:
            add(skipped(spec, est, limit), tag)
            continue
        print(f'{tag} ...', flush=True)
        try:
            res = execute(spec)
        except IsolatedError as err:
            first = str(err).splitlines()[0]
            if err.died and est is not None:
                row = skipped(spec, est, limit, f'process killed ({first}), '
                              f'needs ~{_gb(est["needs_bytes"])}')
            else:
                row = dict(spec, status='error', reason=f'error: {first}',
                           traceback=str(err)[-3000:])
            add(row, tag)
            continue
        if res['status'] == 'oom':
            add(skipped(spec, est, limit, f'out of memory ({res["reason"]})'
                        + (f', needs ~{_gb(est["needs_bytes"])}'
                           if est else '')), tag)
            continue
        add(dict(spec, **res), tag, measured_too=True)
    return result()


# ------------------------------------------------------------ rendering
def _s(v):
    return f'{v:.3f}'


def _joined(row, kind):
    parts = []
    for t in row['terms']:
        if t['kind'] != kind:
            continue
        v = _s(row['median_s'][t['name']])
        parts.append(v if t['name'] in ('forward', 'backward', 'step')
                     else f'{t["label"]} {v}')
    return ' + '.join(parts) or '-'


def _mb(nbytes):
    return '-' if nbytes is None else f'{nbytes / 2**20:.0f}'


def markdown_rows(rows, max_share=TARGET['max_loss_share']):
    header = ['method', 'backbone', 'size', 'batch', 'forward s',
              'prior losses s (share)', 'backward s', 'step s',
              'iteration s', 'plain iteration s', 'peak MB',
              f'each loss <= {100 * max_share:.0f}%']
    table = []
    for r in rows:
        cells = [r['method_name'], r['backbone_name'],
                 f'{r["size"][0]}x{r["size"][1]}', r['batch']]
        if r['status'] != 'ok':
            table.append(cells + [r['reason']] + ['-'] * 7)
            continue
        losses = ', '.join(
            f'{t["label"]} {_s(r["median_s"][t["name"]])} '
            f'({100 * r["share"][t["name"]]:.1f}%)'
            for t in r['terms'] if t['kind'] == 'loss')
        over = [t for t in r['terms'] if t['kind'] == 'loss' and
                r['share'][t['name']] > max_share]
        met = 'yes' if not over else 'no (' + ', '.join(
            f'{t["label"]} {100 * r["share"][t["name"]]:.1f}%'
            for t in over) + ')'
        table.append(cells + [
            _joined(r, 'forward'), losses, _joined(r, 'backward'),
            _joined(r, 'step'), _s(r['iteration_s']),
            _s(r['plain_iteration_s']), _mb(r['memory']['peak_bytes']),
            met])
    return markdown_table(header, table)


def target_sentence(result):
    """Whether each row at the target size meets the target, from the
    result (for the README)."""
    t = result.get('target', TARGET)
    h, w = t['size']
    pct = f'{100 * t["max_loss_share"]:.0f}%'
    batches = ' and '.join(str(b) for b in t['batches'])
    rows = [r for r in result['rows'] if r['size'] == [h, w] and
            r['batch'] in t['batches']]
    head = (f'Target: each prior loss at most {pct} of an iteration at '
            f'{h}x{w}, batch {batches}.')
    if not rows:
        return head + f' No row at {h}x{w} was measured.'

    def name(r):
        return f'{r["method_name"]} {r["backbone_name"]} batch {r["batch"]}'

    ok = [r for r in rows if r['status'] == 'ok']
    met = [r for r in ok if r['meets_loss_target']]
    missed = [r for r in ok if not r['meets_loss_target']]
    out = [head]
    if met:
        out.append(f'Met by {len(met)} of {len(ok)} measured rows: ' +
                   '; '.join(f'{name(r)} (largest: '
                             f'{LABELS.get(r["max_loss_term"])} '
                             f'{100 * r["max_loss_share"]:.1f}%)'
                             for r in met) + '.')
    if missed:
        out.append(f'Not met by {len(missed)}: ' + '; '.join(
            f'{name(r)} (' + ', '.join(
                f'{LABELS.get(n, n)} {100 * r["share"][n]:.1f}%'
                for n in r['loss_terms']
                if r['share'][n] > t['max_loss_share']) + ')'
            for r in missed) + '.')
    other = [r for r in rows if r['status'] != 'ok']
    if other:
        out.append('Not measured: ' + '; '.join(
            f'{name(r)} ({r["reason"]})' for r in other) + '.')
    return ' '.join(out)


def markdown(result):
    """Header line, table and target sentence of a synthesis section
    result (with its ``environment``)."""
    env = result.get('environment', {})
    wall = result.get('wall_seconds')
    took = f'; the run took {wall / 60:.0f} min' if wall else ''
    head = (f'{describe_environment(env)}; median of {result["repeats"]} '
            f'after {result["warmup"]} warm-up, split and plain iterations '
            f'interleaved; peak memory: {result["memory_measure"]}{took}.')
    if result.get('resumed'):
        commits = ', '.join(c[:10] for c in result.get('resumed_from', []))
        head += (f'  {result["resumed"]} of the rows were kept from an '
                 f'earlier run (commit {commits}, `--resume`), the others '
                 'measured at the commit above.')
    return '\n\n'.join([head, markdown_rows(
        result['rows'], result.get('target', TARGET)['max_loss_share']),
        target_sentence(result)])
