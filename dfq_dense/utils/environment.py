"""What a benchmark records about where it ran: the CPU model and the git
state of the checkout (the tools' JSON carries both)."""
import os.path as osp
import platform
import subprocess

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def cpu_model():
    """The CPU's model name (``/proc/cpuinfo``), else what platform says."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state(root=REPO):
    """``(commit, dirty)`` of the checkout at ``root``; ``(None, None)``
    without git.  ``dirty``: tracked files differ from the commit."""
    try:
        def git(*args):
            return subprocess.run(['git', *args], cwd=root,
                                  capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()
        return (git('rev-parse', 'HEAD') or None,
                bool(git('status', '--porcelain', '--untracked-files=no')))
    except (OSError, subprocess.SubprocessError):
        return None, None
