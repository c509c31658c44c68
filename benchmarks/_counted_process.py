"""``python _counted_process.py COUNTS_FILE ARGS...``: ``sagakit ARGS`` with its commits counted.

The checkout benchmark starts the production processes through this: it is
``python -m sagakit.cli_processes ARGS`` plus :func:`_common.install_commit_counter`,
whose counts (this process's write transactions) are written to ``COUNTS_FILE`` as JSON
every 0.1 s for the driver to read.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from _common import COUNTER, install_commit_counter


def _dump(path: str) -> None:
    while True:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(COUNTER.snapshot(), f)
        os.replace(tmp, path)
        time.sleep(0.1)


def main() -> int:
    path, args = sys.argv[1], sys.argv[2:]
    install_commit_counter()
    threading.Thread(target=_dump, args=(path,), daemon=True).start()
    from sagakit.cli_processes import main as run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
