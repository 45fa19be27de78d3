"""Former name of ``tools/benchmark.py calibration`` (same options)."""
import sys

from benchmark import main

if __name__ == '__main__':
    sys.exit(main(['calibration'] + sys.argv[1:]))
