"""The names of the records a server and a node exchange (strategies/diloco.py builds them,
fl_diloco/client_app.py reads them).

Kept apart from the strategy so that the ClientApp adapter, which Flower starts afresh for every
message in deployment, imports neither torch nor the strategy: it only forwards records.
"""

PARAMS_KEY = "params"
AGGREGATE_KEY = "aggregate"
CONFIG_KEY = "config"
OUTER_GRADIENT_KEY = "outer_gradient"
METRICS_KEY = "metrics"
MOMENTUM_KEY = "momentum"
# A fresh worker process (restarted after a crash) answers a train request with this metric
# instead of an outer gradient; the server then sends it its state (DiLoCo.worker_state).
NEEDS_STATE_METRIC = "needs_state"
REQUIRED_METRICS = ("tokens", "train_loss", "compute_seconds", "idle_seconds")
