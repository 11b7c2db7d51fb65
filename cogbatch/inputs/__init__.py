"""The input side of a job: which images there are, their ids and values, and which requests are pending.

    entries   ImageEntry: an image of the input, identified by the sha256 of its bytes; folder scans
    manifest  Parquet manifests: rows as entries, inline bytes, the checks made when a job is loaded
    hashes    HashCache: hashes cached per (path, size, mtime), so that only new files are read
    decode    safe image decoding: any failure is a short reason (an error row), never a crash
    pending   Request, PendingWork: images x tasks - the rows already in the output
"""
