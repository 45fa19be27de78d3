"""Registries of dfq_dense, children of mmengine's roots.

Being children of the roots (scope ``dfq_dense``) makes every piece reachable
from an mmdet or an mmseg config as ``type='dfq_dense.Name'``, and lets
mmengine's ``_scope_`` switching find them.
"""
from mmengine.registry import DATASETS as MMENGINE_DATASETS
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import METRICS as MMENGINE_METRICS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import TASK_UTILS as MMENGINE_TASK_UTILS
from mmengine.registry import Registry
from mmengine import registry as _roots

# Synthesizers (data sources), quantized modules and quantizers; the
# classification track's timm classifier (dfq_dense.cls).
MODELS = Registry('model', parent=MMENGINE_MODELS,
                  locations=['dfq_dense.synth', 'dfq_dense.quant',
                             'dfq_dense.cls'])
# Observers / calibrators.
TASK_UTILS = Registry('task util', parent=MMENGINE_TASK_UTILS,
                      locations=['dfq_dense.quant'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS,
                 locations=['dfq_dense.engine'])
LOOPS = Registry('loop', parent=MMENGINE_LOOPS,
                 locations=['dfq_dense.engine'])
# The classification track's ImageNet val folder and its top-1 / top-5
# metric (dfq_dense.cls); detection and segmentation use mmdet's and mmseg's.
DATASETS = Registry('dataset', parent=MMENGINE_DATASETS,
                    locations=['dfq_dense.cls'])
METRICS = Registry('metric', parent=MMENGINE_METRICS,
                   locations=['dfq_dense.cls'])
# Steps that change the calibrated quantized student after calibration
# (PSAQ-ViT V2's rounds, MimiQ's head-wise distillation, SPDFQ's block-wise
# reconstruction): the ``(adapt)`` stage of the DFQ loop, built from
# ``dfq.adapter``.  mmengine has no root registry for such steps (and a
# second ``dfq_dense`` child under one of its roots would clash with the
# ones above), so this one is a root of its own in the ``dfq_dense`` scope,
# always built through :func:`build` below.
# The rest of mmengine's roots, empty here, as mmengine-template declares
# them: a config in the dfq_dense scope (the classification track's) then
# finds mmengine's samplers, optimizers, schedulers, visualizers... through
# the parent without a "Failed to search registry" warning for each.
DATA_SAMPLERS = Registry('data sampler', parent=_roots.DATA_SAMPLERS)
EVALUATOR = Registry('evaluator', parent=_roots.EVALUATOR)
LOG_PROCESSORS = Registry('log_processor', parent=_roots.LOG_PROCESSORS)
MODEL_WRAPPERS = Registry('model_wrapper', parent=_roots.MODEL_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = Registry(
    'optimizer wrapper constructor', parent=_roots.OPTIM_WRAPPER_CONSTRUCTORS)
OPTIM_WRAPPERS = Registry('optim_wrapper', parent=_roots.OPTIM_WRAPPERS)
OPTIMIZERS = Registry('optimizer', parent=_roots.OPTIMIZERS)
PARAM_SCHEDULERS = Registry('parameter scheduler',
                            parent=_roots.PARAM_SCHEDULERS)
RUNNERS = Registry('runner', parent=_roots.RUNNERS)
TRANSFORMS = Registry('transform', parent=_roots.TRANSFORMS)
VISBACKENDS = Registry('vis_backend', parent=_roots.VISBACKENDS)
VISUALIZERS = Registry('visualizer', parent=_roots.VISUALIZERS)
WEIGHT_INITIALIZERS = Registry('weight initializer',
                               parent=_roots.WEIGHT_INITIALIZERS)
ADAPTERS = Registry('adapter', scope='dfq_dense',
                    locations=['dfq_dense.adapt'])


def build(registry, cfg, **kwargs):
    """Build ``cfg`` from ``registry`` inside the dfq_dense scope.

    Under ``default_scope='mmdet'`` a plain ``registry.build`` would look the
    type up in mmdet's registry; ``_scope_`` pins the look-up to ours.
    """
    cfg = dict(cfg)
    cfg.setdefault('_scope_', 'dfq_dense')
    return registry.build(cfg, **kwargs)
