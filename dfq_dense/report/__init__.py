"""Result tables: run demo cells (dfq_dense.engine.api.run_dfq, what
tools/dfq_test.py does) and write markdown tables into the README."""
from .tables import (cell_comparison_markdown, fmt_metric, grid_markdown,
                     load_fragment, markdown_table, replace_readme_section,
                     run_cell)

__all__ = [
    'cell_comparison_markdown', 'fmt_metric', 'grid_markdown',
    'load_fragment', 'markdown_table', 'replace_readme_section', 'run_cell'
]
