# Runtime of the classification track: mmengine's own test loop, no
# mmdet / mmseg scope.  Run a leaf config with
#   import dfq_dense  # noqa: F401
#   from mmengine.config import Config
#   from mmengine.runner import Runner
#   Runner.from_cfg(Config.fromfile('configs/cls/swin_t_fp.py')).test()
default_scope = 'dfq_dense'
custom_imports = dict(imports=['dfq_dense.cls'], allow_failed_imports=False)
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
log_level = 'INFO'
load_from = None
resume = False
launcher = 'none'
