"""How a job runs within its memory ceiling: the memory model, the batch plan, and `cogbatch plan`'s report.

    memory   MemoryModel: predicted device bytes of each phase, from a config or a loaded model
    batches  BatchPlan, plan_batches: the largest batch that fits, and resident or phase-swapped mode
    report   plan_report: what `cogbatch plan` prints, from config.json alone
    configs  the config.json a plan reads: local, the hub cache, or shipped; never a download
    gpus     common NVIDIA cards (memory, compute capability) to plan for without having one
"""
