"""The fault suite's payload (host /usr/bin/python3 inside the sandbox, standard library only).

Config (manifest ``config``): ``sleep_seconds`` before writing, ``allocate_mb`` held while sleeping (OOM
scenarios). Writes one product per sub-group: ``$WORKFLOW_OUTPUT_DIR/<step>.txt`` for an intermediate step,
``/workflow/output/science/<step>.txt`` for the final one, naming the inputs it read.
"""

import json
import os
import sys
import time

sys.dont_write_bytecode = True
manifest = json.load(open(os.path.join(os.environ.get("WORKFLOW_CONFIG_DIR", "/workflow/config"), "manifest.json")))
config = manifest["config"]
out = os.environ["WORKFLOW_OUTPUT_DIR"]
print(f"fault_step: {manifest['step']} {manifest['sub_group_key']} attempt {manifest['attempt_id']}", flush=True)
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
print("fault_step: done", flush=True)
