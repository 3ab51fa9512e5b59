"""The fault suite's payload (host /usr/bin/python3 inside the sandbox, standard library only).

Config (manifest ``config``), each key optionally overridden per raw package in ``by_package`` (a mapping of
package name to config; the sub-group holding that package gets it):

- ``sleep_seconds`` before writing;
- ``allocate_mb`` held while sleeping (OOM scenarios: more than the job's memory request);
- ``write_mb``: an extra product of that many MiB, written in 1 MiB blocks (full-disk scenarios);
- ``time_needed_seconds``: the time the modelled work needs. With a time limit shorter than that
  (``WORKFLOW_TIME_LIMIT_SECONDS``), the payload works until the scheduler stops it; with a limit that is long
  enough it finishes at once (the suite does not wait for modelled work), so a walltime scenario costs one
  short limit, not the escalated one.

Writes one product per sub-group: ``$WORKFLOW_OUTPUT_DIR/<step>.txt`` for an intermediate step,
``/workflow/output/science/<step>.txt`` for the final one, naming the inputs it read.
"""

import json
import os
import sys
import time

sys.dont_write_bytecode = True
manifest = json.load(open(os.path.join(os.environ.get("WORKFLOW_CONFIG_DIR", "/workflow/config"), "manifest.json")))
config = dict(manifest["config"])
for item in manifest["inputs"]:
    config.update(config.get("by_package", {}).get(item.get("package_name", ""), {}))
out = os.environ["WORKFLOW_OUTPUT_DIR"]
limit = os.environ.get("WORKFLOW_TIME_LIMIT_SECONDS")
print(
    f"fault_step: {manifest['step']} {manifest['sub_group_key']} attempt {manifest['attempt_id']} "
    f"(time limit {limit} s)",
    flush=True,
)
needed = float(config.get("time_needed_seconds", 0))
if needed and limit is not None and float(limit) < needed:
    print(f"fault_step: the work needs {needed:g} s, more than the limit: working until stopped", flush=True)
    while True:
        time.sleep(1)
held = bytearray(int(config.get("allocate_mb", 0)) * 2**20)
for i in range(0, len(held), 4096):
    held[i] = 1
time.sleep(float(config.get("sleep_seconds", 0)))
target = os.path.join(out, "science") if manifest["is_final_step"] else out
os.makedirs(target, exist_ok=True)
with open(os.path.join(target, f"{manifest['step']}.txt"), "w") as f:
    names = sorted(i.get("path", "") for i in manifest["inputs"]) + sorted(
        u.get("path", "") for u in manifest["upstream_products"]
    )
    f.write(f"{manifest['sub_group_key']}: {len(names)} inputs\n" + "\n".join(names) + "\n")
if config.get("write_mb"):
    block = b"\0" * 2**20
    with open(os.path.join(target, f"{manifest['step']}-bulk.bin"), "wb") as f:
        for _ in range(int(config["write_mb"])):
            f.write(block)
print("fault_step: done", flush=True)
