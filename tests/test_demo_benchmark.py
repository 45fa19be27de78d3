"""The README's main job: both demo models, PSAQ-ViT, W8A8, full demo val.

Data-free W8A8 must stay within 0.02 mAP (box and mask) and 1.0 mIoU of FP.
"""
import json
import os
import os.path as osp
import subprocess
import sys


def test_demo_w8a8_close_to_fp(tmp_path, repo_root, demo_data_root):
    work = tmp_path / 'demo'
    proc = subprocess.run(
        [sys.executable, osp.join(repo_root, 'tools', 'run_demo.py'),
         '--work-dir', str(work)],
        capture_output=True, text=True, cwd=repo_root,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(work / 'summary_w8a8_psaq.json') as f:
        rows = {(r['run'], r['metric']): r for r in json.load(f)}
    tolerance = {'coco/bbox_mAP': 0.02, 'coco/segm_mAP': 0.02, 'mIoU': 1.0}
    assert len(rows) == 3
    for (run, metric), row in rows.items():
        assert row['fp'] > 0
        assert abs(row['quantized'] - row['fp']) <= tolerance[metric], \
            (run, metric, row)
    # Every figure in the summary is the one its dfq_results.json recorded.
    det = json.loads(
        (work / 'mask_rcnn_swin_demo_w8a8' / 'dfq_results.json').read_text())
    assert det['metrics']['coco/bbox_mAP'] == \
        rows[('mask_rcnn_swin_demo_w8a8', 'coco/bbox_mAP')]['quantized']
    assert det['method'] == 'PSAQViT' and (det['w_bits'], det['a_bits']) == \
        (8, 8)
