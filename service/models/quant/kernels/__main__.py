"""`python -m service.models.quant.kernels [chat-server flags]`: build the kernels now, where the server's config
says (--kernel-dir, --cache-dir, or their CHAT_* variables; make setup and the image do this), and say whether
they run here."""

import logging

from service.config import load_config
from service.models.quant import kernels

logging.basicConfig(level=logging.INFO, format="%(message)s")
kernels.configure(load_config())
print("own CPU kernels:", "ready" if kernels.available() else "unavailable: torch's int4/int8 kernels are used",
      f"({kernels.cache_dir()})")
