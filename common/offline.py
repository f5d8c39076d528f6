"""Keep Flower from phoning home, checking for updates or installing app dependencies at run time.

Import this before anything imports ``flwr``: a hospital's or bank's machines must not call out or pull code.
"""

import os

FLOWER_OFF = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

for _key, _value in FLOWER_OFF.items():
    os.environ.setdefault(_key, _value)
