"""A tiny training script for tests/test_secrets.py: it checks that the secret env var holds the planted
value (by its hash, so the value itself is never an argument), then saves two small checkpoints through
the SDK. It writes the value nowhere, unless told `print-and-fail`: then it prints it and exits 3, as a
careless script would, to show the output is masked wherever vaultlayer keeps it."""

import hashlib
import os
import sys

import vaultlayer

name, want_sha256 = sys.argv[1], sys.argv[2]
value = os.environ.get(name, "")
if hashlib.sha256(value.encode()).hexdigest() != want_sha256:
    sys.exit(f"{name} does not hold the planted secret")
print(f"secret check ok for {name}", flush=True)
if sys.argv[3:] == ["print-and-fail"]:
    print(f"debugging: {name}={value}", flush=True)
    sys.exit(3)
for step in (1, 2):
    with vaultlayer.save(step) as directory:
        (directory / "state.txt").write_text(f"step {step}\n")
