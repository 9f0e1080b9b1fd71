"""What jobs/ and workers/ share and neither owns: the types both sides of the job/worker
boundary pass (common/types.py), credential masking and the one-line error
(common/errors.py, common/redact.py), the `adl` logger (common/logs.py). Imports nothing
of ours; storage/ imports nothing of ours either (not even this)."""
