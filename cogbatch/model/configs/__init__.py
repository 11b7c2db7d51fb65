"""The official `config.json` of each supported checkpoint, shipped with the package (no weights).

`cogbatch.dryrun` builds fake models from them and `cogbatch plan` can plan for a model without
fetching anything. Directory names are the hub names (`THUDM/<name>`).
"""
