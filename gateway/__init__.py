"""gateway package."""

import sys

# httpx imports its command-line client with the package whenever click, rich and
# pygments are installed, and Litestar's own dependencies make them so: about 6 MB and
# 25 ms per worker for a command the gateway never runs. A None entry makes that one
# import fail, and httpx then falls back to its own placeholder for ``httpx.main``.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
