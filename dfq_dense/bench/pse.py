"""Section ``pse``: the cost of the exact patch-similarity entropy (PSE) in
a PSAQ-ViT iteration.

Builds the Swin backbone of a config (``model.backbone``, random weights, no
checkpoint) and, for each image size (batch 1 by default), times one
synthesis iteration, interleaving the sizes (size A, size B, size A, ...)
and taking the median of ``--repeats`` runs after one warm-up each::

    backbone forward under AttnOutputRecorder
    PSE forward  (psaq_entropy_loss on the records, exact by default)
    backward of (PSE + TV prior) to the pixels

The backward is one backward split at the records: first the PSE's own
backward to the recorded features (timed as the PSE's), then the
backbone's backward from there (plus the TV term) to the pixels.

Memory: on GPU the allocator's statistics (what the backbone forward leaves
allocated, i.e. its activations, against the peak the PSE adds on top of
them during its forward and backward); on CPU the bytes of the tensors the
autograd graph saves (``torch.autograd.graph.saved_tensors_hooks``, one
count per storage, parameters excluded) in the backbone forward against
those of the PSE forward, plus the KDE's work buffers::

    OMP_NUM_THREADS=1 python tools/benchmark.py pse [--sizes 800x1333 512x512]
        [--repeats 3] [--device cpu|cuda] [--chunk auto]

The ``synthesis`` section measures the same split for every method.
"""
import os.path as osp
import statistics
import time

import torch

from .common import REPO

NAME = 'pse'
HELP = 'exact patch-similarity entropy cost as a share of one PSAQ-ViT ' \
    'iteration'
DEFAULT_OUT = 'pse.json'


def add_arguments(p):
    p.add_argument('--config', default=osp.join(REPO, 'configs',
                                                'mask_rcnn_swin_s_w8a8.py'))
    p.add_argument('--sizes', nargs='+', default=['800x1333', '512x512'],
                   help='HxW per size')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--chunk', default='auto',
                   help="KDE chunk: an int, 'auto' or 'none'")
    p.add_argument('--seed', type=int, default=0)


# ---------------------------------------------------------------- backbone
def build_backbone(config: str, device):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmdet.registry import MODELS
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    bb_cfg = cfg.model.backbone.copy()
    bb_cfg['init_cfg'] = None  # random weights, nothing downloaded
    bb_cfg['with_cp'] = False
    backbone = MODELS.build(bb_cfg).to(device)
    backbone.eval()  # mmdet's SwinTransformer.train() returns None
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, bb_cfg


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


class SavedBytes:
    """Bytes of the distinct storages autograd saves (parameters left out)."""

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.seen = {}

    def pack(self, t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude:
            self.seen[ptr] = max(self.seen.get(ptr, 0), st.nbytes())
        return t

    @property
    def total(self):
        return sum(self.seen.values())

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def one_iteration(backbone, rec, hw, batch, device, generator, chunk,
                  memory=False):
    """One synthesis iteration; returns timings (s) and, with ``memory``,
    memory figures (bytes)."""
    from ..synth.losses import _chunk_len, psaq_entropy_loss, tv_prior_loss
    H, W = hw
    x = torch.randn((batch, 3, H, W), generator=generator).to(device)
    x.requires_grad_(True)
    cuda = torch.device(device).type == 'cuda'
    mem = {}
    bb_saved = SavedBytes(backbone.parameters())
    pse_saved = SavedBytes()
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        m0 = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    rec.clear()
    if memory and not cuda:
        with bb_saved.hooks():
            backbone(x)
    else:
        backbone(x)
    _sync(device)
    t1 = time.perf_counter()
    if cuda:
        m1 = torch.cuda.memory_allocated(device)
        mem['backbone_activation_bytes'] = m1 - m0
        mem['backbone_forward_peak_bytes'] = (
            torch.cuda.max_memory_allocated(device) - m0)
        torch.cuda.reset_peak_memory_stats(device)
    feats = [r['feat'] for r in rec.records]
    leaves = [f.detach().requires_grad_(True) for f in feats]
    recs = [dict(r, feat=f) for r, f in zip(rec.records, leaves)]
    _sync(device)
    t2 = time.perf_counter()
    if memory and not cuda:
        with pse_saved.hooks():
            loss_pse = psaq_entropy_loss(recs, chunk=chunk)
    else:
        loss_pse = psaq_entropy_loss(recs, chunk=chunk)
    _sync(device)
    t3 = time.perf_counter()
    grads = torch.autograd.grad(loss_pse, leaves)
    _sync(device)
    t4 = time.perf_counter()
    if cuda:
        mem['pse_peak_bytes'] = torch.cuda.max_memory_allocated(device) - m1
    loss_tv = tv_prior_loss(x, tau=2750.)
    torch.autograd.backward(feats + [loss_tv],
                            list(grads) + [torch.ones_like(loss_tv)])
    _sync(device)
    t5 = time.perf_counter()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    if memory and not cuda:
        mem['backbone_saved_bytes'] = bb_saved.total
        mem['pse_saved_bytes'] = pse_saved.total
    n_sims = sum(r['feat'].shape[0] * r['feat'].shape[1] *
                 r['feat'].shape[2]**2 for r in rec.records)
    if memory:
        steps = [_chunk_len(chunk, batch, n, device) for n in
                 (r['feat'].shape[1] * r['feat'].shape[2]**2
                  for r in rec.records)]
        mem['pse_workspace_bytes'] = 2 * batch * 10 * max(steps) * 4
    rec.clear()
    del grads, feats, leaves, recs, loss_pse
    return dict(backbone_forward=t1 - t0, pse_forward=t3 - t2,
                pse_backward=t4 - t3, backbone_backward=t5 - t4,
                iteration=(t1 - t0) + (t3 - t2) + (t4 - t3) + (t5 - t4),
                similarities=n_sims, layers=len(rec)), mem


def run(args, device):
    from ..synth.hooks import AttnOutputRecorder
    from ..synth.losses import GaussianKDE, KDE_CHUNK
    chunk = args.chunk
    if chunk.lower() == 'none':
        chunk = None
    elif chunk != 'auto':
        chunk = int(chunk)
    sizes = [tuple(int(v) for v in s.lower().split('x')) for s in args.sizes]
    backbone, bb_cfg = build_backbone(args.config, device)
    generator = torch.Generator().manual_seed(args.seed)
    runs = {hw: [] for hw in sizes}
    memory = {}
    with AttnOutputRecorder(backbone) as rec:
        for hw in sizes:  # warm-up, and the memory figures
            _, memory[hw] = one_iteration(backbone, rec, hw, args.batch,
                                          device, generator, chunk,
                                          memory=True)
        for _ in range(args.repeats):
            for hw in sizes:
                t, _ = one_iteration(backbone, rec, hw, args.batch, device,
                                     generator, chunk)
                runs[hw].append(t)
                print(f'[pse] {hw[0]}x{hw[1]}: iteration '
                      f'{t["iteration"]:.3f} s, PSE '
                      f'{t["pse_forward"] + t["pse_backward"]:.3f} s',
                      flush=True)
    results = []
    for hw in sizes:
        med = {k: statistics.median(r[k] for r in runs[hw])
               for k in ('backbone_forward', 'pse_forward', 'pse_backward',
                         'backbone_backward', 'iteration')}
        pse = med['pse_forward'] + med['pse_backward']
        res = dict(size=f'{hw[0]}x{hw[1]}', batch=args.batch,
                   similarities=runs[hw][0]['similarities'],
                   layers=runs[hw][0]['layers'], median_s=med,
                   pse_s=pse, pse_share=pse / med['iteration'],
                   runs=runs[hw], memory=memory[hw])
        results.append(res)
    out = dict(config=osp.relpath(osp.abspath(args.config), REPO),
               backbone=dict(bb_cfg), repeats=args.repeats,
               chunk=args.chunk, kde_chunk_defaults=KDE_CHUNK,
               kde=GaussianKDE.__name__, results=results)
    return out


def _mb(v):
    return f'{v / 2**20:.1f}' if v is not None else '-'


def markdown(out) -> str:
    env = out['environment']
    device = env.get('gpu') or env.get('host_cpu') or env.get('cpu')
    head = (f"Device {device}, torch {env['torch']}, "
            f"{env['torch_threads']} thread(s), median of "
            f"{out['repeats']}, KDE chunk {out['chunk']}.\n\n")
    cuda = bool(env.get('gpu'))
    mem_cols = ('backbone activations MB | PSE peak MB' if cuda else
                'backbone saved MB | PSE saved MB | PSE work buffers MB')
    lines = [
        '| size | similarities | backbone fwd s | PSE fwd s | PSE bwd s | '
        'backbone bwd s | iteration s | PSE share | ' + mem_cols + ' |',
        '|' + '---|' * (10 if cuda else 11)
    ]
    for r in out['results']:
        m, t = r['memory'], r['median_s']
        if cuda:
            mem = (f"{_mb(m.get('backbone_activation_bytes'))} | "
                   f"{_mb(m.get('pse_peak_bytes'))}")
        else:
            mem = (f"{_mb(m.get('backbone_saved_bytes'))} | "
                   f"{_mb(m.get('pse_saved_bytes'))} | "
                   f"{_mb(m.get('pse_workspace_bytes'))}")
        lines.append(
            f"| {r['size']} | {r['similarities'] / 1e6:.2f} M | "
            f"{t['backbone_forward']:.3f} | {t['pse_forward']:.3f} | "
            f"{t['pse_backward']:.3f} | {t['backbone_backward']:.3f} | "
            f"{t['iteration']:.3f} | {100 * r['pse_share']:.1f}% | {mem} |")
    return head + '\n'.join(lines)


