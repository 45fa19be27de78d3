import os
import os.path as osp
import shutil
import subprocess


def test_setup_without_compiler_fails_with_one_line(tmp_path, repo_root):
    # A fresh clone (no .venv) on a machine with no cached mmcv wheel and no
    # C++ compiler: setup must stop at once, before installing anything.
    clone = tmp_path / 'clone'
    for part in ('tools', 'requirements'):
        shutil.copytree(osp.join(repo_root, part), clone / part)
    shutil.copy(osp.join(repo_root, 'pyproject.toml'), clone)
    proc = subprocess.run(
        ['bash', str(clone / 'tools' / 'setup_env.sh')],
        capture_output=True, text=True,
        env=dict(os.environ, DFQ_CACHE=str(tmp_path / 'cache'),
                 CXX='/nonexistent/c++'))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert 'no C++ compiler' in lines[0] and 'apt-get install g++' in lines[0]
    assert not (clone / '.venv').exists()


def test_setup_is_idempotent(repo_root):
    # Once set up (tools/test.sh ran it already), a re-run only checks the
    # stamp and the imports: silent, no reinstall.
    setup = ['bash', osp.join(repo_root, 'tools', 'setup_env.sh')]
    subprocess.run(setup, capture_output=True, text=True, check=True)
    proc = subprocess.run(setup, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ''
