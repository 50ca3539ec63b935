"""Print a pytest-benchmark JSON file as markdown tables (``titok_fast.benchreport``).

Usage: ``python benchmarks/report.py results.json``
"""

import sys

from titok_fast.benchreport import table

if __name__ == "__main__":
    print(table(sys.argv[1]))
