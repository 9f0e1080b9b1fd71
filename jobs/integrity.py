"""Is a unit of work complete? Present and verified: every file its marker or manifest
lists exists and matches the digest recorded when it was written (storage/store.py).

- An activation set is complete when its manifest parses, matches its own digest (of
  every other field), describes this set (identity, shard count) and lists every shard's
  digest, and every shard matches. Without a valid
  manifest each shard stands on its marker (`shard-*.done.json`, written after the
  shard, naming it and its digest). A shard that is missing, truncated, corrupted or
  another shard is extracted again; a manifest that is missing or does not parse while
  every shard verifies is written again from the markers, with no model work.
- A pair's stage is complete when its marker (`<stage>.done.json`, written by the
  executor after the stage's run function returned) parses, records the stage's content
  key for this spec (jobs/stages.py stage_keys: else its settings or inputs changed, and
  it runs again in place), lists every table the stage declares, and every file it
  lists matches.
- A pair is complete when its manifest parses, records exactly the spec's stages with
  their keys, and lists, with digests that match, every file of those stages (written
  last, from the stage markers).

Each check returns why not (a short phrase for the log), or None where nothing was there
to check (not done yet: nothing to say).
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from storage import layout
from storage.store import Store, StorageError

VERIFY_THREADS = 4     # shards read and checked at once (I/O and CRC-32 release the GIL)


def _digest_ok(d) -> bool:
    return isinstance(d, dict) and isinstance(d.get("size"), int) and isinstance(d.get("crc32"), str)


def read_record(store: Store, key: str):
    """(value, None) or (None, why) for a JSON object that should be there."""
    try:
        value = store.read_json(key)
    except FileNotFoundError:
        return None, "missing"
    except StorageError as e:
        text, named = str(e), store.uri(key) + ": "
        return None, text[len(named):] if text.startswith(named) else text
    if not isinstance(value, dict):
        return None, f"not an adl record (a JSON {type(value).__name__})"
    return value, None


@dataclass
class SetCheck:
    complete: bool
    good: dict = field(default_factory=dict)        # shard index -> digest, verified
    problems: dict = field(default_factory=dict)    # shard index -> why it must be extracted (None: not yet)
    manifest_problem: str | None = None             # why the manifest does not count (None: it does)


def check_set(store: Store, aset, deep: bool = True) -> SetCheck:
    """Which shards of the activation set are present and verified. deep=False compares
    the shards' sizes with the listing only (no shard is read): enough to decide whether
    the set looks complete."""
    prefix, n = aset.prefix, aset.documents.num_shards
    sizes = store.sizes(prefix)
    key = layout.manifest(prefix)
    listed, manifest_problem = None, None
    if key not in sizes:
        manifest_problem = "absent"
    else:
        manifest, why = read_record(store, key)
        files = manifest.get("files") if manifest else None
        if why:
            manifest_problem = why
        elif manifest.get("digest") != manifest_digest(manifest):
            manifest_problem = ("records no digest of its own (written by an older adl)" if "digest" not in manifest
                                else "does not match its own digest (edited or corrupted)")
        elif manifest.get("identity") != aset.identity or manifest.get("shards") != n:
            manifest_problem = "describes another activation set"
        elif not isinstance(files, dict) or not all(_digest_ok(files.get(layout.shard_name(i))) for i in range(n)):
            manifest_problem = "does not list every shard's digest"
        else:
            listed = files
    good, problems = {}, {}
    for i in range(n):
        shard = layout.shard(prefix, i)
        expected = listed[layout.shard_name(i)] if listed else None
        if expected is None:
            marker_key = layout.shard_marker(prefix, i)
            if marker_key not in sizes:   # not extracted yet (or killed before its marker): quietly
                problems[i] = None
                continue
            marker, why = read_record(store, marker_key)
            if why:
                problems[i] = f"its marker is unreadable ({why})"
                continue
            if marker.get("shard") != i or not _digest_ok(marker.get("digest")):
                problems[i] = "its marker names another shard or records no digest"
                continue
            expected = marker["digest"]
        if shard not in sizes:
            problems[i] = "missing"
        elif sizes[shard] != expected["size"]:
            problems[i] = f"{sizes[shard]} bytes, {expected['size']} recorded (truncated or replaced)"
        else:
            good[i] = expected
    if deep and good:
        with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(good))) as pool:
            verdicts = dict(zip(good, pool.map(lambda i: store.verify(layout.shard(prefix, i), good[i]), good)))
        for i, why in verdicts.items():
            if why is not None:
                problems[i] = why
                del good[i]
    return SetCheck(manifest_problem is None and len(good) == n, good, problems, manifest_problem)


def set_manifest(aset, digests: dict) -> dict:
    """An activation set's manifest: its identity, counts, every shard's digest, and the
    digest of all that (manifest_digest), so that no field of it changes unnoticed."""
    docs = aset.documents
    manifest = {"identity": aset.identity, "layers": list(aset.layers), "shards": docs.num_shards,
                "documents": int(len(docs.doc_ids)), "documents_read": docs.read, "documents_dropped": docs.dropped,
                "files": {layout.shard_name(i): digests[i] for i in range(docs.num_shards)}}
    return {**manifest, "digest": manifest_digest(manifest)}


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a manifest's every field but "digest", as canonical JSON (sorted keys, as
    JSON writes numbers): a flipped digit anywhere in it is found, and the shards then stand
    on their own markers (check_set), rather than an intact shard being extracted again."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_files(store: Store, folder: str, files: dict, required=()) -> str | None:
    """Why the files a marker or manifest lists do not all verify (None: they do)."""
    if not isinstance(files, dict):
        return "lists no files"
    missing = [name for name in required if name not in files]
    if missing:
        return f"does not list {', '.join(missing)}"
    for name in sorted(files):
        if not _digest_ok(files[name]):
            return f"records no digest for {name}"
        why = store.verify(f"{folder}/{name}", files[name])
        if why is not None:
            return f"{name}: {why}"
    return None


def check_stage(store: Store, pair, stage, key: str) -> tuple[dict | None, str | None]:
    """(the files of a complete stage, None), or (None, why not; None: not run yet).
    key: the stage's content key for this spec."""
    marker_key = layout.stage_marker(pair.out_dir, stage.name)
    if not store.exists(marker_key):
        return None, None
    marker, why = read_record(store, marker_key)
    if why is None and marker.get("key") != key:
        return None, "its results were computed with other settings or inputs"
    if why is None:
        why = check_files(store, pair.out_dir, marker.get("files"), stage.writes)
    if why is not None:
        return None, f"its marker {marker_key.rpartition('/')[2]}: {why}"
    return marker["files"], None


def check_pair(store: Store, pair, stages, keys: dict) -> str | None:
    """Why the pair's results are not complete (None: they are; "" when it has no
    manifest yet). stages: the spec's stages (their tables must all be listed); keys:
    their content keys ({stage: {"key", ...}}, jobs/stages.py stage_keys)."""
    key = layout.manifest(pair.out_dir)
    if not store.exists(key):
        return ""
    manifest, why = read_record(store, key)
    if why is None:
        recorded = manifest.get("stages")
        recorded = {name: entry.get("key") for name, entry in recorded.items() if isinstance(entry, dict)} \
            if isinstance(recorded, dict) else {}
        if recorded != {s.name: keys[s.name]["key"] for s in stages}:
            return "its manifest: its stages or their settings differ from this job's"
        why = check_files(store, pair.out_dir, manifest.get("files"), [w for s in stages for w in s.writes])
    return None if why is None else f"its manifest: {why}"
