"""`chat-server`: parse the config, set up logging, serve until signalled."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading

from service.config import load_config
from service.models.loader import ModelNotFound


def main(argv: list[str] | None = None) -> int:
    config = load_config(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from service.runtime import serve  # imports torch; after argument errors are out of the way

    try:
        asyncio.run(serve(config))
    except (ModelNotFound, ValueError, MemoryError) as err:  # a bad choice, or weights that fit nowhere
        logging.getLogger("service").error("cannot start: %s", err)
        return 2
    # Our own threads must be gone by now; library daemons (gRPC's poller, tqdm's monitor) may stay.
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()
            and (not t.daemon or t.name.startswith("engine"))]
    if left:
        logging.getLogger("service").warning("threads still running at exit: %s", ", ".join(left))
    return 0


if __name__ == "__main__":
    sys.exit(main())
