"""The per-process model worker: what every engine runs, once per model-holding process.

    worker     ModelWorker: chunks of images and their requests in, result rows out; OOM halves the batch
    loading    LoadedImage, load_entry, prefetch: images read, verified, decoded and preprocessed
    placement  phase swapping of the model's parts, device memory measured and bounded
    rows       result rows: a text's row, an error row
"""
