"""Silence library deprecation warnings in sweep workers (the CLI does so for itself).

The forkserver of :func:`airlora.sweep.executors.worker_context` imports this first, before
torch, transformers and PEFT, so that their import-time FutureWarnings do not reach the
driver's terminal from every worker."""

import warnings

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
