"""`python -m service.models.quant.kernels`: build the kernels now (make setup does) and say whether they run here."""

import logging

from service.models.quant.kernels import available

logging.basicConfig(level=logging.INFO, format="%(message)s")
print("own CPU kernels:", "ready" if available() else "unavailable: torch's int4/int8 kernels are used")
