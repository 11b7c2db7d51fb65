"""What tests, benchmarks and the demo need and users never call: tiny random checkpoints, fault injection.

Nothing here is imported by `import cogbatch`; `tiny` imports torch, `faults` imports nothing heavy.
"""
