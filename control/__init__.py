"""embxfer.control: the control plane (records, shared-memory ring, wake-ups, zmq bridge).

Knows bytes, not tensors.
"""
