# The suite's demo config (tiny Swin UperNet, PSAQ-ViT, W8A8), inherited by
# scope: this file may live anywhere.  The one change: the data source.
_base_ = 'dfq_dense::demo/upernet_swin_demo_w8a8.py'

# Registers SmoothPSAQViT; example_dfq must be importable (run with the
# project folder on PYTHONPATH, see ../README.md).
custom_imports = dict(imports=['example_dfq'], allow_failed_imports=False)

dfq = dict(synthesizer=dict(type='SmoothPSAQViT'))
