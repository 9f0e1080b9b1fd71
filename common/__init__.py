"""What jobs/, workers/ and storage/ share and none of them owns: the types both sides of
the job/worker boundary pass (common/types.py), credential masking and the one-line error
(common/errors.py, common/redact.py), the `adl` logger (common/logs.py). Imports nothing
of ours."""
