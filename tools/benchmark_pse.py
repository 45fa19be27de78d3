"""Former name of ``tools/benchmark.py pse`` (same options)."""
import sys

from benchmark import main

if __name__ == '__main__':
    sys.exit(main(['pse'] + sys.argv[1:]))
