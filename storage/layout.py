"""Where things live under a storage root, and the manifests that mark them complete.

    activations/<set>/shard-00000.parquet      activations of one model on one corpus
    activations/<set>/shard-00000.done.json    that shard's marker, with its digest (written last)
    activations/<set>/manifest.json            the whole set is complete: every shard's digest (last)
    pairs/<pair>/difference.parquet            per (layer, position) means and delta
    pairs/<pair>/difference.safetensors        the same vectors for other tools
    pairs/<pair>/logit_lens.parquet            top tokens of delta, -delta and the means
    pairs/<pair>/generations.parquet           baseline and steered samples
    pairs/<pair>/steering.parquet              the steering strength search
    pairs/<pair>/patchscope.parquet            top tokens per (layer, position, variant, scale)
    pairs/<pair>/token_relevance.parquet       graded logit-lens and patchscope tokens
    pairs/<pair>/token_relevance.json          the relevance stage's status and metrics (last)
    pairs/<pair>/similarity.parquet            embedding similarity of text sets
    pairs/<pair>/agent/<agent>-b<budget>-r<run>.json   one interpretability-agent run's transcript
    pairs/<pair>/agent.parquet                 every agent run's description and grades
    pairs/<pair>/causal_effect.parquet         cross-entropy with delta_hat patched or projected out
    pairs/<pair>/<stage>.done.json             a stage's marker: the digests of what it wrote, its
                                               content key and settings (last)
    pairs/<pair>/manifest.json                 the pair's results are complete: every file's digest,
                                               each stage's key and settings
    leases/activations/<set>/<n>.json          who is extracting the set now (jobs/leases.py)
    leases/pairs/<pair>/<n>.json               who is running the pair now
    runs/<job>/run.json                        what a job ran and where its results are
                                               (<job>: the name, or a slug and a key: run_dir)
    runs/<job>/report.html                     the analysts' page (`adl report`)
    runs/<job>/status.json                     the job's progress, rewritten as it runs
    runs/<job>/catalog.parquet                 headline findings of all the job's pairs
    runs/<job>/pair_similarity.parquet         cosine of every two pairs' deltas

The tables' file names are declared with their kinds (storage/tables.py: `LOGIT_LENS.file`).
<set> and <pair> are readable names followed by a content key, a hash of everything
that determines the result (a pair's: its two sets): the same work under another job
finds its results already there. A pair's stage is keyed by its own settings and the
keys of the stages it reads (jobs/stages.py stage_keys), recorded in its marker: a
stage whose key changed runs again in place, and so do the stages that read it. A marker or manifest is written only after the data it describes, so whatever
a crash leaves behind is either complete or invisible to a rerun; and it records each
file's digest (size and CRC-32, storage/store.py), so a file changed since is found out.
"""
from __future__ import annotations

import hashlib
import json
import re

from storage.tables import CATALOG, PAIR_SIMILARITY

# 2: markers and manifests carry digests; stage markers; leases.
# 3: a pair's folder is keyed by its two activation sets alone; each stage's marker
#    records its own content key (its settings and the keys of the stages it reads).
#    Activation sets are as in layout 2 and keep their keys (SET_LAYOUT_VERSION).
LAYOUT_VERSION = 3
SET_LAYOUT_VERSION = 2
MARKER = ".done.json"   # a shard's or a stage's marker: <shard or stage>.done.json


def content_key(identity: dict, version: int = LAYOUT_VERSION) -> str:
    canonical = json.dumps({"layout": version, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.")[-48:] or "x"


def activation_set(name: str, identity: dict) -> str:
    return f"activations/{slug(name)}-{content_key(identity, SET_LAYOUT_VERSION)}"


def shard(set_prefix: str, index: int) -> str:
    return f"{set_prefix}/{shard_name(index)}"


def shard_marker(set_prefix: str, index: int) -> str:
    return f"{set_prefix}/shard-{index:05d}{MARKER}"


def shard_name(index: int) -> str:
    """A shard's file name within its set (as manifests list it)."""
    return f"shard-{index:05d}.parquet"


def stage_marker(pair_prefix: str, stage: str) -> str:
    return f"{pair_prefix}/{stage}{MARKER}"


def is_stage_marker(pair_prefix: str, key: str) -> bool:
    """key (as Store.list gives it) is a stage marker of the pair's folder."""
    name = key[len(pair_prefix) + 1:] if key.startswith(f"{pair_prefix}/") else ""
    return name.endswith(MARKER) and "/" not in name


def lease(prefix: str) -> str:
    """The folder of the leases on an activation set's or a pair's work."""
    return f"leases/{prefix}"


def pair_dir(name: str, identity: dict) -> str:
    return f"pairs/{slug(name)}-{content_key(identity)}"


def manifest(prefix: str) -> str:
    return f"{prefix}/manifest.json"


def run_dir(job_name: str) -> str:
    """The job's folder: runs/<name> for a name that is a folder name as it stands (ASCII
    letters, digits, "_", ".", "-", 48 at most, not starting or ending with "_" or "."),
    else runs/<slug>-<key of the full name>: "p1/" and "p1", or two names of Cyrillic or
    CJK letters, never share a folder. (A name spelled like another's keyed folder is
    refused by the driver, which reads whose record the folder holds.)"""
    folder = slug(job_name)
    if folder != job_name:
        folder = f"{folder}-{hashlib.sha256(job_name.encode()).hexdigest()[:16]}"
    return f"runs/{folder}"


def run_record(job_name: str) -> str:
    return f"{run_dir(job_name)}/run.json"


def report(record_key: str) -> str:
    """The job's report page, beside its run record."""
    return f"{record_key.rpartition('/')[0]}/report.html"


def run_status(job_name: str) -> str:
    return f"{run_dir(job_name)}/status.json"


def attempts_dir(job_name: str) -> str:
    """Where each attempt of a job (a run, a rerun, a resubmit) keeps its record and log."""
    return f"{run_status(job_name).rpartition('/')[0]}/attempts"


def attempt_record(job_name: str, attempt: str) -> str:
    return f"{attempts_dir(job_name)}/{attempt}.json"


def attempt_log(job_name: str, attempt: str) -> str:
    return f"{attempts_dir(job_name)}/{attempt}.log"


def run_trace(job_name: str, unit: str, attempt: int = 1) -> str:
    """The full trace of a unit of work that failed (the log has its one line)."""
    return f"runs/{slug(job_name)}/traces/{slug(unit)}-{attempt}.txt"


def run_catalog(job_name: str) -> str:
    return f"{run_dir(job_name)}/{CATALOG.file}"


def run_pair_similarity(job_name: str) -> str:
    return f"{run_dir(job_name)}/{PAIR_SIMILARITY.file}"


# A pair's files that are not tables (the tables' names are their kinds', storage/tables.py).
DIFFERENCE_SAFETENSORS = "difference.safetensors"
TOKEN_RELEVANCE_JSON = "token_relevance.json"


def agent_transcript(agent: str, budget: int, run: int) -> str:
    """Relative to the pair's folder."""
    return f"agent/{agent}-b{int(budget)}-r{int(run)}.json"
