"""What the benchmark sections share.

* :func:`environment`: where a measurement ran (CPU model and threads or the
  GPU's name, library versions, git commit), stored with every section.
* :func:`write_result` / :func:`section_of`: the JSON file of sections
  (``{"sections": {name: result}, "environment": ...}``; a file may hold
  several sections, an existing one is updated).  :func:`section_of` also
  reads the flat layout the calibration and PSE scripts wrote before they
  became sections.
* :func:`run_isolated`: a function in a fresh (spawned) process, so that its
  peak RSS is its own.
* memory readings (:func:`rss_bytes`, :func:`reset_peak_rss`,
  :func:`peak_rss_bytes`, :func:`available_bytes`) and :class:`Clock`, the
  interval timer of the split measurements.
"""
import json
import multiprocessing as mp
import os
import os.path as osp
import platform
import resource
import statistics
import time
from datetime import datetime, timezone

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


# ------------------------------------------------------------ environment
def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # not installed / broken: recorded as such
        return None


def environment(device='cpu'):
    """Where a benchmark runs: time, CPU model, core count, torch threads,
    ``OMP_NUM_THREADS``, the device (``device_name``: ``CPU <model>, <n>
    thread(s)`` or the GPU's name from ``torch.cuda.get_device_name``),
    python / torch / mmcv / mmengine / mmdet / mmseg versions, git commit and
    whether tracked files differ from it."""
    import torch

    from ..utils.environment import cpu_model, git_state
    commit, dirty = git_state(REPO)
    cpu = cpu_model()
    env = dict(
        time=datetime.now(timezone.utc).isoformat(timespec='seconds'),
        host_cpu=cpu, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get('OMP_NUM_THREADS'),
        device=str(device), gpu=None,
        device_name=f'CPU {cpu}, {torch.get_num_threads()} thread(s)',
        python=platform.python_version(), torch=torch.__version__,
        mmcv=_version('mmcv'), mmengine=_version('mmengine'),
        mmdet=_version('mmdet'), mmseg=_version('mmseg'),
        git_commit=commit, git_dirty=dirty)
    if str(device).startswith('cuda'):
        env['gpu'] = torch.cuda.get_device_name(torch.device(device))
        env['device_name'] = env['gpu']
        env['cuda'] = torch.version.cuda
    return env


def describe_environment(env):
    """One line about ``env`` (old and new layouts)."""
    device = env.get('device_name') or env.get('gpu') or \
        env.get('host_cpu') or env.get('cpu') or env.get('device')
    commit = env.get('git_commit') or '?'
    dirty = ' (dirty)' if env.get('git_dirty') else ''
    return (f'{device}, torch {env.get("torch")}, mmcv {env.get("mmcv")}, '
            f'mmdet {env.get("mmdet")}, mmseg {env.get("mmseg")}, '
            f'commit {commit[:10]}{dirty}')


# ----------------------------------------------------------------- config
def load_config(path):
    """A config of the suite as the DFQ tools read it
    (``engine.runner.load_config``: ``dfq`` assembled from the
    ``configs/_base_`` fragments), ``path`` absolute or relative to the
    repository."""
    from ..engine.runner import load_config as _load
    return _load(path if osp.isabs(path) else osp.join(REPO, path))


def random_weights(cfg):
    """``cfg`` (in place, returned) with its timm classifier built on
    timm's random init (``pretrained=False``, no weights file): the
    benchmarks count and time random weights, and a classifier config
    would otherwise look for its release file.  Other models load nothing
    at build time: unchanged."""
    from ..engine.dfq_loop import is_classifier_cfg
    if is_classifier_cfg(cfg):
        cfg.model.pretrained = False
        cfg.model.checkpoint = None
    return cfg


# ------------------------------------------------------------------- JSON
def write_result(path, name, result, env):
    """Store ``result`` (with ``environment=env``) as ``sections[name]`` of
    the JSON file ``path``, other sections kept; returns the path."""
    data = {}
    if osp.exists(path):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        if 'sections' not in data:  # a flat file of the old scripts
            data = {}
    data.setdefault('sections', {})[name] = dict(result, environment=env)
    data['environment'] = env  # of the latest section written
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def section_of(data, name):
    """The result of section ``name`` in a loaded JSON file: its
    ``sections[name]``, or the whole dict for a flat file (the layout of
    ``calibration.json`` / ``pse.json`` before the harness)."""
    if 'sections' in data:
        return data['sections'][name]
    return data


def load_section(path, name):
    with open(path) as f:
        return section_of(json.load(f), name)


def markdown_table(header, rows):
    """:func:`dfq_dense.report.tables.markdown_table`."""
    from ..report.tables import markdown_table as table
    return table(header, rows)


def median(values):
    values = list(values)
    return statistics.median(values) if values else None


# ----------------------------------------------------------------- memory
def rss_bytes():
    """Resident set size of this process now."""
    with open('/proc/self/statm') as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf('SC_PAGE_SIZE')


def trim_heap():
    """Return the C heap's free memory to the system (glibc
    ``malloc_trim``), so that the RSS counts what is in use; False where
    there is no glibc."""
    try:
        import ctypes
        return bool(ctypes.CDLL('libc.so.6').malloc_trim(0))
    except (OSError, AttributeError):
        return False


def reset_peak_rss():
    """Reset the kernel's peak RSS (``VmHWM``) of this process to its
    current RSS; False where that is not possible (then
    :func:`peak_rss_bytes` is the peak of the process' whole life)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss_bytes():
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), else
    since the process started."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_parts():
    """``dict(anon, file, shmem)``: the parts of this process' RSS in bytes
    (``/proc/self/status``; file-backed pages are mostly the code of the
    shared libraries, loaded as first used)."""
    out = {}
    keys = {'RssAnon:': 'anon', 'RssFile:': 'file', 'RssShmem:': 'shmem'}
    try:
        with open('/proc/self/status') as f:
            for line in f:
                key = line.split(None, 1)[0]
                if key in keys:
                    out[keys[key]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def available_bytes():
    """``(MemAvailable, MemTotal)`` of the machine in bytes (None, None
    where ``/proc/meminfo`` is missing)."""
    info = {}
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                key, value = line.split(':', 1)
                info[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return None, None
    return info.get('MemAvailable'), info.get('MemTotal')


# ------------------------------------------------------------- isolation
def _child(conn, fn, args, kwargs):
    try:
        conn.send(('ok', fn(*args, **kwargs)))
    except BaseException as err:  # report, do not hang the parent
        import traceback
        conn.send(('error', f'{type(err).__name__}: {err}\n'
                   f'{traceback.format_exc()}'))
    finally:
        conn.close()


class IsolatedError(RuntimeError):
    """The function raised in its process, or the process died (``died``:
    killed, e.g. for memory)."""

    def __init__(self, message, died=False, exitcode=None):
        super().__init__(message)
        self.died = died
        self.exitcode = exitcode


def run_isolated(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh spawned process (``fn`` must be
    importable); returns its result or raises :class:`IsolatedError`."""
    ctx = mp.get_context('spawn')
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, kwargs))
    proc.start()
    child.close()
    try:
        status, value = parent.recv()
    except EOFError:
        proc.join()
        raise IsolatedError(f'process died (exit code {proc.exitcode})',
                            died=True, exitcode=proc.exitcode) from None
    proc.join()
    if status != 'ok':
        raise IsolatedError(value)
    return value


# ----------------------------------------------------------------- timing
class Clock:
    """Contiguous intervals of one measured stretch.

    ``start()`` then ``mark(name)`` after each piece: the time since the
    previous mark is added to ``times[name]`` (a name may be marked several
    times; its pieces add up).  On CUDA every mark synchronises first, so a
    piece is charged with its own kernels.  The pieces partition
    ``total()``, the time from ``start()`` to the last mark.
    """

    def __init__(self, device='cpu'):
        self.cuda = str(device).startswith('cuda')
        self.device = device
        self.times = {}
        self._t0 = self._t = None

    def _sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)

    def start(self):
        self._sync()
        self.times = {}
        self._t0 = self._t = time.perf_counter()

    def mark(self, name):
        self._sync()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.) + (now - self._t)
        self._t = now

    def total(self):
        return self._t - self._t0
