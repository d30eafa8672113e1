"""The chain a request goes through, top to bottom: control (freeze, read-only), track
(marks and holds in breqd), replicate (to breceive), file (the backing). base.py is the
contract every layer keeps; mirror.py is no layer but the record of replicated writes the
tracking layer keeps (invariant 6)."""
