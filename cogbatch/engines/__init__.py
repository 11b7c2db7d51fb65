"""Engines that schedule a job's pending work: the local engine (`local.run_local`) and Ray Data (`ray.run_ray`).

Every engine goes through the same run prologue (`prologue.run_engine`: checks, the output's lock, the
pending work, the summary), hands chunks of decoded images to `cogbatch.worker.worker.ModelWorker.process`
and writes rows with `cogbatch.store.PartWriter`; only scheduling differs. Importing this package is
cheap: an engine imports its framework only when it runs.
"""
