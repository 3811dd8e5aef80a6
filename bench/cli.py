"""The command line every benchmark shares: a full run, or `--quick` for CI."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def bench_main(doc: str | None, full: Callable[[], object], quick: Callable[[], object]) -> None:
    """Parse `--quick` and run the matching size; `doc` is the module's docstring (help)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, for CI")
    (quick if parser.parse_args().quick else full)()
