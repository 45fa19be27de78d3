"""Result tables: run demo cells through tools/dfq_test.py and write
markdown tables into the README."""
from .tables import (fmt_metric, grid_markdown, load_fragment,
                     replace_readme_section, run_cell)

__all__ = ['fmt_metric', 'grid_markdown', 'load_fragment',
           'replace_readme_section', 'run_cell']
