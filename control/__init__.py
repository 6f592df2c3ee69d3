"""embxfer.control: the control plane (records, shared-memory ring, wake-ups, zmq bridge).

Knows bytes, not tensors.

- `records`: the wire format of transfer, resume, completion, abort, heartbeat and TP
  decision records (`encode` / `decode`, `max_record_bytes`).
- `ring`: the single-writer, multi-reader ring in POSIX shared memory (`RingWriter`,
  `RingReader`, `Doorbell`, `wait_any`); its docstring draws the memory layout.
- `remote`: frames (encoded records, opaque bytes) between nodes over zmq/TCP, admitted
  and authenticated with CURVE keys derived from the job's secret, with heartbeats,
  dead-peer reports and counted, logged drops (`RemoteLink`).
- `hygiene`: list and remove what crashed runs left in /dev/shm (`embxfer ring ls|rm`).
"""
