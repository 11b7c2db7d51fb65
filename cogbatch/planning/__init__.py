"""How a job runs within its memory ceiling: the memory model, the batch plan, and `cogbatch plan`'s report.

    memory   MemoryModel: predicted device bytes of each phase, from a config or a loaded model
    batches  BatchPlan, plan_batches: the largest batch that fits, and resident or phase-swapped mode
    report   plan_job: what `cogbatch plan` prints, from config.json alone
"""
