"""The registry of published results (configs/leaderboard/published.yaml).

Every figure the suite compares against is one entry, quoted from a paper or
a README (``quoted: true``), never measured here.  :func:`load_published`
reads and validates the file; a malformed entry raises
:class:`PublishedRegistryError` with one line naming the entry and field.

Entry fields (all required unless said)::

    id            unique string
    method        'full precision' or the quantization method
    venue         '<conference or journal> <year>', e.g. 'ICCV 2023'
    task          instance_segmentation | semantic_segmentation |
                  classification
    model         detector / segmentor / classifier, e.g. 'Cascade Mask R-CNN'
    backbone      e.g. 'Swin-S'
    schedule      e.g. '3x', '1x', '160k', 'ImageNet-1k 300 epochs'
    dataset       e.g. 'COCO val2017', 'ADE20K val', 'ImageNet-1k val'
    checkpoint    {source: official-swin-det | official-swin-seg |
                   official-swin-cls | official-deit-cls | mmdet-zoo |
                   mmseg-zoo,
                   file: '<name>.pth', url: optional string}
    bits          'FP' or 'W<w>A<a>'
    calibration   {data: real | data-free | none, images: int or null,
                   split: string or null}
    metrics       {box_ap, mask_ap} | {miou} | {top1} (per task), numbers
    fp_reference  same keys as metrics, or null (then ``note`` says why)
    source        where the figure is printed (table / README)
    quoted        true
    note          optional string; required where something is unverified
                  (an unknown calibration size, a null fp_reference)
"""
import os.path as osp
import re

REGISTRY = osp.join(osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))), 'configs', 'leaderboard', 'published.yaml')

TASK_METRICS = dict(instance_segmentation=('box_ap', 'mask_ap'),
                    semantic_segmentation=('miou', ),
                    classification=('top1', ))
# official-swin-cls / official-deit-cls: the release files of the Swin and
# DeiT authors, the weights timm's pretrained_cfg of the model points at.
CHECKPOINT_SOURCES = ('official-swin-det', 'official-swin-seg',
                      'official-swin-cls', 'official-deit-cls', 'mmdet-zoo',
                      'mmseg-zoo')
CALIBRATION_DATA = ('real', 'data-free', 'none')
REQUIRED = ('id', 'method', 'venue', 'task', 'model', 'backbone', 'schedule',
            'dataset', 'checkpoint', 'bits', 'calibration', 'metrics',
            'fp_reference', 'source', 'quoted')
OPTIONAL = ('note', )
BITS_RE = re.compile(r'^(FP|W([2-9]|1[0-6])A([2-9]|1[0-6]))$')
VENUE_RE = re.compile(r'^\S.* (19|20)\d\d$')


class PublishedRegistryError(ValueError):
    """The registry file is malformed: one line."""


def _fail(where, message):
    raise PublishedRegistryError(f'published results: {where}: {message}')


def _string(where, field, value):
    if not isinstance(value, str) or not value.strip():
        _fail(where, f'{field} must be a non-empty string, got {value!r}')


def _metrics(where, field, value, task):
    want = TASK_METRICS[task]
    if not isinstance(value, dict) or set(value) != set(want):
        _fail(where, f'{field} must have exactly the keys {list(want)} for '
              f'task {task}, got {value!r}')
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not 0 <= number <= 100:
            _fail(where, f'{field}.{key} must be a number in 0-100, got '
                  f'{number!r}')


def validate_entry(entry, index=0):
    """Check one entry; :class:`PublishedRegistryError` if malformed."""
    where = f'entry {index}'
    if not isinstance(entry, dict):
        _fail(where, 'must be a mapping')
    if isinstance(entry.get('id'), str):
        where = f'entry {index} ({entry["id"]})'
    missing = [f for f in REQUIRED if f not in entry]
    if missing:
        _fail(where, f'missing field(s) {", ".join(missing)}')
    unknown = [f for f in entry if f not in REQUIRED + OPTIONAL]
    if unknown:
        _fail(where, f'unknown field(s) {", ".join(unknown)}')
    for field in ('id', 'method', 'model', 'backbone', 'schedule', 'dataset',
                  'source'):
        _string(where, field, entry[field])
    if entry['quoted'] is not True:
        _fail(where, 'quoted must be true (figures are quoted, not measured)')
    if not isinstance(entry['venue'], str) or \
            not VENUE_RE.match(entry['venue']):
        _fail(where, f"venue must be '<conference or journal> <year>', got "
              f"{entry['venue']!r}")
    if entry['task'] not in TASK_METRICS:
        _fail(where, f"task must be one of {list(TASK_METRICS)}, got "
              f"{entry['task']!r}")
    if not isinstance(entry['bits'], str) or \
            not BITS_RE.match(entry['bits']):
        _fail(where, f"bits must be 'FP' or 'W<w>A<a>' (2-16 bits), got "
              f"{entry['bits']!r}")
    ckpt = entry['checkpoint']
    if not isinstance(ckpt, dict) or not {'source', 'file'} <= set(ckpt) \
            or not set(ckpt) <= {'source', 'file', 'url'}:
        _fail(where, 'checkpoint must have source, file and optionally url')
    if ckpt['source'] not in CHECKPOINT_SOURCES:
        _fail(where, f'checkpoint.source must be one of '
              f'{list(CHECKPOINT_SOURCES)}, got {ckpt["source"]!r}')
    _string(where, 'checkpoint.file', ckpt['file'])
    if not ckpt['file'].endswith('.pth') or '/' in ckpt['file']:
        _fail(where, f'checkpoint.file must be a .pth file name, got '
              f'{ckpt["file"]!r}')
    if 'url' in ckpt and (not isinstance(ckpt['url'], str) or
                          osp.basename(ckpt['url']) != ckpt['file']):
        _fail(where, 'checkpoint.url must end in checkpoint.file')
    calib = entry['calibration']
    if not isinstance(calib, dict) or set(calib) != {'data', 'images',
                                                     'split'}:
        _fail(where, 'calibration must have exactly data, images, split')
    if calib['data'] not in CALIBRATION_DATA:
        _fail(where, f'calibration.data must be one of '
              f'{list(CALIBRATION_DATA)}, got {calib["data"]!r}')
    images = calib['images']
    if images is not None and (isinstance(images, bool) or
                               not isinstance(images, int) or images < 1):
        _fail(where, f'calibration.images must be a positive integer or '
              f'null, got {images!r}')
    if calib['split'] is not None:
        _string(where, 'calibration.split', calib['split'])
    if (entry['bits'] == 'FP') != (calib['data'] == 'none'):
        _fail(where, "calibration.data is 'none' exactly for bits 'FP'")
    if calib['data'] == 'real' and calib['split'] is None:
        _fail(where, 'real calibration data needs calibration.split')
    _metrics(where, 'metrics', entry['metrics'], entry['task'])
    if entry['fp_reference'] is not None:
        _metrics(where, 'fp_reference', entry['fp_reference'], entry['task'])
    if 'note' in entry:
        _string(where, 'note', entry['note'])
    unverified = entry['fp_reference'] is None or (
        calib['data'] != 'none' and calib['images'] is None)
    if unverified and 'note' not in entry:
        _fail(where, 'a null fp_reference or calibration.images needs a '
              'note saying why')
    return entry


def validate_published(data):
    """Validate the parsed registry; returns its list of entries."""
    if not isinstance(data, dict) or not isinstance(data.get('entries'),
                                                    list):
        raise PublishedRegistryError(
            'published results: the file must be a mapping with a list '
            'under "entries"')
    seen = set()
    for i, entry in enumerate(data['entries']):
        validate_entry(entry, i)
        if entry['id'] in seen:
            _fail(f'entry {i}', f'duplicate id {entry["id"]!r}')
        seen.add(entry['id'])
    return data['entries']


def load_published(path=None):
    """The validated entries of the registry file (default: the one in
    configs/leaderboard/)."""
    import yaml
    path = path or REGISTRY
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise PublishedRegistryError(
            f'published results: cannot read {path}: {err.strerror}') \
            from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, 'problem_mark', None), 'line', None)
        at = f' (line {line + 1})' if line is not None else ''
        raise PublishedRegistryError(
            f'published results: {path} is not valid YAML{at}') from None
    return validate_published(data)


def fp_entry_for_checkpoint(checkpoint, entries=None):
    """The full-precision entry of the checkpoint ``checkpoint`` (a file
    name, path or URL), or None."""
    entries = load_published() if entries is None else entries
    name = osp.basename(str(checkpoint).split('?')[0])
    for entry in entries:
        if entry['bits'] == 'FP' and entry['checkpoint']['file'] == name:
            return entry
    return None


def find_entries(entries=None, **fields):
    """Entries whose top-level fields equal ``fields`` (e.g.
    ``method='RepQ-ViT', bits='W4A4'``)."""
    entries = load_published() if entries is None else entries
    return [e for e in entries
            if all(e.get(k) == v for k, v in fields.items())]
