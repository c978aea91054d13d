"""One process of the two-process preemption test in test_faults.py.

    python tests/training/preemption_worker.py PROCESS_ID PORT

Joins a 2-process JAX job on 127.0.0.1:PORT, prints "ready", then asks
`preemption.stop_requested` at a boundary every 20 ms and prints "stopped at N" when
it says yes (or "never stopped" after 30 s).
"""

import sys
import time

import jax

from egpo_jax.training import preemption


def main(process_id: int, port: int) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  with preemption.sigterm_guard():
    print("ready", flush=True)
    for boundary in range(1, 1500):
      time.sleep(0.02)
      if preemption.stop_requested(boundary):
        print(f"stopped at {boundary}", flush=True)
        return
  print("never stopped", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
