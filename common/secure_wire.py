"""The names a site and the server use for SecAgg+ settings and per-site values, on top of Flower's own."""

# Keys the server adds to the FitIns config; stripped before the train function sees the config.
PREFIX = "privet-secagg-"
KEYS = PREFIX + "keys"
CLIPPING_RANGE = PREFIX + "clipping-range"
MAX_WEIGHT = PREFIX + "max-weight"
# Every contributing site's weight in the masked sum, and the max weight the server must send: equal weights, so a
# site's private example count buys no influence. A site declines a round whose max weight differs.
SITE_WEIGHT = 1
MAX_NORM = PREFIX + "max-update-norm"
# Each delta coordinate is clipped to ±this at the site before quantization (a site's distance bound counts it).
DEFAULT_CLIPPING_RANGE = 8.0
# Plain-text values a site adds to its SecAgg+ reply: nothing that depends on its update.
DECLINE = PREFIX + "decline"
SITE_ID = PREFIX + "site-id"
# Notes a site keeps in its own log (how much of its update was clipped or scaled): never sent.
CLIPPED = PREFIX + "clipped"
WEIGHT = PREFIX + "weight"
NORM_SCALE = PREFIX + "norm-scale"
