"""Print a pytest-benchmark JSON file as markdown tables (``titok_fast.benchreport``).

Usage: ``python benchmarks/report.py results.json``
"""

import sys

from titok_fast.benchreport import table

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(f"usage: python {sys.argv[0]} RESULTS.json (pytest-benchmark's --benchmark-json file)")
    try:
        print(table(sys.argv[1]))
    except (OSError, ValueError) as e:  # (not found; not pytest-benchmark's JSON, e.g. a JSON-lines log)
        sys.exit(str(e))
